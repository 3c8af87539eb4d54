"""The command line of each run of a sweep, for its launcher (local, torchrun, deepspeed), and `launch.sh`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence


from ..config import ConfigError
from ..publish import atomic_write_text

from .plan import SweepConfig, SweepRun

LAUNCH_SCRIPT = "launch.sh"



class Shell(str):
    """A launch-line word written as is (a `"$VAR"` the node's environment fills in), never quoted."""


def run_command(sweep: SweepConfig, run: SweepRun, python: str = "python") -> list[str]:
    """The command line of one run, as words; `Shell` words are environment references for a cluster node."""
    if sweep.launcher == "local":
        return [python, "-m", "reasonedit", "run", str(sweep.experiment), *run.overrides]
    if sweep.stage is None:
        raise ConfigError(f"{sweep.path}: stage: a {sweep.launcher} sweep launches one training stage; set stage: 1, 2 or 3")
    train = ["reasonedit", "train", "--config", str(sweep.experiment), "--stage", str(sweep.stage)]
    multi = sweep.nnodes > 1
    rendezvous = [Shell('"${MASTER_ADDR:?set MASTER_ADDR to node 0}"'), Shell('"${MASTER_PORT:-29500}"')]
    if sweep.launcher == "torchrun":
        where = (["--node_rank", Shell('"${NODE_RANK:?set NODE_RANK on each node}"'),
                  "--master_addr", rendezvous[0], "--master_port", rendezvous[1]] if multi else ["--standalone"])
        return ["torchrun", "--nnodes", str(sweep.nnodes), "--nproc_per_node", str(sweep.nproc_per_node), *where,
                "-m", *train, *run.overrides]
    ds = sweep.deepspeed_config or "launch/deepspeed/zero2.json"
    where = (["--hostfile", Shell('"${HOSTFILE:-/job/hostfile}"'), "--master_addr", rendezvous[0],
              "--master_port", rendezvous[1]] if multi else [])
    # --no_local_rank: the train command reads LOCAL_RANK from the environment, not a --local_rank flag
    return ["deepspeed", "--num_nodes", str(sweep.nnodes), "--num_gpus", str(sweep.nproc_per_node), *where,
            "--no_local_rank", "--module", *train, "--deepspeed", ds, *run.overrides]


def join_words(words: Sequence[str]) -> str:
    return " ".join(w if isinstance(w, Shell) else shlex.quote(w) for w in words)


def emit_launch_lines(sweep: SweepConfig, runs: Sequence[SweepRun]) -> list[str]:
    """One shell line per run, for the sweep's launcher."""
    return [join_words(run_command(sweep, run)) for run in runs]


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


__all__ = ["LAUNCH_SCRIPT", "Shell", "emit_launch_lines", "join_words", "run_command", "write_launch_script"]
