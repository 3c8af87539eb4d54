"""Loss sums and token counts, and the one step that turns them into a normalised loss.

A loss function returns `LossSum(sum, count)`: the summed per-token loss of this micro-batch on
this rank and how many tokens it covers. Dividing by the local count would weigh a token in a
sparse micro-batch more than one in a full one; instead the trainer sums the counts of all
micro-steps of an optimiser step, all-reduces that over ranks (`global_count`), and divides each
micro-step's sum by it (`normalise`). The data-parallel wrappers (DDP, FSDP2, DeepSpeed) average
gradients over ranks, so `normalise` multiplies by the world size to undo that mean: the summed
gradient is then exactly d(sum of all token losses)/d(theta) / (all tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass
class LossSum:
    """A summed loss over `count` tokens (count is a float tensor so it can be all-reduced)."""

    sum: torch.Tensor
    count: torch.Tensor

    def __add__(self, other: "LossSum") -> "LossSum":
        return LossSum(self.sum + other.sum, self.count + other.count)


def global_count(counts: Sequence[torch.Tensor | int | float], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The token count of a whole optimiser step: summed over micro-steps here, then over every rank."""
    total = torch.stack([torch.as_tensor(c, dtype=torch.float64).reshape(()) for c in counts]).sum() if counts \
        else torch.zeros((), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        total = total.to(backend_device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def normalise(loss_sum: torch.Tensor, count: torch.Tensor | float, world_size: int = 1) -> torch.Tensor:
    """loss_sum / count, times world_size to cancel the ranks' gradient mean; 0 when the step has no tokens.

    A count on the host is read as a number; a count tensor (the all-reduced step count, on the device) stays
    there: the scale is computed on the device, so normalising never waits for it."""
    if isinstance(count, torch.Tensor):
        count = count.to(torch.float64)
        scale = torch.where(count > 0, world_size / count.clamp_min(1e-300), torch.zeros_like(count))
        return loss_sum * scale.to(loss_sum.device, loss_sum.dtype)  # 0: a zero gradient, the graph kept alive
    if count <= 0:
        return loss_sum * 0.0  # keeps the graph (and DDP's hooks) alive with a zero gradient
    return loss_sum * (world_size / float(count))


__all__ = ["LossSum", "global_count", "normalise"]
