"""Flow matching: x_t = (1 - s) x0 + s noise, the model predicts the velocity noise - x0.

Timesteps s are drawn logit-normal, sigmoid(N(mean, std)), then shifted toward noise by a
resolution-dependent amount as Qwen-Image does: mu grows linearly in the target's token count
from `base_shift` at `base_tokens` to `max_shift` at `max_tokens`, and
s' = e^mu / (e^mu + (1 / s - 1)), the exponential time shift. Each sample has its own s; every
one of its target tokens carries it, so the loss is a mean over the tokens of the whole step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from reasonedit.config.flow import WEIGHTINGS, FlowMatchingConfig
from reasonedit.models.timesteps import linear_mu, shift_timesteps

from .normalise import LossSum


def resolution_mu(tokens: int | torch.Tensor, cfg: FlowMatchingConfig) -> torch.Tensor:
    """mu, linear in the target's token count through (base_tokens, base_shift) and (max_tokens, max_shift)."""
    return linear_mu(tokens, cfg.base_shift, cfg.max_shift, cfg.base_tokens, cfg.max_tokens)


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64) * std + mean)


def sample_timesteps(target_tokens: Sequence[int], cfg: FlowMatchingConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One s in (0, 1) per sample (float64), shifted by its own resolution when cfg.shift."""
    s = logit_normal(len(target_tokens), cfg.logit_mean, cfg.logit_std, generator)
    if cfg.shift:
        s = shift_timesteps(s, resolution_mu(torch.tensor(list(target_tokens)), cfg))
    return s


def timestep_weights(s: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    if weighting == "none":
        return torch.ones_like(s)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s ** 2))
    raise ValueError(f"flow_matching.weighting: {weighting!r}; choose from {list(WEIGHTINGS)}")


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> LossSum:
    """Summed per-token loss and token count. pred, target (N, D): one row per noisy target token;
    a token's loss is its mean squared error over D, times its weight (N,) when given."""
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"flow_matching_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                         "the same (tokens, channels) shape")
    per_token = (pred.float() - target.float()).pow(2).mean(dim=1)  # (N,)
    if weights is not None:
        per_token = per_token * weights.to(per_token)
    return LossSum(per_token.sum(), torch.tensor(float(pred.shape[0])))


__all__ = ["FlowMatchingConfig", "WEIGHTINGS", "flow_matching_loss", "logit_normal", "resolution_mu",
           "sample_timesteps", "shift_timesteps", "timestep_weights"]
