"""Questions about a shapes scene with exact answers: what the tiny reasoner's pretraining stand-in reads.

Each question kind asks one thing the scene fixes exactly (what is in a cell, how many shapes of a kind or
colour, the background, where a uniquely named shape is, every shape in reading order), in one of a few
phrasings drawn from an rng, so a question set is a pure function of (scene, world, rng state).
`record_views` lists the (image, scene) pairs a record carries; it keeps only scenes of the record's own
split, so questions asked of train records never read a held-out scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from reasonedit.shapes.language import at, describe, refer, shape_words, where
from reasonedit.data.samples import EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.config.world import NOTHING, PHRASINGS, QUESTION_KINDS, WorldConfig, phrasing_texts
from reasonedit.shapes.world import Scene
from reasonedit.shapes.synth import split_of

# the (image field, scene key in meta) pairs of each record kind, source first
RECORD_SCENES: dict[type, tuple[tuple[str, str], ...]] = {
    TextToImage: (("image", "scene"),),
    EditPair: (("source", "source_scene"), ("target", "target_scene")),
    ThinkingPair: (("image", "source_scene"), ("target", "target_scene")),
    ReflectionSample: (("source", "source_scene"), ("candidate", "candidate_scene")),
}


@dataclass(frozen=True)
class SceneQuestion:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str


def plural(kind: str) -> str:
    return f"{kind}s"


def _cell(scene: Scene, world: WorldConfig, rng: random.Random) -> Optional[SceneQuestion]:
    # half the questions ask about an occupied cell: uniform cells would mostly be empty
    occupied = [s.cell for s in scene.shapes]
    empty = [c for c in world.cells if c not in occupied]
    cell = rng.choice(occupied) if occupied and (not empty or rng.random() < 0.5) else rng.choice(empty)
    shape = scene.shape_at(cell)
    answer = f"a {shape_words(shape)}" if shape is not None else NOTHING
    return SceneQuestion("cell", rng.choice(PHRASINGS["cell"]).format(at=at(cell, world.grid)), answer)


def _count(scene: Scene, world: WorldConfig, rng: random.Random) -> Optional[SceneQuestion]:
    by = rng.choice(("count_all", "count_kind", "count_color"))
    phrasing = rng.choice(PHRASINGS[by])
    if by == "count_kind":
        kind = rng.choice(world.kinds)
        return SceneQuestion("count", phrasing.format(kinds=plural(kind)),
                             str(sum(s.kind == kind for s in scene.shapes)))
    if by == "count_color":
        color = rng.choice(world.colors)
        return SceneQuestion("count", phrasing.format(color=color), str(sum(s.color == color for s in scene.shapes)))
    return SceneQuestion("count", phrasing, str(len(scene.shapes)))


def _background(scene: Scene, world: WorldConfig, rng: random.Random) -> Optional[SceneQuestion]:
    return SceneQuestion("background", rng.choice(PHRASINGS["background"]), scene.background)


def _where(scene: Scene, world: WorldConfig, rng: random.Random) -> Optional[SceneQuestion]:
    # only shapes that a phrase without their position names uniquely: "the yellow square at row 2, column 3"
    # would give the answer away
    named = [s.cell for s in scene.shapes if at(s.cell, world.grid) not in refer(scene, s.cell, world.grid)]
    if not named:
        return None
    cell = rng.choice(named)
    ref = refer(scene, cell, world.grid, rng)
    if at(cell, world.grid) in ref:  # the drawn phrase was the positional one: take the shortest instead
        ref = refer(scene, cell, world.grid)
    return SceneQuestion("where", rng.choice(PHRASINGS["where"]).format(ref=ref), where(cell, world.grid))


def _list(scene: Scene, world: WorldConfig, rng: random.Random) -> Optional[SceneQuestion]:
    return SceneQuestion("list", rng.choice(PHRASINGS["list"]), describe(scene, world.grid))


ASK: dict[str, Callable[[Scene, WorldConfig, random.Random], Optional[SceneQuestion]]] = {
    "cell": _cell, "count": _count, "background": _background, "where": _where, "list": _list}


def ask(kind: str, scene: Scene, world: WorldConfig, rng: random.Random) -> Optional[SceneQuestion]:
    """One question of `kind` about `scene` with its exact answer, or None when the kind does not apply
    (`where` when no shape can be named without its position)."""
    if kind not in ASK:
        raise ValueError(f"unknown question kind {kind!r}; choose from {list(QUESTION_KINDS)}")
    return ASK[kind](scene, world, rng)


def scene_questions(scene: Scene, world: WorldConfig, rng: random.Random, n: int) -> list[SceneQuestion]:
    """`n` questions of distinct kinds (fewer when fewer kinds apply), kinds and phrasings drawn from `rng`."""
    if not 0 <= n <= len(QUESTION_KINDS):
        raise ValueError(f"questions per image: {n} is outside [0, {len(QUESTION_KINDS)}]")
    out = []
    for kind in rng.sample(QUESTION_KINDS, len(QUESTION_KINDS)):
        if len(out) == n:
            break
        q = ask(kind, scene, world, rng)
        if q is not None:
            out.append(q)
    return out


def record_views(record: Record) -> list[tuple[str, np.ndarray, Scene]]:
    """(image field, image, scene) for each rendered scene the record carries in its `meta`, restricted to
    scenes of the split its first scene belongs to (a train record's edit may land on a held-out scene)."""
    views = []
    for field_name, key in RECORD_SCENES.get(type(record), ()):
        if key in record.meta:
            views.append((field_name, getattr(record, field_name), Scene.from_dict(record.meta[key])))
    if not views:
        return []
    split = split_of(views[0][2])
    return [v for v in views if split_of(v[2]) == split]


__all__ = ["NOTHING", "PHRASINGS", "QUESTION_KINDS", "SceneQuestion", "ask", "phrasing_texts", "plural",
           "record_views", "scene_questions"]
