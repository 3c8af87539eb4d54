"""Abstract instructions: requests that need reasoning before they become concrete edits.

Each generator looks at a scene and either returns an abstract request with its exact concrete
resolution (a list of atomic edits) or None when the scene does not support it. Every request is
built so that exactly one resolution is right: referents are unique, ties are refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from reasonedit.shapes.language import COLOR_DESCRIPTIONS, refer, where
from reasonedit.shapes.world import SIZES, Edit, EditError, Scene, Shape, ShapesWorld, apply_edit

CATEGORIES = ("color_description", "relation", "counting", "comparison", "multi_step")


@dataclass(frozen=True)
class Resolution:
    category: str
    abstract: str  # the request as a user would write it
    steps: tuple[Edit, ...]  # its concrete resolution, in order


Clause = tuple[str, list[Edit]]  # a lower-case clause without the full stop, and its edits
Generator = Callable[[ShapesWorld, Scene, random.Random], "Clause | None"]


def _plural(kind: str) -> str:
    return kind + "es" if kind.endswith("x") else kind + "s"


def _rank(size: str) -> int:
    return SIZES.index(size)


def _free_backgrounds(world: ShapesWorld, scene: Scene) -> list[str]:
    return [b for b in world.config.backgrounds
            if b != scene.background and all(s.color != b for s in scene.shapes)]


def _unique(shapes: list[Shape], key: Callable[[Shape], int], largest: bool) -> Shape | None:
    """The one shape with the extreme key, or None on a tie."""
    if not shapes:
        return None
    best = max(key(s) for s in shapes) if largest else min(key(s) for s in shapes)
    hits = [s for s in shapes if key(s) == best]
    return hits[0] if len(hits) == 1 else None


# -- colour by description --------------------------------------------------------------------
def color_description(world: ShapesWorld, scene: Scene, rng: random.Random) -> Clause | None:
    grid = world.config.grid
    mode = rng.choice(("recolor", "recolor", "background", "add"))
    if mode == "background":
        free = _free_backgrounds(world, scene)
        if not free:
            return None
        b = rng.choice(free)
        return f"make the background {rng.choice(COLOR_DESCRIPTIONS[b])}", [Edit("background", color=b)]
    if mode == "add":
        empty = world.empty_cells(scene)
        if not empty:
            return None
        cell, kind = rng.choice(empty), rng.choice(world.config.kinds)
        color, size = world.random_color(rng, scene.background), rng.choice(world.config.sizes)
        desc = rng.choice(COLOR_DESCRIPTIONS[color])
        place = where(cell, grid)
        prep = "in" if place.startswith("the ") else "at"
        return (f"add a {size} {kind} {prep} {place}, {desc}",
                [Edit("add", cell=cell, kind=kind, color=color, size=size)])
    if not scene.shapes:
        return None
    s = rng.choice(scene.shapes)
    color = world.random_color(rng, s.color, scene.background)
    verb = rng.choice(("make {ref} {desc}", "paint {ref} {desc}", "give {ref} {desc}"))
    desc = rng.choice(COLOR_DESCRIPTIONS[color])
    if verb.startswith("paint") and desc.startswith("as "):
        verb = "make {ref} {desc}"
    if verb.startswith("give") and desc.startswith("as "):
        verb = "make {ref} {desc}"
    return verb.format(ref=refer(scene, s.cell, grid, rng), desc=desc), [Edit("recolor", cell=s.cell, color=color)]


# -- spatial relations -------------------------------------------------------------------------
_DIRECTIONS = {
    "left": ("to the left of {ref} in the same row", 0, -1),
    "right": ("to the right of {ref} in the same row", 0, 1),
    "above": ("directly above {ref}", -1, 0),
    "below": ("directly below {ref}", 1, 0),
}


def _neighbour(scene: Scene, anchor: Shape, dr: int, dc: int) -> Shape | None:
    """The nearest shape from `anchor` in one direction along its row or column."""
    line = [s for s in scene.shapes
            if (dr == 0 and s.row == anchor.row and (s.col - anchor.col) * dc > 0)
            or (dc == 0 and s.col == anchor.col and (s.row - anchor.row) * dr > 0)]
    return min(line, key=lambda s: abs(s.row - anchor.row) + abs(s.col - anchor.col), default=None)


def relation(world: ShapesWorld, scene: Scene, rng: random.Random) -> Clause | None:
    grid = world.config.grid
    options = [(a, d) for a in scene.shapes for d in _DIRECTIONS
               if _neighbour(scene, a, *_DIRECTIONS[d][1:]) is not None]
    if not options:
        return None
    anchor, d = rng.choice(options)
    text, dr, dc = _DIRECTIONS[d]
    target = _neighbour(scene, anchor, dr, dc)
    # Name the anchor by kind and colour only, never by position: the relation must do the work.
    ref = refer(scene, anchor.cell, grid)
    if " in " in ref or " at " in ref:
        return None
    the_shape = "the shape " + text.format(ref=ref)
    action = rng.choice(("remove", "recolor", "resize"))
    if action == "remove":
        return f"remove {the_shape}", [Edit("remove", cell=target.cell)]
    if action == "recolor":
        color = world.random_color(rng, target.color, scene.background)
        return f"make {the_shape} {color}", [Edit("recolor", cell=target.cell, color=color)]
    size = rng.choice([z for z in world.config.sizes if z != target.size])
    return f"make {the_shape} {size}", [Edit("resize", cell=target.cell, size=size)]


# -- counting ---------------------------------------------------------------------------------
def counting(world: ShapesWorld, scene: Scene, rng: random.Random) -> Clause | None:
    shapes = list(scene.shapes)
    kinds = sorted({s.kind for s in shapes})
    mode = rng.choice(("keep_one", "most_common", "conditional", "remove_color"))
    if mode == "keep_one":
        rules = [("one nearest the top", lambda s: s.row, False),
                 ("one furthest to the left", lambda s: s.col, False),
                 ("largest one", lambda s: _rank(s.size), True)]
        options = []
        for k in kinds:
            group = [s for s in shapes if s.kind == k]
            if len(group) >= 2:
                options += [(k, name, keep) for name, key, largest in rules
                            if (keep := _unique(group, key, largest)) is not None]
        if not options:
            return None
        k, name, keep = rng.choice(options)
        edits = [Edit("remove", cell=s.cell) for s in shapes if s.kind == k and s != keep]
        return f"remove all but one {k}, keeping the {name}", edits
    if mode == "most_common":
        counts = {k: sum(s.kind == k for s in shapes) for k in kinds}
        top = max(counts.values(), default=0)
        winners = [k for k, n in counts.items() if n == top]
        if top < 2 or len(winners) != 1:
            return None
        color = world.random_color(rng, scene.background)
        edits = [Edit("recolor", cell=s.cell, color=color) for s in shapes
                 if s.kind == winners[0] and s.color != color]
        if not edits:
            return None
        return f"make every shape of the most common kind {color}", edits
    if mode == "conditional":
        k1, k2 = rng.sample(world.config.kinds, 2)
        n1, n2 = sum(s.kind == k1 for s in shapes), sum(s.kind == k2 for s in shapes)
        free = _free_backgrounds(world, scene)
        if n1 == n2 or len(free) < 2:
            return None
        b1, b2 = rng.sample(free, 2)
        text = (f"if there are more {_plural(k1)} than {_plural(k2)}, make the background {b1}; "
                f"otherwise make it {b2}")
        return text, [Edit("background", color=b1 if n1 > n2 else b2)]
    colors = sorted({s.color for s in shapes if sum(o.color == s.color for o in shapes) >= 2})
    if not colors:
        return None
    color = rng.choice(colors)
    return f"remove every {color} shape", [Edit("remove", cell=s.cell) for s in shapes if s.color == color]


# -- comparison -------------------------------------------------------------------------------
def comparison(world: ShapesWorld, scene: Scene, rng: random.Random) -> Clause | None:
    shapes = list(scene.shapes)
    small = _unique(shapes, lambda s: _rank(s.size), largest=False)
    big = _unique(shapes, lambda s: _rank(s.size), largest=True)
    mode = rng.choice(("as_big", "color_of", "remove_largest", "move_smallest", "rightmost"))
    if mode == "rightmost":
        right = _unique(shapes, lambda s: s.col, largest=True)
        if right is None:
            return None
        return "remove the shape furthest to the right", [Edit("remove", cell=right.cell)]
    if small is None or big is None or small == big:
        return None
    if mode == "as_big":
        return ("make the smallest shape as big as the largest one",
                [Edit("resize", cell=small.cell, size=big.size)])
    if mode == "color_of":
        if small.color == big.color:
            return None
        return ("give the largest shape the colour of the smallest one",
                [Edit("recolor", cell=big.cell, color=small.color)])
    if mode == "remove_largest":
        return "remove the largest shape", [Edit("remove", cell=big.cell)]
    g = world.config.grid - 1
    corners = [c for c in ((0, 0), (0, g), (g, 0), (g, g)) if scene.shape_at(c) is None]
    if not corners:
        return None
    corner = rng.choice(corners)
    return f"move the smallest shape to {where(corner, world.config.grid)}", [Edit("move", cell=small.cell, to=corner)]


# -- several steps ----------------------------------------------------------------------------
def swap_pair(world: ShapesWorld, scene: Scene, rng: random.Random) -> Clause | None:
    """'swap the two circles' when there are exactly two of a kind and they differ."""
    pairs = []
    for k in sorted({s.kind for s in scene.shapes}):
        group = [s for s in scene.shapes if s.kind == k]
        if len(group) == 2 and (group[0].color, group[0].size) != (group[1].color, group[1].size):
            pairs.append(group)
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return f"swap the two {_plural(a.kind)}", [Edit("swap", cell=a.cell, to=b.cell)]


_SINGLE: tuple[Generator, ...] = (color_description, relation, counting, comparison)


def multi_step(world: ShapesWorld, scene: Scene, rng: random.Random) -> Clause | None:
    clauses, edits, seen = [], [], [scene]
    n = rng.choice((2, 2, 3))
    # distinct kinds of step, and no step may bring back an earlier scene (swap, then swap back)
    for gen in rng.sample(_SINGLE + (swap_pair,), n):
        got = gen(world, scene, rng)
        if got is None:
            return None
        text, steps = got
        try:
            for e in steps:
                scene = apply_edit(scene, e)
        except EditError:
            return None
        if scene in seen:
            return None
        seen.append(scene)
        clauses.append(text)
        edits += steps
    if len(edits) > 4:
        return None
    if len(clauses) == 2:
        joined = f"{clauses[0]}, then {clauses[1]}"
    else:
        joined = f"{clauses[0]}, then {clauses[1]}, and finally {clauses[2]}"
    return joined, edits


GENERATORS: dict[str, Generator] = {
    "color_description": color_description,
    "relation": relation,
    "counting": counting,
    "comparison": comparison,
    "multi_step": multi_step,
}


def resolve(world: ShapesWorld, scene: Scene, category: str, rng: random.Random) -> Resolution | None:
    """An abstract request of `category` for `scene`, or None when the scene cannot carry one."""
    got = GENERATORS[category](world, scene, rng)
    if got is None:
        return None
    text, steps = got
    try:
        after = scene
        for e in steps:
            after = apply_edit(after, e)
    except EditError:
        return None
    if after == scene:
        return None
    return Resolution(category, text[0].upper() + text[1:] + ".", tuple(steps))


__all__ = ["CATEGORIES", "GENERATORS", "Resolution", "resolve"]
