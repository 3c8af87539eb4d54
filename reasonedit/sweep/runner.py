"""Running a sweep here, one run after another, with `sweep.json` recording each run's status (resume), or
emitting it for a cluster."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


from ..config import ConfigError, save_config
from ..publish import atomic_write_text

from .launch import emit_launch_lines, join_words, run_command, write_launch_script
from .plan import MANIFEST, SweepConfig, SweepRun, expand_sweep, load_sweep

log = logging.getLogger(__name__)


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); delete it to start the sweep afresh") from None


def write_manifest(sweep: SweepConfig, records: list[dict]) -> None:
    doc = {"name": sweep.name, "sweep": str(sweep.path), "experiment": str(sweep.experiment),
           "launcher": sweep.launcher, "nnodes": sweep.nnodes, "nproc_per_node": sweep.nproc_per_node,
           "stage": sweep.stage, "deepspeed_config": sweep.deepspeed_config, "runs": records}
    atomic_write_text(sweep.output_dir / MANIFEST, json.dumps(doc, indent=2) + "\n")


def prepare_sweep(sweep: SweepConfig, runs: Sequence[SweepRun]) -> list[dict]:
    """Save every run's resolved config and the manifest; a run recorded done with the same overrides stays done."""
    before = {r["name"]: r for r in read_manifest(sweep.output_dir).get("runs", [])}
    records = []
    for run in runs:
        save_config(run.tree, run.config_path)
        old = before.get(run.name)
        rec = {"name": run.name, "output_dir": str(run.output_dir), "overrides": run.overrides,
               "varying": dict(run.varying), "config": str(run.config_path),
               "log": str(run.log_path), "status": "pending", "returncode": None, "seconds": None, "attempts": 0}
        if old and old.get("overrides") == run.overrides:
            rec.update({k: old[k] for k in ("status", "returncode", "seconds", "attempts") if k in old})
            if rec["status"] == "running":  # the sweep that ran it was interrupted
                rec["status"] = "interrupted"
        elif old:
            log.warning("run %s: its overrides changed since the last invocation; it will run again", run.name)
        records.append(rec)
    write_manifest(sweep, records)
    return records



@dataclass
class SweepResult:
    output_dir: Path
    records: list[dict]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [r["name"] for r in self.records if r["status"] not in ("done", "pending")]

    @property
    def ok(self) -> bool:
        return all(r["status"] == "done" for r in self.records)


def run_sweep(sweep: str | Path | SweepConfig, extra_overrides: Sequence[str] = (), *, fail_fast: bool = False,
              runs: Sequence[SweepRun] | None = None,
              on_event: Callable[[str, dict], None] | None = None) -> SweepResult:
    """Run the sweep's runs here, one after another, each as a subprocess logging to `<run dir>/run.log`.

    Runs recorded done are skipped (resume). A failed run is recorded and the rest go on, unless
    `fail_fast`. Launchers other than `local` run their launch line here, which needs `nnodes: 1`.
    """
    if not isinstance(sweep, SweepConfig):
        sweep = load_sweep(sweep)
    if sweep.launcher != "local" and sweep.nnodes > 1:
        raise ConfigError(f"{sweep.path}: nnodes: {sweep.nnodes} nodes cannot be launched from here; "
                          "use --emit and run the launch script on every node")
    runs = list(runs) if runs is not None else expand_sweep(sweep, extra_overrides)
    commands = {run.name: run_command(sweep, run, python=sys.executable) for run in runs}  # checks `stage` first
    records = prepare_sweep(sweep, runs)
    result = SweepResult(sweep.output_dir, records)
    for run, rec in zip(runs, records):
        if rec["status"] == "done":
            log.info("run %s: done before; skipping", run.name)
            result.skipped.append(run.name)
            if on_event:
                on_event("skip", rec)
            continue
        rec.update(status="running", attempts=rec["attempts"] + 1, returncode=None, seconds=None)
        write_manifest(sweep, records)
        if on_event:
            on_event("start", rec)
        started = time.perf_counter()
        try:
            with open(run.log_path, "w") as logf:
                logf.write(f"$ {join_words(commands[run.name])}\n")
                logf.flush()
                code = subprocess.run(commands[run.name], stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL).returncode
        except BaseException:
            rec.update(status="interrupted", seconds=round(time.perf_counter() - started, 3))
            write_manifest(sweep, records)
            raise
        rec.update(status="done" if code == 0 else "failed", returncode=code,
                   seconds=round(time.perf_counter() - started, 3))
        write_manifest(sweep, records)
        result.ran.append(run.name)
        if on_event:
            on_event("end", rec)
        if code != 0:
            log.error("run %s failed with exit code %d; see %s", run.name, code, run.log_path)
            if fail_fast:
                break
    return result


def emit_sweep(sweep: str | Path | SweepConfig, extra_overrides: Sequence[str] = ()) -> tuple[Path, list[str]]:
    """Validate every run, save their configs and the manifest, and write `launch.sh`; returns it and its lines."""
    if not isinstance(sweep, SweepConfig):
        sweep = load_sweep(sweep)
    runs = expand_sweep(sweep, extra_overrides)
    lines = emit_launch_lines(sweep, runs)  # checks `stage` before anything is written
    prepare_sweep(sweep, runs)
    return write_launch_script(sweep, runs), lines


__all__ = ["SweepResult", "emit_sweep", "prepare_sweep", "read_manifest", "run_sweep", "write_manifest"]
