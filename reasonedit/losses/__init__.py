"""Losses as plain functions over flat tensors, each returning a (sum, count) pair.

Normalisation is a separate, visible step (`normalise` with `global_count`): the count is summed
over gradient-accumulation micro-steps and all-reduced over ranks before any division, so every
token weighs the same however samples are packed or sharded.
"""

from .flow_matching import (FlowMatchingConfig, flow_matching_loss, logit_normal, resolution_mu, sample_timesteps,
                            shift_timesteps, timestep_weights)
from .grpo import (ADVANTAGE_SCALES, clipped_surrogate, group_advantages, grpo_loss, grpo_loss_sum, k3_kl,
                   masked_sum)
from .joint import joint_loss
from .next_token import next_token_loss
from .normalise import LossSum, global_count, normalise

__all__ = ["ADVANTAGE_SCALES", "FlowMatchingConfig", "LossSum", "clipped_surrogate", "flow_matching_loss",
           "global_count", "group_advantages", "grpo_loss", "grpo_loss_sum", "joint_loss", "k3_kl", "logit_normal",
           "masked_sum", "next_token_loss", "normalise", "resolution_mu", "sample_timesteps", "shift_timesteps",
           "timestep_weights"]
