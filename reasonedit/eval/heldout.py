"""Held-out learning figures of a shapes model, measured with the exact oracle: what training must raise.

`HeldOut.load(data_dir)` takes a fixed set of held-out records (the val split by default, so the test
split stays the benchmark's); `evaluate(model, heldout, world)` measures

| figure | what | on |
| --- | --- | --- |
| copy | edits in which every cell (and the background) the instruction leaves alone comes out unchanged | edits |
| copy_cells | the same per unchanged cell | concrete edit pairs |
| concrete | edits whose output the oracle reads as exactly the target scene | concrete edit pairs |
| score / source_score | mean oracle score of the output / of returning the source unchanged | concrete edit pairs |
| think | thoughts that, executed exactly by the shapes editor on the source, give the target scene | thinking pairs |
| think_parse | thoughts the shapes editor can parse at all | thinking pairs |
| decision | reflection decisions equal to the sample's (Success / Reflection / Failed) | reflection samples |
| reply_parse | reflection replies that parse | reflection samples |

Which figures are measured depends on the model's loaded components (no generator: no copy/concrete).
The trainer calls it every `train.eval_every` steps for the learning curves; `reasonedit run` prints
the final figures next to the ablation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from reasonedit.shapes.oracle import Oracle
from ..data.samples import EditPair, ReflectionSample, ThinkingPair
from reasonedit.shapes.world import Scene, ShapesWorld
from ..data.shards import read_records

if TYPE_CHECKING:
    from ..models.model import ReasonEditModel

log = logging.getLogger(__name__)

PARTS = ("generator", "think", "reflect")


@dataclass
class HeldOut:
    """A fixed set of held-out records: the same ones at every evaluation of a run."""

    edits: list[EditPair] = field(default_factory=list)
    thinking: list[ThinkingPair] = field(default_factory=list)
    reflections: list[ReflectionSample] = field(default_factory=list)

    @classmethod
    def load(cls, data_dir: str | Path, split: str = "val", n: int = 32) -> "HeldOut":
        """The first `n` records of each kind in `split` (concrete edit pairs only: they name one target)."""
        out = cls()
        for kind, into in (("edit_pair", out.edits), ("thinking_pair", out.thinking), ("reflection", out.reflections)):
            for record in read_records(data_dir, split=split, kind=kind):
                if len(into) >= n:
                    break
                into.append(record)
        if not (out.edits or out.thinking or out.reflections):
            raise FileNotFoundError(f"{data_dir}: no held-out records in split {split!r} (edit_pair, thinking_pair, "
                                    "reflection); write the split with `reasonedit data synth`")
        return out


def _cells(scene: Scene) -> dict:
    return {s.cell: (s.kind, s.color, s.size) for s in scene.shapes}


def copy_figures(read: Scene, source: Scene, target: Scene) -> tuple[int, int, bool]:
    """(unchanged cells reproduced, unchanged cells, every one of them and an unchanged background right).
    Unchanged cells include empty ones: a shape drawn where none should be is a copy error too."""
    got, src, tgt = _cells(read), _cells(source), _cells(target)
    kept = [c for c in set(src) | set(tgt) | set(got) if src.get(c) == tgt.get(c)]
    right = sum(got.get(c) == tgt.get(c) for c in kept)
    background_ok = source.background != target.background or read.background == target.background
    return right, len(kept), right == len(kept) and background_ok


def generator_figures(editor, edits: Sequence[EditPair], world: ShapesWorld, *, steps: int = 16,
                      guidance: float = 4.0, seed: int = 0, batch_size: int = 16) -> dict[str, float]:
    """copy, copy_cells, concrete, score and source_score of an `Editor` (the model's generator, the shapes
    editor...) on held-out concrete edits."""
    from ..inference.types import EditRequest

    oracle = Oracle(world)
    images = []
    for i in range(0, len(edits), batch_size):
        images += editor.edit([EditRequest(image=r.source, prompt=r.instruction, seed=seed, guidance_scale=guidance,
                                           num_inference_steps=steps) for r in edits[i:i + batch_size]])
    right = kept = copied = success = 0
    scores, source_scores = [], []
    for record, image in zip(edits, images):
        source = Scene.from_dict(record.meta["source_scene"])
        target = Scene.from_dict(record.meta["target_scene"])
        report = oracle.score(image, target, source)
        r, k, whole = copy_figures(report.reading.scene, source, target)
        right, kept, copied = right + r, kept + k, copied + whole
        success += bool(report.success)
        scores.append(report.score)
        source_scores.append(oracle.score(record.source, target, source).score)
    n = max(1, len(edits))
    return {"copy": copied / n, "copy_cells": right / max(1, kept), "concrete": success / n,
            "score": float(np.mean(scores)) if scores else 0.0,
            "source_score": float(np.mean(source_scores)) if source_scores else 0.0}


def think_figures(thinker, pairs: Sequence[ThinkingPair], world: ShapesWorld) -> dict[str, float]:
    """think (the thought, executed exactly, gives the target) and think_parse, on held-out thinking pairs."""
    from reasonedit.shapes.editor import ShapesEditor
    from ..inference.types import EditRequest

    thoughts = thinker.think([p.image for p in pairs], [p.abstract_instruction for p in pairs])
    editor = ShapesEditor(world)  # exact, no injected errors: it executes what the thought says
    outputs = editor.edit([EditRequest(image=p.image, prompt=t) for p, t in zip(pairs, thoughts)])
    right = sum(bool(np.array_equal(out, p.target)) for p, out in zip(pairs, outputs))
    parsed = editor.stats.parsed
    n = max(1, len(pairs))
    return {"think": right / n, "think_parse": parsed / n}


def reflect_figures(thinker, samples: Sequence[ReflectionSample]) -> dict[str, float]:
    """decision accuracy and reply_parse of the thinker's reflections on held-out reflection samples."""
    verdicts = thinker.reflect([s.source for s in samples], [s.candidate for s in samples],
                               [s.instruction for s in samples], [s.instruction for s in samples])
    right = sum(v.decision == s.decision.lower() for v, s in zip(verdicts, samples))
    parsed = sum(v.parse_error is None for v in verdicts)
    n = max(1, len(samples))
    return {"decision": right / n, "reply_parse": parsed / n}


