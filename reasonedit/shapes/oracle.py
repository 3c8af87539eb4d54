"""The exact oracle: read shapes back from pixels and score an edit against its target scene.

Distance between scenes is the least number of atomic corrective edits (recolour, resize, move,
add, remove, background) that turn one into the other; each is a named error. From it:

- score  = max(0, 10 - 3 * errors): 10 only for an exact match;
- decision (given the source too): Success when there is no error; Reflection when exactly one
  corrective edit remains and the candidate is not just the unchanged source; Failed otherwise
  (nothing was done, or more than one thing is wrong: restart from the source).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reasonedit.shapes.language import at, shape_words
from reasonedit.shapes.world import KINDS, PALETTE, SIZES, Cell, Edit, Scene, Shape, ShapesWorld, shape_mask



@dataclass(frozen=True)
class SceneError:
    """One thing the candidate gets wrong, with the atomic edit that fixes it."""

    kind: str  # wrong_color | wrong_size | wrong_position | missing | extra | wrong_background | unreadable
    found: Shape | None = None
    expected: Shape | None = None
    found_background: str | None = None
    expected_background: str | None = None

    def fix(self) -> Edit:
        f, e = self.found, self.expected
        if self.kind == "wrong_color":
            return Edit("recolor", cell=f.cell, color=e.color)
        if self.kind == "wrong_size":
            return Edit("resize", cell=f.cell, size=e.size)
        if self.kind == "wrong_position":
            return Edit("move", cell=f.cell, to=e.cell)
        if self.kind == "missing":
            return Edit("add", cell=e.cell, kind=e.kind, color=e.color, size=e.size)
        if self.kind == "extra":
            return Edit("remove", cell=f.cell)
        if self.kind == "wrong_background":
            return Edit("background", color=self.expected_background)
        raise ValueError(f"no single edit fixes a {self.kind} error")

    def message(self, grid: int) -> str:
        f, e = self.found, self.expected
        if self.kind == "wrong_color":
            return f"the {shape_words(f, False)} {at(f.cell, grid)} should be {e.color}"
        if self.kind == "wrong_size":
            return f"the {shape_words(f)} {at(f.cell, grid)} should be {e.size}"
        if self.kind == "wrong_position":
            return f"the {shape_words(f)} {at(f.cell, grid)} should be {at(e.cell, grid)}"
        if self.kind == "missing":
            return f"a {shape_words(e)} {at(e.cell, grid)} is missing"
        if self.kind == "extra":
            return f"there should be no {shape_words(f)} {at(f.cell, grid)}"
        if self.kind == "wrong_background":
            return f"the background is {self.found_background} but should be {self.expected_background}"
        return f"the shape {at(f.cell, grid)} cannot be read"

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        for name in ("found", "expected"):
            s = getattr(self, name)
            if s is not None:
                d[name] = [s.row, s.col, s.kind, s.color, s.size]
        for name in ("found_background", "expected_background"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d


def _pair_cost(c: Shape, t: Shape) -> int | None:
    if c.kind != t.kind:
        return None  # a different kind is a removal plus an addition
    return (c.color != t.color) + (c.size != t.size) + (c.cell != t.cell)


def scene_errors(candidate: Scene, target: Scene) -> list[SceneError]:
    """The fewest atomic errors that explain how `candidate` differs from `target`."""
    errors: list[SceneError] = []
    if candidate.background != target.background:
        errors.append(SceneError("wrong_background", found_background=candidate.background,
                                 expected_background=target.background))
    exact = set(candidate.shapes) & set(target.shapes)
    cand = [s for s in candidate.shapes if s not in exact]
    targ = [s for s in target.shapes if s not in exact]
    # Exact matches cost nothing and the cost is a metric, so matching them first is optimal;
    # the rest is a small assignment solved exactly over subsets of the target shapes.
    best: dict[int, tuple[int, list]] = {0: (0, [])}
    for c in cand:
        nxt: dict[int, tuple[int, list]] = {}
        for mask, (cost, pairs) in best.items():
            options = [(cost + 1, mask, pairs + [(c, None)])]
            for j, t in enumerate(targ):
                k = None if mask >> j & 1 else _pair_cost(c, t)
                if k is not None:
                    options.append((cost + k, mask | 1 << j, pairs + [(c, t)]))
            for cst, m, p in options:
                if m not in nxt or cst < nxt[m][0]:
                    nxt[m] = (cst, p)
        best = nxt
    full = (1 << len(targ)) - 1
    _, mask, pairs = min(((cost + bin(full & ~m).count("1"), m, p) for m, (cost, p) in best.items()),
                         key=lambda x: x[0])
    for c, t in pairs:
        if t is None:
            errors.append(SceneError("extra", found=c))
            continue
        if c.color != t.color:
            errors.append(SceneError("wrong_color", found=c, expected=t))
        if c.size != t.size:
            errors.append(SceneError("wrong_size", found=c, expected=t))
        if c.cell != t.cell:
            errors.append(SceneError("wrong_position", found=c, expected=t))
    errors += [SceneError("missing", expected=t) for j, t in enumerate(targ) if not mask >> j & 1]
    return errors


def score_from_errors(n_errors: int) -> int:
    return max(0, 10 - 3 * n_errors)


def decide(source: Scene, candidate: Scene, errors: list[SceneError]) -> str:
    if not errors:
        return "Success"
    if candidate == source or len(errors) > 1 or errors[0].kind == "unreadable":
        return "Failed"
    return "Reflection"


@dataclass
class Reading:
    scene: Scene
    unreadable: list[Cell] = field(default_factory=list)
    min_iou: float = 1.0  # how well the worst shape matched its template (1.0 for exact renders)


@dataclass
class OracleReport:
    success: bool
    score: int
    errors: list[SceneError]
    decision: str | None  # only when the source is known
    reading: Reading

    def reasons(self, grid: int) -> list[str]:
        return [e.message(grid) for e in self.errors]


class Oracle:
    """Reads rendered shapes scenes from pixels and scores them exactly."""

    def __init__(self, world: ShapesWorld, min_iou: float = 0.6):
        self.world = world
        self.min_iou = min_iou
        cell = world.config.cell_px
        self._colors = list(PALETTE)
        self._rgb = np.array([PALETTE[c] for c in self._colors], dtype=np.int32)
        packed = self._rgb[:, 0] << 16 | self._rgb[:, 1] << 8 | self._rgb[:, 2]
        self._packed_order = np.argsort(packed)
        self._packed_sorted = packed[self._packed_order]
        self._templates = [(k, z, shape_mask(k, z, cell)) for k in KINDS for z in SIZES]
        covered = np.zeros((cell, cell), dtype=bool)
        for _, _, m in self._templates:
            covered |= m
        self._gutter = ~covered
        self._min_area = min(int(m.sum()) for _, _, m in self._templates)

    def labels(self, image: np.ndarray) -> np.ndarray:
        """Each pixel's nearest palette colour, as an index into the palette."""
        size = self.world.config.image_size
        if image.shape != (size, size, 3):
            raise ValueError(f"image of shape {image.shape} is not a {size}x{size} RGB render "
                             f"(world.image_size={size})")
        rgb = image.reshape(-1, 3).astype(np.int32)
        packed = rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]
        # Exact palette pixels (every pixel of a render) by lookup; the rest by nearest colour.
        pos = np.clip(np.searchsorted(self._packed_sorted, packed), 0, len(self._packed_sorted) - 1)
        exact = self._packed_sorted[pos] == packed
        out = self._packed_order[pos]
        if not exact.all():
            rest = rgb[~exact][:, None, :]
            out[~exact] = ((rest - self._rgb[None]) ** 2).sum(-1).argmin(-1)
        return out.reshape(size, size)

    def read(self, image: np.ndarray) -> Reading:
        cfg = self.world.config
        cell = cfg.cell_px
        labels = self.labels(image)
        gutter = np.concatenate([labels[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell][self._gutter]
                                 for r, c in cfg.cells])
        bg = int(np.bincount(gutter).argmax())
        shapes, unreadable, worst = [], [], 1.0
        for r, c in cfg.cells:
            window = labels[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            ink = window != bg
            if ink.sum() * 2 < self._min_area:
                continue
            color = int(np.bincount(window[ink]).argmax())
            mask = window == color
            iou, kind, size = max(((m & mask).sum() / (m | mask).sum(), k, z)
                                  for k, z, m in self._templates)
            worst = min(worst, float(iou))
            if iou < self.min_iou:
                unreadable.append((r, c))
                continue
            shapes.append(Shape(r, c, kind, self._colors[color], size))
        return Reading(Scene(self._colors[bg], tuple(shapes)), unreadable, worst)

    def score(self, image: np.ndarray, target: Scene,
              source: Scene | np.ndarray | None = None) -> OracleReport:
        """Score an edited image against the target scene; with the source, also decide."""
        reading = self.read(image)
        errors = scene_errors(reading.scene, target)
        errors += [SceneError("unreadable", found=Shape(r, c, "?", "?", "?")) for r, c in reading.unreadable]
        decision = None
        if source is not None:
            src = self.read(source).scene if isinstance(source, np.ndarray) else source
            decision = decide(src, reading.scene, errors)
        return OracleReport(not errors, score_from_errors(len(errors)), errors, decision, reading)


__all__ = ["Oracle", "OracleReport", "Reading", "SceneError", "decide",
           "scene_errors", "score_from_errors"]
