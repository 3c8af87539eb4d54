"""Webdataset tar shards: deterministic writing, typed reading.

Shards are written byte-reproducibly (fixed mtime, owner and mode; members in a fixed order), so
the same records always give the same bytes, and each shard appears under its final name only
once it is complete. A record's key names its tar members, so it must be a plain name (`samples.key_problem`):
a member `../../x.json` in a shard we write would land outside the folder of whoever extracts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds

from reasonedit.paths import safe_name

from ..publish import staged_folder
from .samples import Record, SchemaError, record_from_wds

MANIFEST = "manifest.json"


class ShardWriter:
    """Writes records into `<dir>/<prefix>-00000.tar`, ... with at most `shard_size` records each."""

    def __init__(self, directory: Path, prefix: str, shard_size: int = 1000):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        safe_name(prefix, "shard prefix")
        self.directory, self.prefix, self.shard_size = Path(directory), prefix, shard_size
        self.shards: list[dict] = []  # {"path", "count", "sha256"} of each finished shard
        self._stream = self._writer = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.tar"
        self._final = self.directory / name
        self._tmp = self.directory / f".{name}.tmp"
        self._stream = open(self._tmp, "wb")
        self._writer = wds.TarWriter(self._stream, user="", group="", mode=0o644, encoder=False, mtime=0)
        self._count = 0

    def write(self, record: Record) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(record.to_wds())
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()  # ends the tar; the stream is ours to close
        self._stream.close()
        digest = hashlib.sha256(self._tmp.read_bytes()).hexdigest()
        os.replace(self._tmp, self._final)
        self.shards.append({"path": self._final.name, "count": self._count, "sha256": digest})
        self._writer = self._stream = None

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written; finished shards are the caller's to remove."""
        if self._stream is not None:
            try:
                self._writer.close()
            except OSError:
                pass
            self._stream.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = self._stream = None


class DatasetDirError(ValueError):
    """The output directory of a dataset cannot be used."""


def check_apart(out: str | Path, inputs: Iterable[tuple[str, str | Path]]) -> None:
    """Refuse an output folder that is, holds or lies inside one of `inputs` ((what it is, its path) pairs):
    replacing it (--overwrite) would delete that input, and a dataset inside an input folder is mixed with it."""
    out = Path(out)
    mine = out.resolve()
    for what, path in inputs:
        theirs = Path(path).resolve()
        if theirs == mine:
            raise DatasetDirError(f"--out {out} is {what} {path}: write the dataset to another folder")
        if mine in theirs.parents:
            raise DatasetDirError(f"--out {out} holds {what} {path}: replacing it (--overwrite) would delete it; "
                                  "write the dataset to another folder")
        if theirs in mine.parents:
            raise DatasetDirError(f"--out {out} lies inside {what} {path}: the dataset would be mixed with its "
                                  "input; write it to another folder")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a symlink or a file, or a non-empty directory unless `overwrite`."""
    if out.is_symlink():  # the finished dataset would replace the link, not fill the folder it points to
        raise DatasetDirError(f"--out {out} is a symbolic link (to {os.readlink(out)}); nothing was written: pass "
                              f"the folder it points to ({out.resolve()}) as --out, or remove the link")
    if out.exists() and not out.is_dir():
        raise DatasetDirError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DatasetDirError(f"--out {out} is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def building_dataset(out: str | Path, overwrite: bool = False,
                     inputs: Iterable[tuple[str, str | Path]] = ()) -> Iterator[Path]:
    """Yield a hidden sibling directory to build a dataset in; it replaces `out` only if the block
    completes (with its manifest written by `write_manifest`), and is removed if anything fails. `out` must
    lie apart from `inputs` ((what it is, its path) pairs; see `check_apart`)."""
    out = Path(out)
    check_apart(out, inputs)
    _check_out(out, overwrite)
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(staged_folder(out))
        except OSError as e:  # the parent cannot be made or written to
            raise DatasetDirError(f"cannot write the dataset to {out}: {e.strerror or e}") from None
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"dataset built for {out} has no {MANIFEST}; call write_manifest first")


def write_manifest(directory: Path, manifest: dict) -> None:
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_records(records: Iterable[Record], directory: Path, prefix: str, shard_size: int = 1000) -> list[dict]:
    writer = ShardWriter(directory, prefix, shard_size)
    try:
        for r in records:
            writer.write(r)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def shard_paths(path: str | Path, split: str | None = None, kind: str | None = None) -> list[Path]:
    """The shards of a dataset directory (via its manifest), of a folder of tars, or one tar."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}: run `reasonedit data synth --out {path}` first")
    if path.is_file():
        return [path]
    manifest = path / MANIFEST
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        out = []
        for s, kinds in doc["shards"].items():
            if split is not None and s != split:
                continue
            for k, shards in kinds.items():
                if kind is None or k == kind:
                    out += [path / s / sh["path"] for sh in shards]
        if split is not None and split not in doc["shards"]:
            raise FileNotFoundError(f"{manifest}: no split {split!r}; it has {list(doc['shards'])}")
        return out
    tars = sorted(path.rglob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{path} holds no manifest.json and no .tar shards")
    return tars


def holds(path: str | Path, split: str, kind: str) -> bool:
    """Whether a dataset directory's manifest lists shards of `kind` in `split` (a folder of tars or a tar
    without a manifest: True, its records are filtered as they are read)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return path.exists()
    return bool(json.loads(manifest.read_text())["shards"].get(split, {}).get(kind))


def read_records(path: str | Path, split: str | None = None, kind: str | None = None) -> Iterator[Record]:
    """Every record of a dataset in stored order, decoded into its typed kind."""
    for shard in shard_paths(path, split, kind):
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            # webdataset adds bookkeeping keys (__url__, __local_path__) next to __key__
            fields = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            record = record_from_wds(fields, where=str(shard))
            if kind is not None and record.KIND != kind:
                raise SchemaError(f"{shard}: record {record.key} is a {record.KIND}, expected {kind}")
            yield record


__all__ = ["DatasetDirError", "MANIFEST", "ShardWriter", "building_dataset", "check_apart", "holds", "write_manifest",
           "read_records", "shard_paths", "write_records"]
