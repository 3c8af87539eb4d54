"""The shapes world's settings and vocabulary (the `world` section of an experiment config).

The names a scene is made of (kinds, sizes, colours) live here, below every package that reads them, so that
the config validates a world without importing the world; `reasonedit.shapes` draws and renders it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SIZES = ("small", "medium", "large")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (250, 215, 30),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "purple": (130, 60, 190),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
    "cyan": (40, 200, 210),
    "grey": (128, 128, 128),
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "beige": (235, 225, 195),
    "navy": (25, 35, 90),
}
SHAPE_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "cyan",
                "grey", "white", "black")
BACKGROUNDS = ("white", "black", "grey", "beige", "navy")

Cell = tuple[int, int]  # (row, column), 0-based from the top-left

# The questions the tiny reasoner's reading stand-in asks about a scene (`stage1.questions_per_image`).
QUESTION_KINDS = ("cell", "count", "background", "where", "list")
NOTHING = "nothing"  # the answer for an empty cell
# every phrasing of each question; {at}: "in the top-left corner" / "at row 2, column 3", {ref}: a phrase that
# names exactly one shape, {kinds}: a plural kind, {color}: a shape colour
PHRASINGS: dict[str, tuple[str, ...]] = {
    "cell": ("What is {at}?", "What do you see {at}?"),
    "count_all": ("How many shapes are there?", "How many shapes does the image show?"),
    "count_kind": ("How many {kinds} are there?", "How many {kinds} does the image show?"),
    "count_color": ("How many {color} shapes are there?", "How many {color} shapes does the image show?"),
    "background": ("What colour is the background?", "Which colour is the background?"),
    "where": ("Where is {ref}?", "In which cell is {ref}?"),
    "list": ("List every shape.", "Name every shape and where it is."),
}


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn and sampled (the `world` section of an experiment config)."""

    image_size: int = 224
    grid: int = 4
    min_shapes: int = 1
    max_shapes: int = 6
    kinds: tuple[str, ...] = KINDS
    colors: tuple[str, ...] = SHAPE_COLORS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    sizes: tuple[str, ...] = SIZES

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"world.{key}: {why}")

        if self.grid < 2:
            raise bad("grid", f"must be at least 2, got {self.grid}")
        if self.image_size % self.grid:
            raise bad("image_size", f"{self.image_size} is not a multiple of world.grid={self.grid}")
        if self.image_size // self.grid < 12:
            raise bad("image_size", f"cells of {self.image_size // self.grid}px are too small "
                      "to tell shapes apart; use at least 12px per cell")
        if not 1 <= self.min_shapes <= self.max_shapes <= self.grid * self.grid:
            raise bad("max_shapes", f"need 1 <= min_shapes ({self.min_shapes}) <= max_shapes "
                      f"({self.max_shapes}) <= grid*grid ({self.grid * self.grid})")
        for key, values, allowed in (("kinds", self.kinds, KINDS), ("sizes", self.sizes, SIZES),
                                     ("colors", self.colors, tuple(PALETTE)),
                                     ("backgrounds", self.backgrounds, tuple(PALETTE))):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise bad(key, f"unknown {unknown}; choose from {list(allowed)}")
            if len(set(values)) < (2 if key != "backgrounds" else 1):
                raise bad(key, f"needs at least two distinct values, got {list(values)}")

    @property
    def cell_px(self) -> int:
        return self.image_size // self.grid

    @property
    def cells(self) -> list[Cell]:
        return [(r, c) for r in range(self.grid) for c in range(self.grid)]


def phrasing_texts() -> list[str]:
    """The question phrasings with their blanks removed, for the tiny tokenizer's corpus."""
    return [re.sub(r"\s*\{\w+\}", "", p) for ps in PHRASINGS.values() for p in ps]


__all__ = ["BACKGROUNDS", "KINDS", "NOTHING", "PALETTE", "PHRASINGS", "QUESTION_KINDS", "SHAPE_COLORS", "SIZES", "Cell",
           "WorldConfig", "phrasing_texts"]
