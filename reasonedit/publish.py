"""Write a folder or a file so that it appears whole or not at all: build it in a hidden staging folder or
temporary file beside its destination, then rename it into place (replacing an older version only after the
new one is whole). `clear_interrupted` tidies what a killed writer left behind.

Hidden names, beside the destination X: `.X.<random>.partial` (a folder being built), `.X.old-<pid>` (the
older version while it is swapped out), `.X.<random>.tmp` (a file being written).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

_PARTIAL = re.compile(r"^\..+\.partial$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-\d+$")
_TMP = re.compile(r"^\..+\.tmp$")


class OutputError(RuntimeError):
    """An output file or folder could not be written; the message names the path and the OS error."""


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it becomes `path`, on an exception it is removed. A symlink
    at `path` is refused (OutputError) before anything is written: the folder would replace the link, not fill
    what it points to. keep_existing: a `path` that exists when the staging folder is done (another process
    published the same content first) is kept and the staging folder dropped, so processes may race safely."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); nothing was written: remove the link "
                          "or write to the folder it points to")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if keep_existing:
            try:
                os.rename(staging, path)
            except OSError:
                if not path.exists():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # the other process's copy stands
            return
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a hidden temporary file beside `path` ("wb", or "w" for UTF-8); it becomes `path` on a clean exit."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the finished file is an ordinary one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def clear_interrupted(folder: str | os.PathLike) -> list[str]:
    """Tidy what writers killed mid-write left in `folder` (not below it): staging folders and temporary files
    are removed; an older version swapped out when the kill came (`.X.old-PID`) is put back as `X` when `X` is
    gone, else removed; a symlink under one of these hidden names is removed, never followed nor put back.
    Returns one line per entry handled, for the log."""
    folder, done = Path(folder), []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        old = _OLD.match(entry.name)
        if entry.is_symlink() and (old or _PARTIAL.match(entry.name) or _TMP.match(entry.name)):
            entry.unlink()  # never ours, and never put back: it would point an output outside the folder
            done.append(f"removed the symbolic link {entry} (a writer's hidden name; none of ours is a link)")
        elif entry.is_dir() and old and not (folder / old["name"]).exists():
            os.replace(entry, folder / old["name"])
            done.append(f"put back {folder / old['name']} from {entry.name}, left by an interrupted save")
        elif entry.is_dir() and (old or _PARTIAL.match(entry.name)):
            shutil.rmtree(entry)
            done.append(f"removed {entry}, left by an interrupted save")
        elif entry.is_file() and _TMP.match(entry.name):
            entry.unlink()
            done.append(f"removed {entry}, left by an interrupted write")
    return done


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a hidden temporary file beside `path`, then rename it into place."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a hidden temporary file beside `path`, then rename it into place."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


__all__ = ["OutputError", "atomic_file", "atomic_write_bytes", "atomic_write_text", "clear_interrupted",
           "staged_folder"]
