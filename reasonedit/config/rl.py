"""The GRPO stage's settings for the reasoner (the `rl` section of an experiment config)."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_MEANS = ("sequence", "token")  # GRPO's mean per reply then over replies | DAPO's mean over all reply tokens


@dataclass
class GRPOConfig:
    group_size: int = 8  # rollouts per prompt; advantages are normalised within each group
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO raises this one (0.28) to keep exploring
    beta: float = 0.04  # weight of the k3 KL to the reference (the reasoner with its adapter disabled)
    temperature: float = 1.0
    max_new_tokens: int = 256
    loss_mean: str = "sequence"  # see LOSS_MEANS
    # optimiser updates per batch of rollouts: the first samples and scores them, every update reuses them with
    # their log-probs under the sampling policy fixed (PPO's epochs), so from the second on the ratio leaves 1 and
    # the clip acts. `steps` and `warmup_steps` count batches; the lr schedule counts updates (steps * this)
    updates_per_batch: int = 1
    # the prompts to train on in place of the stage's datasets: an rl_prompts.jsonl, or the folder `reasonedit data
    # trajectories --out` wrote one to. Each line becomes a think prompt (its source image and request; the oracle
    # reward needs its meta.target_scene), written once as a dataset under OUTPUT_DIR/rl/prompts-<sha of the file>
    # and reused; "" (unset): the stage's datasets (rl.data, else OUTPUT_DIR/data)
    prompts: str = ""

    def validate(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"rl.group_size: must be at least 2 (advantages compare replies within a group), "
                             f"got {self.group_size}")
        for key in ("clip_low", "clip_high"):
            value = getattr(self, key)
            if not 0.0 < value < (1.0 if key == "clip_low" else float("inf")):
                bound = "(0, 1)" if key == "clip_low" else "(0, inf)"
                raise ValueError(f"rl.{key}: must lie in {bound}, got {value}")
        if self.beta < 0:
            raise ValueError(f"rl.beta: must be 0 (no KL term) or positive, got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"rl.temperature: must be positive (sampling needs it), got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rl.max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.updates_per_batch < 1:
            raise ValueError(f"rl.updates_per_batch: must be at least 1 (1: one update per batch of rollouts), "
                             f"got {self.updates_per_batch}")
        if self.loss_mean not in LOSS_MEANS:
            raise ValueError(f"rl.loss_mean: {self.loss_mean!r}; choose from {list(LOSS_MEANS)}")


__all__ = ["GRPOConfig", "LOSS_MEANS"]
