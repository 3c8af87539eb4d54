"""How stage 2 and 3 draw flow-matching timesteps (the `flow_matching` section of an experiment config)."""

from __future__ import annotations

from dataclasses import dataclass

WEIGHTINGS = ("none", "cosmap")


@dataclass
class FlowMatchingConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: bool = True  # the resolution-dependent exponential shift
    base_shift: float = 0.5  # mu at base_tokens
    max_shift: float = 0.9  # mu at max_tokens
    base_tokens: int = 256
    max_tokens: int = 8192
    weighting: str = "none"  # none | cosmap (SD3's 2 / (pi (1 - 2s + 2s^2)))

    def validate(self) -> None:
        if self.logit_std <= 0:
            raise ValueError(f"flow_matching.logit_std: must be positive, got {self.logit_std}")
        if self.max_tokens <= self.base_tokens or self.base_tokens <= 0:
            raise ValueError(f"flow_matching.max_tokens: must exceed base_tokens > 0, got "
                             f"{self.base_tokens}..{self.max_tokens}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"flow_matching.weighting: {self.weighting!r}; choose from {list(WEIGHTINGS)}")


__all__ = ["FlowMatchingConfig", "WEIGHTINGS"]
