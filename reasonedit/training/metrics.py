"""Where step metrics go: the console line (logging), and optionally wandb and tensorboard."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("reasonedit.train")


class MetricsSink:
    def __init__(self, out: Path, name: str, config: dict[str, Any], wandb: bool, tensorboard: bool, enabled: bool):
        self.wandb = self.tb = None
        if not enabled:
            return
        if wandb:
            import wandb as wandb_lib

            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # no key: log locally, sync later with `wandb sync`
            self.wandb = wandb_lib.init(project="reasonedit", name=name, dir=str(out), config=config, reinit=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def progress_line(stage: str, step: int, total: int, losses: dict[str, float], lr: float, tokens_per_s: float,
                  utilisation: float, skipped: int) -> str:
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    tail = f" | skipped {skipped}" if skipped else ""
    return (f"{stage} step {step}/{total} | {terms} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"packing {utilisation:.3f}{tail}")


__all__ = ["MetricsSink", "progress_line"]
