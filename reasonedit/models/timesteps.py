"""The generator's timesteps: the flow's interpolant and the time shift, one rule each for training and sampling.

Flow matching noises a clean latent x0 to x_t = (1 - s) x0 + s noise (s = 0 clean, s = 1 pure noise).

Qwen-Image shifts timesteps toward noise by the exponential time shift s' = e^mu / (e^mu + (1 / s - 1)),
with mu linear in the target's token count through (base_tokens, base_shift) and (max_tokens, max_shift):
a larger image spends more of its steps at high noise.
"""

from __future__ import annotations

import torch


def noisy_target(x0: torch.Tensor, noise: torch.Tensor, s: float) -> torch.Tensor:
    """Flow matching's interpolant x_t = (1 - s) x0 + s noise (s = 0 clean, s = 1 pure noise)."""
    return (1.0 - s) * x0 + s * noise


def linear_mu(tokens: int | float | torch.Tensor, base_shift: float, max_shift: float, base_tokens: int,
              max_tokens: int) -> torch.Tensor:
    """mu at `tokens`, on the line through (base_tokens, base_shift) and (max_tokens, max_shift); float64."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return torch.as_tensor(tokens, dtype=torch.float64) * slope + (base_shift - slope * base_tokens)


def shift_timesteps(s: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The exponential time shift e^mu / (e^mu + (1 / s - 1)), in float64."""
    s = s.to(torch.float64)
    return torch.exp(mu) / (torch.exp(mu) + (1.0 / s - 1.0))


__all__ = ["linear_mu", "noisy_target", "shift_timesteps"]
