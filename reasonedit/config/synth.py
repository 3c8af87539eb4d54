"""What `reasonedit data synth` writes: the `data` section of an experiment config, and the record kinds and splits
every dataset (synthetic or imported) is made of."""

from __future__ import annotations

from dataclasses import dataclass

# Share of the scene-hash space each split owns; fixed, so adding a split never moves a scene.
SPLITS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
KINDS = ("thinking_pair", "reflection", "edit_pair", "text_to_image")


class SynthError(ValueError):
    """Bad synthesis settings: names the setting and what to change."""


@dataclass(frozen=True)
class SynthConfig:
    """What `reasonedit data synth` writes (the `data` section of an experiment config)."""

    n: int = 200  # records of each kind in each split
    seed: int = 0
    splits: tuple[str, ...] = ("train", "val", "test")
    kinds: tuple[str, ...] = KINDS
    shard_size: int = 500
    abstract_share: float = 0.5  # share of reflection samples whose instruction is abstract

    def validate(self) -> None:
        if self.n <= 0:
            raise SynthError(f"data.n: must be a positive number of records, got {self.n}")
        if self.shard_size <= 0:
            raise SynthError(f"data.shard_size: must be positive, got {self.shard_size}")
        for key, values, allowed in (("splits", self.splits, SPLITS), ("kinds", self.kinds, KINDS)):
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise SynthError(f"data.{key}: {unknown or 'empty'} is not allowed; choose from {list(allowed)}")
        if not 0.0 <= self.abstract_share <= 1.0:
            raise SynthError(f"data.abstract_share: must lie in [0, 1], got {self.abstract_share}")


__all__ = ["KINDS", "SPLITS", "SynthConfig", "SynthError"]
