"""The stage's output folder: checked before anything heavy runs, and its write faults made one clear error.

`prepare_output` runs first in a stage: it proves that every path the stage writes (`STAGE_OUTPUTS` in the
stage folder, and the experiment's latent cache) resolves inside its folder, so that a symlink left there
cannot send a checkpoint, a cache entry or a log outside it; checks that every rank can write the stage folder
and its checkpoints, tidies what an interrupted save left there (the hidden names of `reasonedit.publish` and of
`training.checkpoint`), and logs the free space. `writing` turns an OSError met while saving into an
`OutputError` naming the path and the OS error, which the CLI prints as one line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from reasonedit.paths import OutsidePathError, inside
from reasonedit.publish import OutputError, clear_interrupted

from . import checkpoint as ckpt
from .distributed import World, barrier, gather_objects

log = logging.getLogger("reasonedit.train")
ADVICE = "free space there, fix its permissions or pass another --out"
# what a stage writes in its folder (wandb: when WANDB_DIR is not set); each must resolve inside the folder
STAGE_OUTPUTS = ("checkpoints", "model", "model_ema", "condition_cache", "tensorboard", "wandb", "history.json",
                 "evals.json", "stage.json")
LATENT_CACHE = "latent_cache"  # in the experiment's output_dir, shared by stages 2 and 3


def _reason(e: OSError) -> str:
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    return f"{e.strerror or e}{code}"


def check_writable(folder: Path) -> None:
    """Make `folder` if needed and write, then remove, a small file in it; an OutputError if that fails."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file, not a folder: remove it or pass another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")  # a `.tmp`: tidied if left
        try:
            os.write(fd, b"reasonedit")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable: {_reason(e)}"
                          f"{f' at {e.filename}' if e.filename and str(e.filename) != str(folder) else ''}; "
                          f"{ADVICE}") from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_inside(out: Path, experiment: Path | None = None) -> None:
    """Prove that each of `STAGE_OUTPUTS` in `out`, and `experiment`/latent_cache when given, resolves inside its
    folder (symlinks followed); an OutsidePathError naming the path otherwise, before anything is written."""
    pairs = [(out, out / name) for name in STAGE_OUTPUTS]
    if experiment is not None:
        pairs.append((experiment, experiment / LATENT_CACHE))
    for folder, path in pairs:
        inside(folder, path)


def prepare_output(out: Path, checkpoints: Path, world: World, name: str, experiment: Path | None = None) -> None:
    """Prove the stage's output paths inside `out` (and the latent cache inside `experiment`, the output_dir, when
    the stage uses one); check that this rank can write `out` and `checkpoints`; on the main rank tidy what an
    interrupted save left in them and log the free space. Every rank joins."""
    problem = None
    try:
        check_inside(out, experiment)  # first: the write check itself must not write through a link
        for folder in (out, checkpoints):
            check_writable(folder)
    except (OutputError, OutsidePathError) as e:
        problem = e
    # every rank learns whether any rank failed (a rank alone at a barrier would wait for ever), and all stop;
    # every rank's write check is also done (its probe file removed) before the main rank tidies
    failed = [(rank, message) for rank, message in enumerate(gather_objects(None if problem is None else str(problem)))
              if message is not None]
    if problem is not None:
        raise problem
    if failed:
        rank, message = failed[0]
        raise OutputError(f"rank {rank} cannot use the output folder: {message}")
    if world.is_main:
        for line in clear_interrupted(out) + ckpt.clear_interrupted(checkpoints):
            log.info("%s: %s", name, line)
        log.info("%s: output %s is writable; %s free there", name, out, _size(shutil.disk_usage(out).free))
    barrier()


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an OSError in the block into an OutputError: `what`, the path and the OS error, in one line."""
    try:
        yield
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise OutputError(f"{what}: cannot write{where}: {_reason(e)}; {ADVICE}") from e


__all__ = ["LATENT_CACHE", "OutputError", "STAGE_OUTPUTS", "check_inside", "check_writable", "prepare_output",
           "writing"]
