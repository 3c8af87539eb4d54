"""The paper's ablation on the offline shapes benchmark: what thinking and reflection add.

`run_shapes_ablation(model_dir, data_dir, out_dir)` edits held-out scenes in each mode (`base`,
`think`, `think_reflect`), scores every image with the exact oracle and returns the table of success
rate and mean score per mode, on concrete and abstract instructions. It is what
`reasonedit eval --bench shapes --model DIR --modes base,think,think_reflect` runs, made callable so
the demo can end with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .runner import (MODES, GenerationSettings, ModeRun, Progress, build_agents, default_model_name, model_identity,
                     run_modes)


@dataclass
class Ablation:
    table: str  # markdown: a row per mode; success % and mean score on concrete and abstract instructions
    reports: dict[str, dict]  # mode -> ShapesBenchmark.score report
    runs: dict[str, ModeRun]
    paths: dict[str, Path] = field(default_factory=dict)  # results.json, report.md, charts
    parse_errors: int = 0  # thinker replies that did not parse (each taken as Failed)


def run_shapes_ablation(model_dir: str | os.PathLike, data_dir: Optional[str | os.PathLike],
                        out_dir: str | os.PathLike, modes: Sequence[str] = MODES, limit: Optional[int] = 12,
                        steps: int = 8, rounds: int = 2, guidance: float = 4.0, seed: int = 0, batch_size: int = 8,
                        progress: Optional[Progress] = None) -> Ablation:
    """Edit `limit` concrete and `limit` abstract held-out samples per mode and tabulate the oracle's verdicts.

    data_dir: a `reasonedit data synth` dataset (its test split), or None for scenes made from a held-out seed.
    Re-running with the same out_dir reuses the images already written by the same model and settings, and
    refuses (naming what changed) when they were made otherwise.
    """
    from .benchmark import get_benchmark
    from .report import Stamp, ablation_table, write_reports

    bench = get_benchmark("shapes", **({"n": limit} if data_dir is None and limit else {})).load(data_dir)
    editor, thinker = build_agents(Path(model_dir), None, None, list(modes))
    name = default_model_name(Path(model_dir), None)
    settings = GenerationSettings(rounds=rounds, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                                  limit=limit)
    runs = run_modes(bench, editor, thinker, modes, out_dir, name, settings, progress=progress,
                     origin=model_identity(Path(model_dir)))
    reports = {mode: run.report for mode, run in runs.items()}
    stamp = Stamp(model=f"{name} ({model_dir}; {steps} steps, guidance {guidance:g}, at most {rounds} rounds)",
                  judge="oracle", resize_policy="none")
    paths = write_reports(out_dir, reports, stamp, {m: r.results for m, r in runs.items()})
    return Ablation(table=ablation_table(reports), reports=reports, runs=runs, paths=paths,
                    parse_errors=getattr(thinker, "parse_errors", 0))


__all__ = ["Ablation", "run_shapes_ablation"]
