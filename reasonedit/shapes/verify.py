"""Check a synthesized dataset against the exact oracle, reading every image from its pixels."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from reasonedit.shapes.oracle import Oracle
from reasonedit.data.samples import EditPair, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.shapes.world import Scene, ShapesWorld, WorldConfig
from reasonedit.data.shards import MANIFEST, read_records, shard_paths


@dataclass
class Tally:
    passed: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, ok: bool, key: str) -> None:
        self.total += 1
        self.passed += ok
        if not ok and len(self.failures) < 20:
            self.failures.append(key)

    @property
    def rate(self) -> float:
        return self.passed / self.total if self.total else float("nan")


@dataclass
class Agreement:
    """How often the oracle, reading pixels, agrees with what the generator stated."""

    targets_perfect: Tally = field(default_factory=Tally)  # each target scores success, 10/10
    sources_fail: Tally = field(default_factory=Tally)  # each unchanged source is not a success
    reflection_decision: Tally = field(default_factory=Tally)  # stated decision == oracle decision
    reflection_score: Tally = field(default_factory=Tally)  # stated score == oracle score
    renders_read_back: Tally = field(default_factory=Tally)  # text-to-image scene read back exactly
    unreadable: list[str] = field(default_factory=list)  # "shard: why" for each shard that could not be read whole

    def rows(self) -> list[tuple[str, Tally]]:
        return [("generated targets score success 10/10", self.targets_perfect),
                ("unchanged sources score as failures", self.sources_fail),
                ("reflection decisions agree", self.reflection_decision),
                ("reflection scores agree", self.reflection_score),
                ("text-to-image scenes read back exactly", self.renders_read_back)]

    @property
    def all_agree(self) -> bool:
        return not self.unreadable and all(t.passed == t.total for _, t in self.rows())

    def table(self) -> str:
        lines = [f"{'oracle check':<42} {'agree':>7} {'of':>7} {'rate':>7}"]
        for name, t in self.rows():
            lines.append(f"{name:<42} {t.passed:>7} {t.total:>7} {t.rate:>7.2%}")
        if self.unreadable:
            lines.append(f"shards that could not be read whole: {len(self.unreadable)} (their readable records "
                         "are counted above)")
        return "\n".join(lines)


def world_of(path: str | Path) -> ShapesWorld:
    """The world a dataset was generated with, from its manifest."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: is {path} a dataset written by `reasonedit data synth`?")
    doc = json.loads(manifest.read_text())
    if "world" not in doc:
        raise ValueError(f"{manifest} has no shapes world (it was made by {doc.get('importer', 'an importer')}): "
                         "only datasets written by `reasonedit data synth` can be checked by the oracle")
    world = doc["world"]
    return ShapesWorld(WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in world.items()}))


def verify_dataset(path: str | Path, split: str | None = None) -> Agreement:
    world = world_of(path)
    oracle = Oracle(world)
    out = Agreement()
    for shard in shard_paths(path, split):
        records = []
        try:
            records.extend(read_records(shard))
        except Exception as e:  # a truncated, unreadable or hostile shard: one finding, the others still checked
            out.unreadable.append(f"{shard}: {type(e).__name__}: {str(e)[:200]}")
        for r in records:  # what it held before the fault
            _check(oracle, out, r)
    return out


def _check(oracle: Oracle, out: Agreement, r) -> None:
    if isinstance(r, (EditPair, ThinkingPair)):
        target = Scene.from_dict(r.meta["target_scene"])
        source_image = r.source if isinstance(r, EditPair) else r.image
        rep = oracle.score(r.target, target)
        out.targets_perfect.add(rep.success and rep.score == 10, r.key)
        out.sources_fail.add(not oracle.score(source_image, target).success, r.key)
    elif isinstance(r, ReflectionSample):
        rep = oracle.score(r.candidate, Scene.from_dict(r.meta["target_scene"]), source=r.source)
        out.reflection_decision.add(rep.decision == r.decision, r.key)
        out.reflection_score.add(rep.score == r.score, r.key)
    elif isinstance(r, TextToImage):
        out.renders_read_back.add(oracle.read(r.image).scene == Scene.from_dict(r.meta["scene"]), r.key)


__all__ = ["Agreement", "Tally", "verify_dataset", "world_of"]
