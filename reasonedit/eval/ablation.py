"""The paper's ablation on the offline shapes benchmark: what thinking and reflection add.

`run_shapes_ablation(model_dir, data_dir, out_dir)` edits held-out scenes in each mode (`base`,
`think`, `think_reflect`), scores every image with the exact oracle and returns the table of success
rate and mean score per mode, on concrete and abstract instructions. It is what
`reasonedit eval --bench shapes --model DIR --modes base,think,think_reflect` runs, made callable so
the demo can end with it. With `editor="shapes"` the images come from the exact shapes editor (at an
optional `error_rate`) instead of the model's generator, so the table shows what the reasoner alone adds;
`thinker_model` takes the reasoner from another model folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from reasonedit.progress import Progress

from .runner import (MODES, SHAPES_EDITOR, GenerationSettings, ModeRun, agent_labels, build_agents,
                     default_model_name, model_identity, run_modes)

EDITORS = ("model", "shapes")  # the model's generator, or the exact shapes editor


@dataclass
class Ablation:
    table: str  # markdown: a row per mode; success % and mean score on concrete and abstract instructions
    reports: dict[str, dict]  # mode -> ShapesBenchmark.score report
    runs: dict[str, ModeRun]
    paths: dict[str, Path] = field(default_factory=dict)  # results.json, report.md, charts
    parse_errors: int = 0  # thinker replies that did not parse (each taken as Failed)
    editor: str = ""  # what edited, as stamped on the report
    thinker: Optional[str] = None
    editor_stats: Optional[dict] = None  # the shapes editor's counts (parsed, not parsed by reason, errors made)


def run_shapes_ablation(model_dir: Optional[str | os.PathLike], data_dir: Optional[str | os.PathLike],
                        out_dir: str | os.PathLike, modes: Sequence[str] = MODES, limit: Optional[int] = 12,
                        steps: int = 8, rounds: int = 2, guidance: float = 4.0, seed: int = 0, batch_size: int = 8,
                        progress: Optional[Progress] = None, *, editor: str = "model", error_rate: float = 0.0,
                        thinker_model: Optional[str | os.PathLike] = None, device: Optional[str] = None,
                        dtype: str = "auto", loop: str = "reasonedit") -> Ablation:
    """Edit `limit` concrete and `limit` abstract held-out samples per mode and tabulate the oracle's verdicts.

    data_dir: a `reasonedit data synth` dataset (its test split), or None for scenes made from a held-out seed.
    editor: "model" (model_dir's generator) or "shapes" (the exact shapes editor on the benchmark's world,
        wrong on purpose on a share `error_rate` of its edits; model_dir's generator is not loaded).
    thinker_model: a model folder whose reasoner thinks and reflects (default: model_dir's).
    device: where the models run (None or "auto": CUDA when there is one); dtype: what they run in.
    loop: think_reflect's rules, "reasonedit" or "editthinker" (`reasonedit.inference.loop`).
    Re-running with the same out_dir reuses the images already written by the same model and settings, and
    refuses (naming what changed) when they were made otherwise.
    """
    from .benchmarks import get_benchmark
    from .report import Stamp, ablation_table, write_reports

    if editor not in EDITORS:
        raise ValueError(f"editor {editor!r}: choose from {', '.join(EDITORS)}")
    shapes = editor == "shapes"
    if not shapes and model_dir is None:
        raise ValueError("editor='model' needs model_dir, the model whose generator edits")
    if not shapes and error_rate:
        raise ValueError("error_rate: only editor='shapes' makes errors on purpose")
    model = Path(model_dir) if model_dir is not None else None
    thinker_dir = Path(thinker_model) if thinker_model is not None else None
    bench = get_benchmark("shapes", **({"n": limit} if data_dir is None and limit else {})).load(data_dir)
    agent, thinker = build_agents(model, SHAPES_EDITOR if shapes else None, None, list(modes), thinker_dir=thinker_dir,
                                  world=bench.world, editor_error_rate=error_rate, device=device, dtype=dtype,
                                  loop=loop)
    editor_label, thinker_label = agent_labels(agent, thinker, model, thinker_dir)
    name = default_model_name(model, SHAPES_EDITOR if shapes else None)
    settings = GenerationSettings(rounds=rounds, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                                  limit=limit, loop=loop)
    origin = ";".join(model_identity(p) for p in (model, thinker_dir) if p is not None)
    runs = run_modes(bench, agent, thinker, modes, out_dir, name, settings, progress=progress, origin=origin)
    reports = {mode: run.report for mode, run in runs.items()}
    made_by = f"{editor_label}, at most {rounds} rounds" if shapes else \
        f"{model_dir}; {steps} steps, guidance {guidance:g}, at most {rounds} rounds"
    if loop != "reasonedit":
        made_by += f", {loop} loop"
    stamp = Stamp(model=f"{name} ({made_by})", judge="oracle", resize_policy="none", editor=editor_label,
                  thinker=thinker_label)
    paths = write_reports(out_dir, reports, stamp, {m: r.results for m, r in runs.items()})
    return Ablation(table=ablation_table(reports), reports=reports, runs=runs, paths=paths,
                    parse_errors=getattr(thinker, "parse_errors", 0), editor=editor_label, thinker=thinker_label,
                    editor_stats=agent.stats.to_dict() if shapes else None)


__all__ = ["Ablation", "EDITORS", "run_shapes_ablation"]
