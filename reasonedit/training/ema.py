"""An exponential moving average of the generator's trainable parameters.

It holds a copy of each parameter's *local* tensor on the parameter's own device: under FSDP2 that
is this rank's shard (a DTensor's local tensor), so no rank ever keeps a full extra copy, and never
in host memory when training on an accelerator. Under DDP every rank holds the full copy on its
device (the parameters are replicated anyway). Saved and restored with the checkpoint.
"""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class GeneratorEMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = {n: _local(p.detach()).clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(_local(p.detach()).to(self.shadow[name].dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}...: the checkpoint was written for another stage or model")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


__all__ = ["GeneratorEMA"]
