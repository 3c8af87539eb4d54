"""The next-token loss over a packed reasoner row: answer tokens only (labels -100 elsewhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .normalise import LossSum

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> LossSum:
    """Summed cross-entropy of position i's logits against label i + 1, and the number of labelled tokens.

    logits (B, L, V), labels (B, L). A packed row is safe to shift as one sequence: every sample's first
    label is -100 (`pack_reasoner_inputs`), so no sample predicts the next one's first token.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"next_token_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B * (L - 1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)  # (B * (L - 1),)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    count = (shift_labels != ignore_index).sum().to(torch.float32)
    return LossSum(total, count)


__all__ = ["IGNORE_INDEX", "next_token_loss"]
