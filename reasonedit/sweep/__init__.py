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

from .cli import add_arguments, main, run
from .launch import emit_launch_lines, run_command, write_launch_script
from .plan import SweepConfig, SweepRun, expand_sweep, format_value, load_sweep
from .runner import SweepResult, emit_sweep, prepare_sweep, run_sweep

__all__ = ["SweepConfig", "SweepResult", "SweepRun", "add_arguments", "emit_launch_lines", "emit_sweep",
           "expand_sweep", "format_value", "load_sweep", "main", "prepare_sweep", "run", "run_command", "run_sweep",
           "write_launch_script"]
