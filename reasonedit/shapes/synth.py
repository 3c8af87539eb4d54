"""Generate the four sample kinds from the shapes world and write them as shards.

Every record is a pure function of (seed, split, kind, index), so generation is reproducible
record by record. A scene belongs to exactly one split, fixed by its content hash, so the
held-out splits never contain a source scene that train has.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

from reasonedit.shapes.abstract import CATEGORIES, resolve
from reasonedit.shapes.language import caption, describe, join_steps, phrase
from reasonedit.shapes.oracle import decide, scene_errors, score_from_errors
from reasonedit.config.synth import KINDS, SPLITS, SynthConfig, SynthError
from reasonedit.data.samples import SCHEMA_VERSION, EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.shapes.world import OPS, Edit, EditError, Scene, ShapesWorld, apply_edit, apply_edits, random_edit
from reasonedit.data.shards import DatasetDirError, building_dataset, write_manifest, write_records

log = logging.getLogger(__name__)

# The paper's reflection data had about three Success to one Reflection to one Failed.
DECISION_WEIGHTS = {"Success": 3, "Reflection": 1, "Failed": 1}
ERROR_TYPES = {
    "Success": ("correct",),
    "Reflection": ("wrong_color", "wrong_size", "wrong_position", "extra_change", "incomplete"),
    "Failed": ("missing", "wrong_object", "over_editing"),
}
MAX_TRIES = 5000


def split_of(scene: Scene) -> str:
    u = int(scene.key()[:8], 16) / 2 ** 32
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= u < hi)


class Synthesizer:
    """Makes one record of any kind from (split, index), deterministically from the seed."""

    def __init__(self, world: ShapesWorld, seed: int = 0, abstract_share: float = 0.5):
        self.world, self.seed, self.abstract_share = world, seed, abstract_share
        self.grid = world.config.grid

    def _rng(self, split: str, kind: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{split}/{kind}/{index}")

    def scene(self, rng: random.Random, split: str) -> Scene:
        for _ in range(MAX_TRIES):
            scene = self.world.random_scene(rng)
            if split_of(scene) == split:
                return scene
        raise SynthError(f"no scene for split {split!r} in {MAX_TRIES} tries: the world is too small "
                         "(raise world.max_shapes or world.grid)")

    def _retry(self, what: str, rng: random.Random, split: str, make: Callable) -> Record:
        for _ in range(MAX_TRIES):
            got = make(self.scene(rng, split))
            if got is not None:
                return got
        raise SynthError(f"could not make a {what} in {MAX_TRIES} tries with this world config; "
                         "allow more shapes per scene (world.max_shapes)")

    def _phrase_steps(self, scene: Scene, steps: Sequence[Edit], rng: random.Random) -> list[str]:
        texts = []
        for e in steps:
            texts.append(phrase(e, scene, self.grid, rng))
            scene = apply_edit(scene, e)
        return texts

    # -- the four kinds -----------------------------------------------------------------------
    def text_to_image(self, split: str, index: int) -> TextToImage:
        rng = self._rng(split, "text_to_image", index)
        scene = self.scene(rng, split)
        return TextToImage(f"{split}_t2i_{index:07d}", caption(scene, self.grid, rng), self.world.render(scene),
                           meta={"scene": scene.to_dict()})

    def edit_pair(self, split: str, index: int) -> EditPair:
        rng = self._rng(split, "edit_pair", index)
        op = OPS[index % len(OPS)]  # every op equally often

        def make(scene: Scene) -> EditPair | None:
            edit = random_edit(self.world, scene, rng, ops=(op,))
            if edit is None:
                return None
            target = apply_edit(scene, edit)
            return EditPair(f"{split}_edit_{index:07d}", self.world.render(scene),
                            phrase(edit, scene, self.grid, rng), self.world.render(target),
                            meta={"op": op, "edits": [edit.to_dict()], "source_scene": scene.to_dict(),
                                  "target_scene": target.to_dict()})
        return self._retry(f"{op} edit pair", rng, split, make)

    def thinking_pair(self, split: str, index: int) -> ThinkingPair:
        rng = self._rng(split, "thinking_pair", index)
        category = CATEGORIES[index % len(CATEGORIES)]

        def make(scene: Scene) -> ThinkingPair | None:
            res = resolve(self.world, scene, category, rng)
            if res is None:
                return None
            steps = self._phrase_steps(scene, res.steps, rng)
            target = apply_edits(scene, res.steps)
            return ThinkingPair(f"{split}_think_{index:07d}", self.world.render(scene), res.abstract,
                                join_steps(steps), steps, category, self.world.render(target),
                                meta={"edits": [e.to_dict() for e in res.steps], "source_scene": scene.to_dict(),
                                      "target_scene": target.to_dict()})
        return self._retry(f"{category} thinking pair", rng, split, make)

    def reflection(self, split: str, index: int) -> ReflectionSample:
        rng = self._rng(split, "reflection", index)
        decision = rng.choices(list(DECISION_WEIGHTS), weights=list(DECISION_WEIGHTS.values()))[0]
        abstract = rng.random() < self.abstract_share

        def make(scene: Scene) -> ReflectionSample | None:
            error_type = rng.choice(ERROR_TYPES[decision])
            if abstract:
                res = resolve(self.world, scene, rng.choice(CATEGORIES), rng)
                if res is None:
                    return None
                instruction, steps = res.abstract, list(res.steps)
            else:
                edit = random_edit(self.world, scene, rng)
                if edit is None:
                    return None
                instruction, steps = phrase(edit, scene, self.grid, rng), [edit]
            target = apply_edits(scene, steps)
            candidate = make_candidate(self.world, scene, steps, target, error_type, rng)
            if candidate is None:
                return None
            errors = scene_errors(candidate, target)
            if decide(scene, candidate, errors) != decision:
                return None  # the perturbation undid itself or hit something else: draw again
            reason = ("The image matches the description." if not errors else
                      "; ".join(e.message(self.grid) for e in errors).capitalize() + ".")
            new_instruction = ""
            if decision == "Reflection":
                fix = errors[0].fix()
                new_instruction = phrase(fix, candidate, self.grid, rng)
                assert apply_edit(candidate, fix) == target
            return ReflectionSample(
                f"{split}_reflect_{index:07d}", self.world.render(scene), instruction,
                self.world.render(candidate), describe(target, self.grid), score_from_errors(len(errors)),
                reason, thought(decision, error_type, errors, self.grid), decision, new_instruction, error_type,
                meta={"instruction_kind": "abstract" if abstract else "concrete",
                      "edits": [e.to_dict() for e in steps], "errors": [e.to_dict() for e in errors],
                      "source_scene": scene.to_dict(), "target_scene": target.to_dict(),
                      "candidate_scene": candidate.to_dict()})
        return self._retry(f"{decision} reflection sample", rng, split, make)

    def make(self, kind: str, split: str, index: int) -> Record:
        return getattr(self, kind)(split, index)

    def stream(self, kind: str, split: str, n: int) -> Iterator[Record]:
        for i in range(n):
            yield self.make(kind, split, i)


def thought(decision: str, error_type: str, errors: list, grid: int) -> str:
    """The reasoning that precedes a decision tag."""
    if decision == "Success":
        return "The edited image matches the expected result in every shape and the background."
    if decision == "Reflection":
        return f"Almost right, but {errors[0].message(grid)}. One more edit on this image fixes it."
    if error_type == "missing":
        return "Nothing was changed: the edit was not carried out. Start again from the source."
    listing = "; ".join(e.message(grid) for e in errors)
    return f"{len(errors)} things are wrong ({listing}). It is better to start again from the source."


def make_candidate(world: ShapesWorld, source: Scene, steps: list[Edit], target: Scene, error_type: str,
                   rng: random.Random) -> Scene | None:
    """A candidate edit of the given error type, or None when this edit cannot carry that error."""
    changed = [s for s in target.shapes if s not in source.shapes]
    untouched = [s for s in target.shapes if s in source.shapes]
    cfg = world.config

    def attempt(edits: list[Edit]) -> Scene | None:
        try:
            return apply_edits(target, edits)
        except EditError:
            return None

    if error_type == "correct":
        return target
    if error_type == "missing":
        return source
    if error_type == "wrong_color":
        if not changed:
            free = [b for b in cfg.backgrounds if b not in (target.background, source.background)]
            if target.background == source.background or not free:
                return None
            return attempt([Edit("background", color=rng.choice(free))])
        s = rng.choice(changed)
        return attempt([Edit("recolor", cell=s.cell, color=world.random_color(rng, s.color, target.background))])
    if error_type == "wrong_size":
        if not changed:
            return None
        s = rng.choice(changed)
        return attempt([Edit("resize", cell=s.cell, size=rng.choice([z for z in cfg.sizes if z != s.size]))])
    if error_type == "wrong_position":
        empty = world.empty_cells(target)
        if not changed or not empty:
            return None
        return attempt([Edit("move", cell=rng.choice(changed).cell, to=rng.choice(empty))])
    if error_type == "extra_change":
        if not untouched:
            return None
        s = rng.choice(untouched)
        extra = random_edit(world, target.with_shapes([s]), rng, ops=("recolor", "resize", "remove"))
        return attempt([extra]) if extra else None
    if error_type == "incomplete":
        if len(steps) < 2:
            return None
        skip = rng.randrange(len(steps))
        try:
            return apply_edits(source, steps[:skip] + steps[skip + 1:])
        except EditError:
            return None
    if error_type == "wrong_object":
        first = steps[0]
        if len(steps) != 1 or first.op not in ("recolor", "resize", "remove", "move"):
            return None
        others = [s for s in source.shapes if s.cell != first.cell]
        if not others:
            return None
        wrong = Edit(first.op, cell=rng.choice(others).cell, to=first.to, color=first.color, size=first.size)
        try:
            return apply_edit(source, wrong)
        except EditError:
            return None
    if error_type == "over_editing":
        # the intended edit plus two or three changes nobody asked for
        scene = target
        for _ in range(rng.randint(2, 3)):
            extra = random_edit(world, scene, rng, ops=("recolor", "resize", "remove", "add", "move"))
            if extra is None:
                return None
            scene = apply_edit(scene, extra)
        return scene
    raise ValueError(f"unknown error type {error_type!r}")


# -- writing a dataset ---------------------------------------------------------------------------
def _write_splits(tmp: Path, config: SynthConfig, world: ShapesWorld, synth: Synthesizer,
                  progress: Callable[[str, int, int], None] | None, total: int) -> dict:
    """Every split's shards and the manifest, into the directory being built; returns the manifest."""
    done = 0
    shards: dict[str, dict[str, list]] = {}
    for split in config.splits:
        (tmp / split).mkdir()
        shards[split] = {}
        for kind in config.kinds:
            def counted(records: Iterator[Record]) -> Iterator[Record]:
                nonlocal done
                for r in records:
                    yield r
                    done += 1
                    if progress is not None:
                        progress(f"{split}/{kind}", done, total)
            shards[split][kind] = write_records(counted(synth.stream(kind, split, config.n)),
                                                tmp / split, kind, config.shard_size)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator": "reasonedit.shapes.synth",
        "synth": {**asdict(config), "splits": list(config.splits), "kinds": list(config.kinds)},
        "world": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(world.config).items()},
        "split_ranges": SPLITS,
        "counts": {s: {k: config.n for k in config.kinds} for s in config.splits},
        "shards": shards,
    }
    write_manifest(tmp, manifest)
    return manifest


def synthesize(out: str | Path, config: SynthConfig, world: ShapesWorld, overwrite: bool = False,
               progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write `config.n` records of each kind for each split under `out`, then its manifest.

    The dataset is built in a hidden sibling directory and renamed into place when complete,
    so `out` never holds a partial dataset.
    """
    config.validate()
    out = Path(out)
    synth = Synthesizer(world, config.seed, config.abstract_share)
    total, started = config.n * len(config.kinds) * len(config.splits), time.perf_counter()
    try:
        with building_dataset(out, overwrite) as tmp:
            manifest = _write_splits(tmp, config, world, synth, progress, total)
    except DatasetDirError as e:
        raise SynthError(str(e)) from None
    log.info("wrote %d records to %s in %.1fs", total, out, time.perf_counter() - started)
    return manifest


__all__ = ["DECISION_WEIGHTS", "ERROR_TYPES", "KINDS", "SPLITS", "SynthConfig", "SynthError", "Synthesizer",
           "make_candidate", "split_of", "synthesize", "thought"]
