"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The multiplier of the base lr for optimiser step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))


def stage_scheduler(optimizer: torch.optim.Optimizer, sc) -> torch.optim.lr_scheduler.LambdaLR:
    """A stage's schedule: its `warmup_steps` and `steps` count batches, the schedule counts optimiser updates
    (the rl stage makes `updates_per_batch` of them per batch)."""
    k = int(getattr(sc, "updates_per_batch", 1))
    return make_scheduler(optimizer, sc.warmup_steps * k, sc.steps * k, sc.min_lr_ratio)


__all__ = ["make_scheduler", "stage_scheduler", "warmup_cosine"]
