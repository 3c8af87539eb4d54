"""Sweeps: expand one experiment into named runs, validate them all, then run them here or emit cluster lines.

A sweep file (`configs/sweep/NAME.yaml`) names an experiment, overrides applied to every run, and a
`grid` (cartesian product, first key slowest) and/or a list of `runs` (appended after the grid).
Every run gets its own name, `output_dir=<sweep output_dir>/<run name>` and resolved `config.yaml`;
`sweep.json` in the sweep's output directory records each run's overrides and status, so a second
invocation skips runs already done.

Run names: each varying grid key contributes `<leaf><value>` (`world.grid: 4` -> `grid4`) when the
value starts with a digit, sign or dot, else `<leaf>_<value>` (`model: tiny` -> `model_tiny`); parts
are joined with `-` in the grid's key order (`grid4-seed0`). Characters other than letters, digits
and `._+-` become `_`. When two keys share a leaf the full dotted key is used (`data_seed0`).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import logging
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import PACKAGE_CONFIGS, ConfigError, load_config, read_yaml_mapping, save_config
from .publish import atomic_write_text

log = logging.getLogger(__name__)

PACKAGE_ROOT = PACKAGE_CONFIGS.parent  # configs/... paths resolve against the package (a checkout or an install)
LAUNCHERS = ("local", "torchrun", "deepspeed")
MANIFEST = "sweep.json"
LAUNCH_SCRIPT = "launch.sh"
SWEEP_KEYS = ("experiment", "name", "output_dir", "overrides", "grid", "runs", "launcher", "nproc_per_node",
              "nnodes", "deepspeed_config", "stage")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
MAX_NAME = 96  # longer names are cut and given a hash of their overrides, so they stay unique


@dataclass
class SweepConfig:
    """A checked sweep file. Paths are as the user wrote them after resolution (relative to the cwd)."""

    path: Path
    name: str
    experiment: Path
    output_dir: Path
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    launcher: str = "local"
    nproc_per_node: int = 1
    nnodes: int = 1
    deepspeed_config: str | None = None
    stage: int | None = None  # the training stage the cluster lines launch (1, 2 or 3)


@dataclass
class SweepRun:
    name: str
    output_dir: Path
    overrides: list[str]  # everything passed to the experiment, in order; the last two set name and output_dir
    varying: dict[str, Any]  # what sets this run apart: its grid values or its own overrides
    tree: DictConfig | None = field(default=None, repr=False, compare=False)  # the resolved config

    @property
    def config_path(self) -> Path:
        return self.output_dir / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.output_dir / "run.log"


# ---------------------------------------------------------------- reading the sweep file

def _find_file(key: str, value: str, sweep_path: Path) -> Path:
    p = Path(value)
    if p.is_absolute():
        candidates = [p]
    else:  # next to the sweep file, then the repo that holds the sweep's configs/, then this package's repo
        here = sweep_path.resolve().parent
        candidates = [here / p, here.parent.parent / p, PACKAGE_ROOT / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return _display_path(c)
    raise ConfigError(f"{sweep_path}: {key}: {value!r} not found (looked in "
                      f"{', '.join(str(c.parent) for c in dict.fromkeys(candidates))})")


def _display_path(p: Path) -> Path:
    """Relative to the cwd where it lies under it, so emitted lines read well and travel with the repo."""
    p = p.resolve()
    try:
        return p.relative_to(Path.cwd().resolve())
    except ValueError:
        return p


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and check a sweep file; errors name the key and the file."""
    path = Path(path)
    doc = read_yaml_mapping(path, "sweep file")
    for key in doc:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown sweep key '{key}'{hint}; sweep keys are {list(SWEEP_KEYS)}")
    if "experiment" not in doc:
        raise ConfigError(f"{path}: experiment: missing; name the experiment YAML the sweep varies")
    doc.setdefault("name", path.stem)
    doc.setdefault("output_dir", "runs/sweeps/${name}")
    # only the scalar settings are interpolated (`output_dir: runs/sweeps/${name}`); overrides, grid and
    # runs pass through untouched, so a `${...}` in them is resolved inside each run's experiment config
    scalars = {k: v for k, v in doc.items() if k not in ("overrides", "grid", "runs")}
    try:
        scalars = OmegaConf.to_container(OmegaConf.create(scalars), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {getattr(e, 'full_key', '') or ''}: {str(e).splitlines()[0]}") from None

    name = str(scalars["name"])
    if not RUN_NAME.match(name.replace("/", "_")):
        raise ConfigError(f"{path}: name: {name!r} must be letters, digits and ._+- (it names directories)")
    launcher = scalars.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"{path}: launcher: {launcher!r} is not one of {list(LAUNCHERS)}")
    ints = {}
    for key in ("nproc_per_node", "nnodes"):
        v = scalars.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{path}: {key}: must be a positive integer, got {v!r}")
        ints[key] = v
    stage = scalars.get("stage")
    if stage is not None and stage not in (1, 2, 3):
        raise ConfigError(f"{path}: stage: must be 1, 2 or 3, got {stage!r}")
    ds = scalars.get("deepspeed_config")
    if ds is not None:
        ds = str(_find_file("deepspeed_config", str(ds), path))

    overrides = doc.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{path}: overrides: must be a list of key=value strings, got {overrides!r}")
    grid = doc.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid: must map config keys to lists of values, got {type(grid).__name__}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}: must be a non-empty list of values, got {values!r}")
    runs = doc.get("runs") or []
    if not isinstance(runs, list):
        raise ConfigError(f"{path}: runs: must be a list of {{name, overrides}}, got {type(runs).__name__}")
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or set(run) - {"name", "overrides"}:
            raise ConfigError(f"{path}: runs[{i}]: must be a mapping with `name` and `overrides`, got {run!r}")
        ov = run.get("overrides") or []
        if not isinstance(ov, list) or not all(isinstance(o, str) and "=" in o for o in ov):
            raise ConfigError(f"{path}: runs[{i}].overrides: must be a list of key=value strings, got {ov!r}")
    return SweepConfig(path=path, name=name, experiment=_find_file("experiment", str(scalars["experiment"]), path),
                       output_dir=Path(str(scalars["output_dir"])), overrides=list(overrides), grid=dict(grid),
                       runs=list(runs), launcher=launcher, nproc_per_node=ints["nproc_per_node"],
                       nnodes=ints["nnodes"], deepspeed_config=ds, stage=stage)


