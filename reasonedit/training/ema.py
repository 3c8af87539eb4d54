"""An exponential moving average of the generator's trainable parameters.

It holds a copy of each parameter's *local* tensor on the parameter's own device: under FSDP2 that
is this rank's shard (a DTensor's local tensor), under ZeRO-3 this rank's partition (`ds_tensor`),
so no rank ever keeps a full extra copy, and never in host memory when training on an accelerator.
Under DDP and ZeRO-2 every rank holds the full copy on its device (the parameters are replicated
anyway). Saved and restored with the checkpoint.
"""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "ds_tensor"):  # a ZeRO-3 parameter: its data is empty outside a forward
        return t.ds_tensor.detach()
    return t.detach().to_local() if hasattr(t, "to_local") else t.detach()


class GeneratorEMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, dtype: torch.dtype = torch.float32):
        self.decay = decay
        self.params = params
        # float32 by default even when the weights are bf16 (DeepSpeed on GPUs): a 1e-3 step would vanish in bf16
        # (train.ema_dtype=bfloat16 halves the memory where the decay is far from 1)
        self.shadow = {n: _local(p).to(dtype, copy=True) for n, p in params.items()}
        self.sharded = any(hasattr(p, "ds_tensor") or hasattr(p, "to_local") for p in params.values())

    @torch.no_grad()
    def update(self) -> None:
        """One multi-tensor lerp over every shadow (one kernel per chunk on CUDA, no host read)."""
        shadows = list(self.shadow.values())
        current = [_local(p).to(s.dtype) for p, s in zip(self.params.values(), shadows)]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}...: the checkpoint was written for another stage or model")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


__all__ = ["GeneratorEMA"]
