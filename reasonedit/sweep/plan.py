"""A sweep file read and checked, and expanded into named runs with their resolved configs."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import PACKAGE_CONFIGS, ConfigError, load_config, read_yaml_mapping



PACKAGE_ROOT = PACKAGE_CONFIGS.parent  # configs/... paths resolve against the package (a checkout or an install)
LAUNCHERS = ("local", "torchrun", "deepspeed")
MANIFEST = "sweep.json"
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


__all__ = ["LAUNCHERS", "MANIFEST", "SweepConfig", "SweepRun", "expand_sweep", "format_value", "load_sweep"]
