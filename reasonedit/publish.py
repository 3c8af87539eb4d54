"""Write a folder or a file so that it appears whole or not at all: build it in a hidden staging folder or
temporary file beside its destination, then rename it into place (replacing an older version only after the
new one is whole)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it becomes `path`, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        staging.chmod(0o755)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a hidden temporary file beside `path`, then rename it into place."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a hidden temporary file beside `path`, then rename it into place."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "staged_folder"]
