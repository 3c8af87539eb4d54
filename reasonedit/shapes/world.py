"""The synthetic shapes world: flat shapes on a grid of cells, rendered without anti-aliasing.

A scene is a background colour plus at most one shape per grid cell. Every shape sits at its
cell's centre, so a render is a pure function of the scene and the oracle can read it back
exactly by matching each cell against the same templates the renderer pastes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

from reasonedit.config.world import BACKGROUNDS, KINDS, PALETTE, SHAPE_COLORS, SIZES, Cell, WorldConfig

# Radius of each size as a fraction of half a cell: the largest still leaves a gutter of
# background around every shape, which the oracle uses to find the background colour.
SIZE_RADIUS = {"small": 0.45, "medium": 0.65, "large": 0.85}



@dataclass(frozen=True, order=True)
class Shape:
    row: int
    col: int
    kind: str
    color: str
    size: str

    @property
    def cell(self) -> Cell:
        return (self.row, self.col)

    def at(self, cell: Cell) -> "Shape":
        return replace(self, row=cell[0], col=cell[1])


@dataclass(frozen=True)
class Scene:
    """A background colour and shapes in distinct cells, kept sorted by cell."""

    background: str
    shapes: tuple[Shape, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.shapes))
        cells = [s.cell for s in ordered]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two shapes share a cell in {cells}")
        object.__setattr__(self, "shapes", ordered)

    def shape_at(self, cell: Cell) -> Shape | None:
        for s in self.shapes:
            if s.cell == cell:
                return s
        return None

    def with_shapes(self, shapes: Iterable[Shape]) -> "Scene":
        return Scene(self.background, tuple(shapes))

    def to_dict(self) -> dict:
        return {"background": self.background,
                "shapes": [[s.row, s.col, s.kind, s.color, s.size] for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["background"], tuple(Shape(*s) for s in d["shapes"]))

    def key(self) -> str:
        """A stable content hash: equal scenes have equal keys in every process."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _polygon(kind: str) -> np.ndarray:
    """Vertices of a unit-radius shape centred at 0, y pointing down."""
    def ring(n: int, start_deg: float, radii: Iterable[float]) -> np.ndarray:
        radii = list(radii)
        ang = np.deg2rad(start_deg + np.arange(n) * 360.0 / n)
        r = np.array([radii[i % len(radii)] for i in range(n)])
        return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)

    if kind == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if kind == "triangle":
        return ring(3, -90, [1.0]) + np.array([0.0, 0.2])  # centre the bounding box
    if kind == "star":
        return ring(10, -90, [1.0, 0.45]) + np.array([0.0, 0.08])
    if kind == "hexagon":
        return ring(6, 0, [1.0])
    if kind == "diamond":
        return np.array([[0.0, -1.0], [0.7, 0.0], [0.0, 1.0], [-0.7, 0.0]])
    raise ValueError(f"unknown shape kind {kind!r}; choose from {list(KINDS)}")


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon over arrays of points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xc)
    return inside


@functools.lru_cache(maxsize=64)
def shape_mask(kind: str, size: str, cell_px: int) -> np.ndarray:
    """The (cell_px, cell_px) boolean footprint of a shape centred in its cell."""
    radius = SIZE_RADIUS[size] * cell_px / 2
    centre = cell_px / 2
    # Pixel (i, j) is covered when its centre lies inside the shape: symmetric and exact.
    y, x = np.mgrid[0:cell_px, 0:cell_px].astype(np.float64) + 0.5
    x, y = (x - centre) / radius, (y - centre) / radius
    if kind == "circle":
        mask = x * x + y * y <= 1.0
    else:
        mask = _inside_polygon(x, y, _polygon(kind))
    mask.setflags(write=False)
    return mask


