"""The shapes benchmark: held-out synthetic scenes scored by the exact oracle, no judge.

Samples are the `test` split of a dataset written by `reasonedit data synth` (its edit pairs are the
concrete instructions, its thinking pairs the abstract ones), or made on the fly from a seed. Either
way they come from the test split, whose scenes (by content hash) never occur in training data.
Per sample the oracle gives `success` (exact match, 1 or 0) and `score` (0-10).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reasonedit.shapes.oracle import Oracle
from ...data.samples import EditPair, SchemaError, ThinkingPair
from reasonedit.shapes.world import Scene, ShapesWorld, WorldConfig
from ..benchmark import (Benchmark, BenchmarkDataError, BenchSample, SampleResult, group_by, mean, ok_only,
                         output_name, row, total_counts)
from ..images import read_rgb
from reasonedit.paths import output_file

log = logging.getLogger(__name__)

SPLIT = "test"
CATEGORIES = ("concrete", "abstract")


@dataclass
class _Scenes:
    source: np.ndarray
    source_scene: Scene
    target_scene: Scene


def world_from_manifest(doc: dict, where: str) -> ShapesWorld:
    """The shapes world a dataset manifest records (its field 'world'); `where` names the file in errors."""
    if not isinstance(doc.get("world"), dict):
        raise BenchmarkDataError(f"{where}: missing field 'world'")
    try:
        cfg = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["world"].items()})
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise BenchmarkDataError(f"{where}: field 'world' is not a valid world config ({e})") from None
    return ShapesWorld(cfg)


class ShapesBenchmark(Benchmark):
    """Concrete and abstract edits of held-out scenes; `n` of each when made on the fly (`load(None)`)."""

    name = "shapes"
    uses_judge = False

    def __init__(self, n: int = 50, seed: int = 1000, world: ShapesWorld | None = None):
        super().__init__()
        if n <= 0:
            raise ValueError(f"shapes: n must be a positive number of samples per kind, got {n}")
        self.n, self.seed = n, seed
        self.world = world or ShapesWorld()
        self._scenes: dict[str, _Scenes] = {}
        self._oracle: Oracle | None = None

    # -- reading --------------------------------------------------------------------------------
    def load(self, data_dir: str | Path | None) -> "ShapesBenchmark":
        self._scenes, samples = {}, []
        if data_dir is None:
            from reasonedit.shapes.synth import Synthesizer
            synth = Synthesizer(self.world, self.seed)
            records = [synth.edit_pair(SPLIT, i) for i in range(self.n)]
            records += [synth.thinking_pair(SPLIT, i) for i in range(self.n)]
        else:
            records = self._read_dataset(Path(data_dir))
        where = f"shapes dataset {data_dir}" if data_dir is not None else f"shapes scenes of seed {self.seed}"
        for rec in records:
            samples.append(self._add(rec, where))
        self._samples, self.data_dir = samples, None if data_dir is None else Path(data_dir)
        self._oracle = Oracle(self.world)
        log.info("shapes: %d samples (%s)", len(samples), data_dir or f"made on the fly from seed {self.seed}")
        return self

    def _read_dataset(self, path: Path) -> list:
        from ...data.shards import MANIFEST, read_records
        from ..benchmark import read_json
        manifest = path / MANIFEST
        if not path.is_dir():
            raise BenchmarkDataError(f"shapes: {path} is not a directory written by `reasonedit data synth`")
        doc = read_json(manifest, "shapes dataset")
        self.world = world_from_manifest(doc, str(manifest))
        shards = doc.get("shards")
        if not isinstance(shards, dict) or SPLIT not in shards:
            raise BenchmarkDataError(f"{manifest}: no {SPLIT!r} split under field 'shards'; write one with "
                                     f"`reasonedit data synth` (data.splits must include {SPLIT})")
        kinds = shards[SPLIT]
        missing = [k for k in ("edit_pair", "thinking_pair") if k not in kinds]
        if missing:
            raise BenchmarkDataError(f"{manifest}: the {SPLIT} split has no {missing} records (field 'shards.{SPLIT}')")
        records = []
        try:
            for kind in ("edit_pair", "thinking_pair"):
                records += list(read_records(path, split=SPLIT, kind=kind))
        except (SchemaError, FileNotFoundError, OSError) as e:
            raise BenchmarkDataError(f"shapes dataset {path}: {e}") from None
        return records

    def _add(self, rec: EditPair | ThinkingPair, where: str) -> BenchSample:
        meta = rec.meta
        output_name(self.name, rec.key, f"{where}: record {rec.key!r}", "key")
        for f in ("source_scene", "target_scene"):
            if f not in meta:
                raise BenchmarkDataError(f"shapes: record {rec.key}: missing field 'meta.{f}'")
        if isinstance(rec, EditPair):
            source, category, instruction, kind = rec.source, "concrete", rec.instruction, meta.get("op", "?")
        else:
            source, category, instruction, kind = rec.image, "abstract", rec.abstract_instruction, rec.category
        self._scenes[rec.key] = _Scenes(source, Scene.from_dict(meta["source_scene"]), Scene.from_dict(meta["target_scene"]))
        return BenchSample(rec.key, category, instruction, [], "en",
                           {"kind": kind, "target_scene": meta["target_scene"], "source_scene": meta["source_scene"]})

    def source_images(self, sample: BenchSample) -> list[np.ndarray]:
        return [self._scenes[sample.key].source]

    def output_path(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        return output_file(images_dir, model_name, "shapes", sample.category, f"{sample.key}.png")

    # -- scoring --------------------------------------------------------------------------------
    def oracle_scores(self, sample: BenchSample, edited_path: Path) -> dict[str, float]:
        """Exact oracle scores of one edited image: success (1/0), score (0-10), errors."""
        if self._oracle is None:
            raise RuntimeError("shapes: call load() before oracle_scores()")
        image = read_rgb(edited_path, self.max_pixels)
        scenes = self._scenes[sample.key]
        report = self._oracle.score(image, scenes.target_scene, scenes.source_scene)
        return {"success": float(report.success), "score": float(report.score), "errors": float(len(report.errors))}

    def score(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Success rate (%) and mean oracle score (0-10) per instruction kind, over the scored samples."""
        def metrics(rs: Sequence[SampleResult]) -> dict[str, float | None]:
            ok = ok_only(rs)
            s = mean(r.scores["success"] for r in ok)
            return {"success": None if s is None else 100.0 * s, "score": mean(r.scores["score"] for r in ok)}

        by_cat = group_by(results, lambda r: r.category)
        by_kind = group_by(results, lambda r: f"{r.category}/{r.meta.get('kind', '?')}")
        return {
            "benchmark": self.name,
            "metrics": ["success", "score"],
            "primary": "success",
            "counts": total_counts(results),
            "sections": {
                "all": {"overall": metrics(results),
                        "by_category": {c: row(by_cat[c], metrics(by_cat[c])) for c in CATEGORIES if c in by_cat}},
                "by_kind": {"overall": metrics(results),
                            "by_category": {k: row(v, metrics(v)) for k, v in sorted(by_kind.items())}},
            },
            "notes": ["success: % of scored samples the oracle reads as an exact match of the target scene",
                      "score: mean oracle score, max(0, 10 - 3 * errors)"],
        }


__all__ = ["CATEGORIES", "ShapesBenchmark", "world_from_manifest"]
