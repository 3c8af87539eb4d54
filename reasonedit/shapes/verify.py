"""Check a synthesized dataset against the exact oracle, reading every image from its pixels."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from reasonedit.shapes.oracle import Oracle
from reasonedit.data.samples import EditPair, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.shapes.world import Scene, ShapesWorld, WorldConfig
from reasonedit.data.loader import LoaderStats, Skipped, read_shard
from reasonedit.data.shards import MANIFEST

SHARD_ENDS = ("truncated", "bad_tar", "read_error", "missing_records", "unreadable_shard")  # a shard not read whole
_KEPT = 20  # skipped records of readable shards named on stderr


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
    """How often the oracle, reading pixels, agrees with what the generator stated; and what could not be read,
    counted per record as the loader counts it (`records`: per split/kind, records checked and skipped by reason)."""

    targets_perfect: Tally = field(default_factory=Tally)  # each target scores success, 10/10
    sources_fail: Tally = field(default_factory=Tally)  # each unchanged source is not a success
    reflection_decision: Tally = field(default_factory=Tally)  # stated decision == oracle decision
    reflection_score: Tally = field(default_factory=Tally)  # stated score == oracle score
    renders_read_back: Tally = field(default_factory=Tally)  # text-to-image scene read back exactly
    records: LoaderStats = field(default_factory=LoaderStats)
    unreadable: list[str] = field(default_factory=list)  # what ended each shard that could not be read whole
    skips: list[str] = field(default_factory=list)  # the first few skipped records of readable shards, and why
    unchecked: list[str] = field(default_factory=list)  # records the oracle could not check, and why

    def rows(self) -> list[tuple[str, Tally]]:
        return [("generated targets score success 10/10", self.targets_perfect),
                ("unchanged sources score as failures", self.sources_fail),
                ("reflection decisions agree", self.reflection_decision),
                ("reflection scores agree", self.reflection_score),
                ("text-to-image scenes read back exactly", self.renders_read_back)]

    @property
    def all_agree(self) -> bool:
        return (not self.unreadable and not self.unchecked and not self.records.total_skipped
                and not self.records.total_uncounted and all(t.passed == t.total for _, t in self.rows()))

    def table(self) -> str:
        lines = [f"{'oracle check':<42} {'agree':>7} {'of':>7} {'rate':>7}"]
        for name, t in self.rows():
            lines.append(f"{name:<42} {t.passed:>7} {t.total:>7} {t.rate:>7.2%}")
        lines.append("records read, as the training loader reads them (skipped records count once each):")
        lines.append(self.records.table(read="read"))
        if self.unreadable:
            lines.append(f"shards that could not be read whole: {len(self.unreadable)} (their readable records "
                         "are counted above)")
        if self.unchecked:
            lines.append(f"records the oracle could not check: {len(self.unchecked)}")
        return "\n".join(lines)

    def add_skip(self, dataset: str, skip: Skipped) -> None:
        self.records.add(dataset, skip)
        if skip.reason in SHARD_ENDS:
            self.unreadable.append(skip.detail)
        elif len(self.skips) < _KEPT:
            self.skips.append(skip.detail)


def world_of(path: str | Path) -> ShapesWorld:
    """The world a dataset was generated with, from its manifest."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: is {path} a dataset written by `reasonedit data synth`?")
    doc = _manifest(manifest)
    if "world" not in doc:
        raise ValueError(f"{manifest} has no shapes world (it was made by {doc.get('importer', 'an importer')}): "
                         "only datasets written by `reasonedit data synth` can be checked by the oracle")
    try:
        world = doc["world"]
        return ShapesWorld(WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in world.items()}))
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{manifest}: its 'world' is not a shapes world config ({e}); rewrite the dataset with "
                         "`reasonedit data synth`") from None


def _manifest(manifest: Path) -> dict:
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{manifest}: cannot be read as JSON ({e}); rewrite the dataset") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{manifest}: is not a JSON object; rewrite the dataset")
    return doc


def _shards(path: Path, split: str | None) -> list[tuple[str, Path, int | None]]:
    """(split/kind, shard path, manifest record count) of each shard the manifest lists, in its order."""
    manifest = path / MANIFEST
    doc = _manifest(manifest)
    try:
        splits = doc["shards"]
        if split is not None and split not in splits:
            raise FileNotFoundError(f"{manifest}: no split {split!r}; it has {list(splits)}")
        out = []
        for s, kinds in splits.items():
            if split is None or s == split:
                for kind, shards in kinds.items():
                    for sh in shards:
                        count = sh.get("count")
                        out.append((f"{s}/{kind}", path / s / sh["path"],
                                    count if isinstance(count, int) and not isinstance(count, bool) else None))
        return out
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{manifest}: its 'shards' listing is malformed ({type(e).__name__}: {e}); rewrite the "
                         "dataset") from None


def verify_dataset(path: str | Path, split: str | None = None) -> Agreement:
    """Check every record of `path` (one split, or all) with the oracle; records that cannot be read are counted
    as the loader counts them, and the rest of the dataset is still checked."""
    path = Path(path)
    world = world_of(path)
    oracle = Oracle(world)
    out = Agreement()
    for dataset, shard, count in _shards(path, split):
        for counts, empty in ((out.records.yielded, 0), (out.records.skipped, {}), (out.records.uncounted, {})):
            counts.setdefault(dataset, empty)
        kind = dataset.split("/", 1)[1]
        try:
            for item in read_shard(shard, count, kind):
                if isinstance(item, Skipped):
                    out.add_skip(dataset, item)
                    continue
                out.records.yielded[dataset] += 1
                try:
                    _check(oracle, out, item)
                except Exception as e:  # a record the loader accepts, whose meta the oracle cannot use
                    out.unchecked.append(f"{shard}: record {item.key}: {type(e).__name__}: {str(e)[:200]}")
        except Exception as e:  # not a data fault the loader names: still one finding, the other shards checked
            out.unreadable.append(f"{shard}: {type(e).__name__}: {str(e)[:200]}")
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