# ---------------------------------------------------------------- expansion and names

def format_value(value: Any) -> str:
    """A grid value as the right-hand side of a `key=value` override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    try:
        plain = yaml.safe_load(text) == text and "\n" not in text and "," not in text
    except yaml.YAMLError:
        plain = False
    return text if plain else "'" + text.replace("'", "''") + "'"


def _name_value(value: Any) -> str:
    if isinstance(value, list):
        text = "_".join(_name_value(v) for v in value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")


def _name_part(label: str, value: Any) -> str:
    v = _name_value(value)
    return f"{label}{v}" if re.match(r"^[-+.0-9]", v) else f"{label}_{v}"


def _labels(keys: Sequence[str]) -> dict[str, str]:
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k.replace(".", "_")) for k, leaf in zip(keys, leaves)}


def _fit(name: str, overrides: Sequence[str]) -> str:
    name = name.strip("._-") or "run"
    if len(name) > MAX_NAME:
        digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name


def _plan(sweep: SweepConfig) -> list[tuple[str, list[str], dict]]:
    """(name, the run's own overrides, what varies) for every run, grid first, then `runs`."""
    plan = []
    if sweep.grid:
        keys = list(sweep.grid)
        varying = [k for k in keys if len(sweep.grid[k]) > 1] or keys
        labels = _labels(keys)  # over every grid key, so `seed0` never hides which seed it is
        for values in itertools.product(*(sweep.grid[k] for k in keys)):
            point = dict(zip(keys, values))
            own = [f"{k}={format_value(v)}" for k, v in point.items()]
            name = "-".join(_name_part(labels[k], point[k]) for k in varying)
            plan.append((_fit(name, own), own, {k: point[k] for k in varying}))
    for i, run in enumerate(sweep.runs):
        own = list(run.get("overrides") or [])
        if run.get("name") is not None:
            name = str(run["name"])
            if not RUN_NAME.match(name):
                raise ConfigError(f"{sweep.path}: runs[{i}].name: {name!r} must start with a letter or digit "
                                  "and hold only letters, digits and ._+- (it names a directory)")
        else:
            pairs = [o.split("=", 1) for o in own]
            labels = _labels([k for k, _ in pairs])
            name = _fit("-".join(_name_part(labels[k], v) for k, v in pairs) or f"run{i}", own)
        plan.append((name, own, {o.split("=", 1)[0]: o.split("=", 1)[1] for o in own}))
    if not plan:
        plan.append(("base", [], {}))
    seen: dict[str, int] = {}
    for i, (name, own, _) in enumerate(plan):
        if name in seen:
            raise ConfigError(f"{sweep.path}: two runs are named {name!r} (runs {seen[name]} and {i} of the expansion, "
                              f"overrides {plan[seen[name]][1]} and {own}); give them distinct names")
        seen[name] = i
    return plan


def expand_sweep(sweep: str | Path | SweepConfig, extra_overrides: Sequence[str] = ()) -> list[SweepRun]:
    """Every run of the sweep with its overrides and resolved config; any invalid run raises ConfigError
    naming the run, the key and the sweep file, before anything is written."""
    if not isinstance(sweep, SweepConfig):
        sweep = load_sweep(sweep)
    for text in [*sweep.overrides, *extra_overrides]:
        if text.split("=", 1)[0].strip() in ("output_dir", "name"):
            raise ConfigError(f"{sweep.path}: override `{text}`: a sweep sets each run's name and output_dir "
                              "itself; set the sweep's `name` or `output_dir` (or --output-dir) instead")
    runs = []
    for name, own, varying in _plan(sweep):
        for text in own:
            if text.split("=", 1)[0].strip() in ("output_dir", "name"):
                raise ConfigError(f"{sweep.path}: run {name!r}: override `{text}`: a sweep sets each run's name "
                                  "and output_dir itself")
        out = sweep.output_dir / name
        overrides = [*sweep.overrides, *own, *extra_overrides, f"name={sweep.name}/{name}", f"output_dir={out}"]
        try:
            tree, _ = load_config(sweep.experiment, overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep {sweep.path}: run {name!r}: {e}") from None
        runs.append(SweepRun(name=name, output_dir=out, overrides=overrides, varying=varying, tree=tree))
    return runs


# ---------------------------------------------------------------- commands, launch lines, manifest

class _Shell(str):
    """A launch-line word written as is (a `"$VAR"` the node's environment fills in), never quoted."""


def run_command(sweep: SweepConfig, run: SweepRun, python: str = "python") -> list[str]:
    """The command line of one run, as words; `_Shell` words are environment references for a cluster node."""
    if sweep.launcher == "local":
        return [python, "-m", "reasonedit", "run", str(sweep.experiment), *run.overrides]
    if sweep.stage is None:
        raise ConfigError(f"{sweep.path}: stage: a {sweep.launcher} sweep launches one training stage; set stage: 1, 2 or 3")
    train = ["reasonedit", "train", "--config", str(sweep.experiment), "--stage", str(sweep.stage)]
    multi = sweep.nnodes > 1
    rendezvous = [_Shell('"${MASTER_ADDR:?set MASTER_ADDR to node 0}"'), _Shell('"${MASTER_PORT:-29500}"')]
    if sweep.launcher == "torchrun":
        where = (["--node_rank", _Shell('"${NODE_RANK:?set NODE_RANK on each node}"'),
                  "--master_addr", rendezvous[0], "--master_port", rendezvous[1]] if multi else ["--standalone"])
        return ["torchrun", "--nnodes", str(sweep.nnodes), "--nproc_per_node", str(sweep.nproc_per_node), *where,
                "-m", *train, *run.overrides]
    ds = sweep.deepspeed_config or "launch/deepspeed/zero2.json"
    where = (["--hostfile", _Shell('"${HOSTFILE:-/job/hostfile}"'), "--master_addr", rendezvous[0],
              "--master_port", rendezvous[1]] if multi else [])
    # --no_local_rank: the train command reads LOCAL_RANK from the environment, not a --local_rank flag
    return ["deepspeed", "--num_nodes", str(sweep.nnodes), "--num_gpus", str(sweep.nproc_per_node), *where,
            "--no_local_rank", "--module", *train, "--deepspeed", ds, *run.overrides]


def _join(words: Sequence[str]) -> str:
    return " ".join(w if isinstance(w, _Shell) else shlex.quote(w) for w in words)


def emit_launch_lines(sweep: SweepConfig, runs: Sequence[SweepRun]) -> list[str]:
    """One shell line per run, for the sweep's launcher."""
    return [_join(run_command(sweep, run)) for run in runs]


def write_launch_script(sweep: SweepConfig, runs: Sequence[SweepRun]) -> Path:
    """`<sweep out>/launch.sh`: the runs one after another; on a multi-node job run it on every node."""
    lines = emit_launch_lines(sweep, runs)
    text = ["#!/usr/bin/env bash",
            f"# sweep {sweep.name} from {sweep.path}: {len(runs)} runs with {sweep.launcher} "
            f"({sweep.nnodes} node(s) x {sweep.nproc_per_node} process(es))",
            f"# {_where_to_run(sweep)}",
            "# paths are relative to the directory the sweep was expanded in; set REASONEDIT_ROOT to move it",
            f"ROOT=${{REASONEDIT_ROOT:-{shlex.quote(str(Path.cwd().resolve()))}}}",
            'cd "$ROOT" || exit 1', ""]
    text += lines
    path = sweep.output_dir / LAUNCH_SCRIPT
    atomic_write_text(path, "\n".join(text) + "\n")
    path.chmod(0o755)
    return path


def _where_to_run(sweep: SweepConfig) -> str:
    if sweep.nnodes == 1:
        return "run it on the machine that trains; the runs go one after another"
    if sweep.launcher == "torchrun":
        return "run it on every node of the job, with NODE_RANK, MASTER_ADDR (and MASTER_PORT) set"
    return "run it on node 0 with HOSTFILE and MASTER_ADDR set; deepspeed reaches the other nodes over ssh"


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); delete it to start the sweep afresh") from None


def _write_manifest(sweep: SweepConfig, records: list[dict]) -> None:
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
    _write_manifest(sweep, records)
    return records


# ---------------------------------------------------------------- running

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
        _write_manifest(sweep, records)
        if on_event:
            on_event("start", rec)
        started = time.perf_counter()
        try:
            with open(run.log_path, "w") as logf:
                logf.write(f"$ {_join(commands[run.name])}\n")
                logf.flush()
                code = subprocess.run(commands[run.name], stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL).returncode
        except BaseException:
            rec.update(status="interrupted", seconds=round(time.perf_counter() - started, 3))
            _write_manifest(sweep, records)
            raise
        rec.update(status="done" if code == 0 else "failed", returncode=code,
                   seconds=round(time.perf_counter() - started, 3))
        _write_manifest(sweep, records)
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


# ---------------------------------------------------------------- command line

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
        lines = emit_launch_lines(sweep, runs)
        prepare_sweep(sweep, runs)
        script = write_launch_script(sweep, runs)
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


__all__ = ["SweepConfig", "SweepResult", "SweepRun", "add_arguments", "emit_launch_lines", "emit_sweep",
           "expand_sweep", "format_value", "load_sweep", "main", "prepare_sweep", "run", "run_command", "run_sweep",
           "write_launch_script"]

if __name__ == "__main__":
    sys.exit(main())
