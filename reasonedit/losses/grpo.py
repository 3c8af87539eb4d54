"""GRPO's pieces over per-token log-probs of sampled replies: group advantages, the clipped surrogate, the k3 KL.

Shapes: G replies per prompt, B prompts; replies are right-padded to T tokens, `mask` (B*G, T) marks real reply
tokens. The surrogate of PPO with GRPO's advantage, reward minus its group's mean over the group's std
(DeepSeekMath), and a KL to the reference model by Schulman's k3 estimator, exp(r - p) - (r - p) - 1 with
r - p = ref_logp - logp: unbiased, and never negative. Reduction is explicit: "sequence" averages each reply's
tokens, then the replies (GRPO); "token" averages every reply token of the batch alike (DAPO), so long replies
weigh more.
"""

from __future__ import annotations

from typing import Optional

import torch

from reasonedit.config.rl import LOSS_MEANS

from .normalise import LossSum, normalise

ADVANTAGE_SCALES = ("std", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: str = "std") -> torch.Tensor:
    """Each reward minus its group's mean, over the group's (population) std with `scale="std"`; same shape as
    `rewards`, (B * G,) with each prompt's G rewards adjacent, or (B, G). A group of equal rewards gives zeros."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: scale {scale!r}; choose from {list(ADVANTAGE_SCALES)}")
    if group_size < 1 or rewards.numel() % group_size or (rewards.dim() == 2 and rewards.shape[1] != group_size) \
            or rewards.dim() not in (1, 2):
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} are not groups of {group_size}; pass "
                         f"(B * G,) or (B, G)")
    groups = rewards.reshape(-1, group_size).float()  # (B, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (groups.std(dim=1, correction=0, keepdim=True) + eps)
    equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # exactly zero, not rounding over eps
    return torch.where(equal, torch.zeros_like(centred), centred).reshape(rewards.shape)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A), the ratio exp(logp - old_logp), and
    where the clip removes the gradient. logp, old_logp (N, T); advantages (N,), one per reply."""
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages.to(ratio.dtype).unsqueeze(-1)  # (N, 1): every token of a reply shares its advantage
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    active = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    return loss, ratio, active


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) by k3: exp(ref - logp) - (ref - logp) - 1 (>= 0, zero where equal)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def masked_sum(values: torch.Tensor, mask: torch.Tensor, loss_mean: str) -> LossSum:
    """The per-token `values` (N, T) over `mask`: with "sequence" the sum of each reply's mean and the number of
    replies, with "token" the sum over tokens and their number."""
    if loss_mean not in LOSS_MEANS:
        raise ValueError(f"loss_mean {loss_mean!r}; choose from {list(LOSS_MEANS)}")
    mask = mask.to(values.dtype)
    if loss_mean == "token":
        return LossSum((values * mask).sum(), mask.sum())
    tokens = mask.sum(dim=1)  # (N,)
    per_reply = (values * mask).sum(dim=1) / tokens.clamp_min(1.0)
    return LossSum(per_reply.sum(), (tokens > 0).to(values.dtype).sum())


def grpo_loss_sum(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  old_logp: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                  clip_low: float = 0.2, clip_high: float = 0.2, beta: float = 0.0,
                  loss_mean: str = "sequence") -> tuple[LossSum, dict[str, torch.Tensor]]:
    """GRPO's loss as a (sum, count) pair, to be normalised over micro-steps and ranks, and its stats.

    logp (N, T) carries the gradient; old_logp is the sampling policy's (None: logp detached, one update per batch
    of rollouts, where the ratio is 1 but its gradient is not); ref_logp is the reference's, needed when beta > 0.
    Stats (detached tensors, no host sync): clip_fraction (share of reply tokens whose gradient the clip removes),
    kl (token mean of k3), ratio (token mean)."""
    if logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"grpo_loss: logp {tuple(logp.shape)}, mask {tuple(mask.shape)} and advantages "
                         f"{tuple(advantages.shape)} do not fit (N, T), (N, T), (N,)")
    if old_logp is None:
        old_logp = logp.detach()
    if beta > 0 and ref_logp is None:
        raise ValueError(f"grpo_loss: beta={beta} needs the reference's log-probs (ref_logp)")
    per_token, ratio, active = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta > 0:
        per_token = per_token + beta * kl
    total = masked_sum(per_token, mask, loss_mean)
    weights = mask.to(logp.dtype)
    tokens = weights.sum().clamp_min(1.0)
    stats = {
        "clip_fraction": ((active.to(logp.dtype) * weights).sum() / tokens).detach(),
        "kl": ((kl * weights).sum() / tokens).detach(),
        "ratio": ((ratio * weights).sum() / tokens).detach(),
    }
    return total, stats


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **kwargs) -> tuple[
        torch.Tensor, dict[str, torch.Tensor]]:
    """`grpo_loss_sum` normalised over this batch alone: (scalar loss, stats)."""
    total, stats = grpo_loss_sum(logp, advantages, mask, **kwargs)
    return normalise(total.sum, total.count), stats


__all__ = ["ADVANTAGE_SCALES", "clipped_surrogate", "group_advantages", "grpo_loss", "grpo_loss_sum", "k3_kl",
           "masked_sum"]
