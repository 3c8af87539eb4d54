"""Stage 3's joint objective: L = L_FM + w * L_NTP (w = 0.1 in the paper)."""

from __future__ import annotations

import torch


def joint_loss(flow_matching: torch.Tensor, next_token: torch.Tensor, ntp_weight: float = 0.1) -> torch.Tensor:
    """Both terms already normalised (each by its own global token count)."""
    return flow_matching + ntp_weight * next_token


__all__ = ["joint_loss"]