class ShapesWorld:
    """Samples, renders and edits scenes under one `WorldConfig`."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        self.config.validate()

    # -- sampling --------------------------------------------------------------------------
    def random_scene(self, rng: random.Random, n_shapes: int | None = None) -> Scene:
        cfg = self.config
        n = n_shapes if n_shapes is not None else rng.randint(cfg.min_shapes, cfg.max_shapes)
        background = rng.choice(cfg.backgrounds)
        cells = rng.sample(cfg.cells, n)
        shapes = [Shape(r, c, rng.choice(cfg.kinds), self.random_color(rng, background),
                        rng.choice(cfg.sizes)) for r, c in cells]
        return Scene(background, tuple(shapes))

    def random_color(self, rng: random.Random, *avoid: str) -> str:
        choices = [c for c in self.config.colors if c not in avoid]
        return rng.choice(choices)

    def empty_cells(self, scene: Scene) -> list[Cell]:
        used = {s.cell for s in scene.shapes}
        return [c for c in self.config.cells if c not in used]

    def check(self, scene: Scene) -> None:
        """Raise if the scene cannot be rendered and read back exactly."""
        for s in scene.shapes:
            if not (0 <= s.row < self.config.grid and 0 <= s.col < self.config.grid):
                raise ValueError(f"shape {s} lies outside the {self.config.grid}x{self.config.grid} grid")
            if s.color == scene.background:
                raise ValueError(f"shape {s} has the background's colour")
            if s.kind not in KINDS or s.size not in SIZES or s.color not in PALETTE:
                raise ValueError(f"shape {s} has an unknown kind, size or colour")
        if scene.background not in PALETTE:
            raise ValueError(f"unknown background colour {scene.background!r}")

    # -- rendering -------------------------------------------------------------------------
    def render(self, scene: Scene) -> np.ndarray:
        """(H, W, 3) uint8 image of the scene."""
        self.check(scene)
        size, cell = self.config.image_size, self.config.cell_px
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:] = PALETTE[scene.background]
        for s in scene.shapes:
            window = image[s.row * cell:(s.row + 1) * cell, s.col * cell:(s.col + 1) * cell]
            window[shape_mask(s.kind, s.size, cell)] = PALETTE[s.color]
        return image


# -- edits -----------------------------------------------------------------------------------
OPS = ("recolor", "add", "remove", "move", "resize", "swap", "background")


@dataclass(frozen=True)
class Edit:
    """One concrete, atomic edit. Shapes are named by the cell they occupy before the edit."""

    op: str
    cell: Cell | None = None
    to: Cell | None = None  # move: destination; swap: the other shape's cell
    kind: str | None = None
    color: str | None = None
    size: str | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Edit":
        d = dict(d)
        for k in ("cell", "to"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


class EditError(ValueError):
    """An edit that does not apply to a scene (or would change nothing)."""


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after `edit`; raises EditError when the edit is invalid or a no-op."""
    shapes = {s.cell: s for s in scene.shapes}
    op = edit.op
    if op == "background":
        if edit.color == scene.background or any(s.color == edit.color for s in scene.shapes):
            raise EditError(f"background {edit.color} is unchanged or clashes with a shape")
        return Scene(edit.color, scene.shapes)
    if op == "add":
        if edit.cell in shapes:
            raise EditError(f"cell {edit.cell} is occupied")
        if edit.color == scene.background:
            raise EditError("added shape has the background's colour")
        shapes[edit.cell] = Shape(edit.cell[0], edit.cell[1], edit.kind, edit.color, edit.size)
        return scene.with_shapes(shapes.values())
    if edit.cell not in shapes:
        raise EditError(f"no shape at {edit.cell} to {op}")
    s = shapes[edit.cell]
    if op == "remove":
        del shapes[edit.cell]
    elif op == "recolor":
        if edit.color in (s.color, scene.background):
            raise EditError(f"recolor to {edit.color} changes nothing or matches the background")
        shapes[edit.cell] = replace(s, color=edit.color)
    elif op == "resize":
        if edit.size == s.size:
            raise EditError(f"resize to {edit.size} changes nothing")
        shapes[edit.cell] = replace(s, size=edit.size)
    elif op == "move":
        if edit.to in shapes:
            raise EditError(f"cannot move to occupied cell {edit.to}")
        del shapes[edit.cell]
        shapes[edit.to] = s.at(edit.to)
    elif op == "swap":
        other = shapes.get(edit.to)
        if other is None or edit.to == edit.cell:
            raise EditError(f"no other shape at {edit.to} to swap with")
        if (other.kind, other.color, other.size) == (s.kind, s.color, s.size):
            raise EditError("swapping two identical shapes changes nothing")
        shapes[edit.cell], shapes[edit.to] = other.at(edit.cell), s.at(edit.to)
    else:
        raise EditError(f"unknown edit op {op!r}; choose from {list(OPS)}")
    return scene.with_shapes(shapes.values())


def apply_edits(scene: Scene, edits: Iterable[Edit]) -> Scene:
    for e in edits:
        scene = apply_edit(scene, e)
    return scene


def random_edit(world: ShapesWorld, scene: Scene, rng: random.Random,
                ops: tuple[str, ...] = OPS) -> Edit | None:
    """A random valid edit of one of `ops`, or None when none of them fits the scene."""
    cfg = world.config
    empty = world.empty_cells(scene)
    for op in rng.sample(list(ops), len(ops)):
        shapes = list(scene.shapes)
        if op == "add" and empty:
            return Edit("add", cell=rng.choice(empty), kind=rng.choice(cfg.kinds),
                        color=world.random_color(rng, scene.background), size=rng.choice(cfg.sizes))
        if op == "background":
            free = [b for b in cfg.backgrounds
                    if b != scene.background and all(s.color != b for s in shapes)]
            if free:
                return Edit("background", color=rng.choice(free))
            continue
        if not shapes:
            continue
        s = rng.choice(shapes)
        if op == "remove":
            return Edit("remove", cell=s.cell)
        if op == "recolor":
            return Edit("recolor", cell=s.cell, color=world.random_color(rng, s.color, scene.background))
        if op == "resize":
            return Edit("resize", cell=s.cell, size=rng.choice([z for z in cfg.sizes if z != s.size]))
        if op == "move" and empty:
            return Edit("move", cell=s.cell, to=rng.choice(empty))
        if op == "swap":
            others = [o for o in shapes if (o.kind, o.color, o.size) != (s.kind, s.color, s.size)]
            if others:
                return Edit("swap", cell=s.cell, to=rng.choice(others).cell)
    return None


__all__ = [
    "BACKGROUNDS", "Cell", "Edit", "EditError", "KINDS", "OPS", "PALETTE", "SHAPE_COLORS", "SIZES",
    "Scene", "Shape", "ShapesWorld", "WorldConfig", "apply_edit", "apply_edits", "random_edit",
    "shape_mask",
]
