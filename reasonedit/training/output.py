"""The stage's output folder: checked before anything heavy runs, and its write faults made one clear error.

`prepare_output` runs first in a stage: it checks that every rank can write the stage folder and its
checkpoints, tidies what an interrupted save left there (the hidden names of `reasonedit.publish` and of
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

from reasonedit.publish import OutputError, clear_interrupted

from . import checkpoint as ckpt
from .distributed import World, barrier

log = logging.getLogger("reasonedit.train")
ADVICE = "free space there, fix its permissions or pass another --out"


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


def prepare_output(out: Path, checkpoints: Path, world: World, name: str) -> None:
    """Check that this rank can write `out` and `checkpoints`; on the main rank tidy what an interrupted save
    left in them and log the free space. Every rank joins."""
    for folder in (out, checkpoints):
        check_writable(folder)
    barrier()  # every rank's write check is done (its probe file is removed) before the main rank tidies
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


__all__ = ["OutputError", "check_writable", "prepare_output", "writing"]