def evaluate(model: "ReasonEditModel", heldout: HeldOut, world: ShapesWorld, *, parts: Sequence[str] = PARTS,
             steps: int = 16, guidance: float = 4.0, seed: int = 0) -> dict[str, float]:
    """The held-out figures of `model` for the parts it can run (see the module docstring)."""
    import torch

    from ..inference.builtin import ReasonerThinker

    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"held-out evaluation: unknown parts {unknown}; choose from {list(PARTS)}")
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    figures: dict[str, float] = {}
    try:
        with torch.no_grad():
            if "generator" in parts and model.generator is not None and model.vae is not None and heldout.edits:
                from ..inference.builtin import GeneratorEditor
                figures.update(generator_figures(GeneratorEditor(model), heldout.edits, world, steps=steps,
                                                 guidance=guidance, seed=seed))
            if ("think" in parts and heldout.thinking) or ("reflect" in parts and heldout.reflections):
                thinker = ReasonerThinker(model)
                if "think" in parts and heldout.thinking:
                    figures.update(think_figures(thinker, heldout.thinking, world))
                if "reflect" in parts and heldout.reflections:
                    figures.update(reflect_figures(thinker, heldout.reflections))
    finally:
        model.train(was_training)
    figures["seconds"] = time.perf_counter() - started
    return figures


FIGURE_LABELS = {
    "copy": "edits that keep every unchanged cell", "copy_cells": "unchanged cells kept",
    "concrete": "concrete edits exactly right", "score": "mean oracle score (0-10)",
    "source_score": "mean score of returning the source", "think": "thoughts that execute to the target",
    "think_parse": "thoughts the shapes editor parses", "decision": "reflection decisions right",
    "reply_parse": "reflection replies that parse",
}


def figures_table(figures: dict[str, float]) -> str:
    """A markdown table of the figures, percentages except the scores."""
    lines = ["| figure | value |", "| --- | --- |"]
    for key, label in FIGURE_LABELS.items():
        if key in figures:
            value = f"{figures[key]:.2f}" if "score" in key else f"{100 * figures[key]:.1f} %"
            lines.append(f"| {label} | {value} |")
    return "\n".join(lines)


__all__ = ["FIGURE_LABELS", "HeldOut", "PARTS", "copy_figures", "evaluate", "figures_table", "generator_figures",
           "reflect_figures", "think_figures"]
