"""`reasonedit sweep`: its arguments and what it prints."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence


from ..config import ConfigError

from .launch import emit_launch_lines
from .plan import LAUNCHERS, MANIFEST, expand_sweep, format_value, load_sweep
from .runner import emit_sweep, run_sweep



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `reasonedit sweep`."""
    parser.add_argument("sweep", type=Path, help="a sweep YAML (configs/sweep/NAME.yaml)")
    parser.add_argument("--emit", action="store_true", help="write <output_dir>/launch.sh with one launch line per "
                        "run (torchrun, deepspeed or local) and print the lines; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="expand and validate every run, print the plan, "
                        "write nothing")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="override the sweep's launcher")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), help="override the sweep's training stage")
    parser.add_argument("--output-dir", type=Path, help="override the sweep's output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="experiment overrides applied to every run, after the sweep's own")


def run(args: argparse.Namespace) -> int:
    """`reasonedit sweep`: 0 all runs done (or emitted), 1 bad input or a failed run. ConfigError propagates
    to the caller, which prints it and exits 1."""
    sweep = load_sweep(args.sweep)
    changes = {k: v for k, v in (("launcher", args.launcher), ("stage", args.stage),
                                 ("output_dir", args.output_dir)) if v is not None}
    sweep = replace(sweep, **changes)
    runs = expand_sweep(sweep, args.overrides)
    print(f"sweep {sweep.name}: {len(runs)} runs of {sweep.experiment} -> {sweep.output_dir} ({sweep.launcher})")
    if args.dry_run:
        lines = emit_launch_lines(sweep, runs)
        for r, line in zip(runs, lines):
            print(f"  {r.name}: {' '.join(f'{k}={format_value(v)}' for k, v in r.varying.items()) or '(base)'}")
            print(f"    {line}")
        print("dry run: every run's config is valid; nothing was written")
        return 0
    if args.emit:
        script, lines = emit_sweep(sweep, args.overrides)
        for line in lines:
            print(line)
        print(f"wrote {script} ({len(lines)} runs) and each run's config.yaml", file=sys.stderr)
        return 0

    def show(event: str, rec: dict) -> None:
        if event == "skip":
            print(f"  {rec['name']:<32} skipped (done before)")
        elif event == "end":
            extra = "" if rec["status"] == "done" else f" (exit {rec['returncode']}; see {rec['log']})"
            print(f"  {rec['name']:<32} {rec['status']:<7} {rec['seconds']:7.1f}s{extra}", flush=True)

    result = run_sweep(sweep, args.overrides, fail_fast=args.fail_fast, runs=runs, on_event=show)
    counts = {s: sum(r["status"] == s for r in result.records) for s in ("done", "failed", "pending", "interrupted")}
    print(f"sweep {sweep.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"; manifest {sweep.output_dir / MANIFEST}")
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reasonedit sweep", description=(
        "Expand a sweep config into runs, validate them all, then run them here one after another or "
        "write their torchrun/deepspeed launch lines (--emit)."))
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"reasonedit: error: {e}", file=sys.stderr)
        return 1


__all__ = ["add_arguments", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
