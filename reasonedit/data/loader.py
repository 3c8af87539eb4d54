"""Streaming loader over webdataset tar shards: split across ranks and workers, mixed, resumable.

Everything below is a pure function of the seed, the dataset specs, the number of global workers
and the loader state, so a resumed run sees exactly the samples the uninterrupted run would have.

**Global workers.** A rank runs `W = max(1, num_workers)` DataLoader workers; global worker
`g = rank * W + worker` of `G = world_size * W` reads, for each dataset and each of its epochs,
the shards at positions `g, g + G, g + 2G, ...` of that epoch's shard permutation. Every shard
belongs to exactly one global worker per epoch, so each record is read exactly once per epoch.
When the shards do not divide evenly, workers (and so ranks) get unequal numbers of shards and
records: nothing is dropped or repeated. `StreamingLoader.samples_per_rank(epoch)` tells a
trainer each rank's record count (from the manifest), and a finite loader simply ends sooner
on a rank with fewer records; the trainer must stop all ranks together (e.g. all-reduce an
"exhausted" flag). An infinite loader (`epochs=None`, the training mode: stages run by step
count) never ends, and requires every dataset to have at least `G` shards so that every worker
can draw from every dataset.

**Order inside a worker.** A worker reads its shards of the epoch in order, sequentially, in
blocks of `shuffle_buffer` records (a block may span shards), and yields each block in a random
permutation: a shuffle buffer whose contents are fixed by a byte position, so the state stays a
few integers. It holds `shuffle_buffer` encoded records per worker and dataset; a record's images
are decoded only when it is yielded. The main process sees the workers' samples in the
DataLoader's in-order round robin, so its order is reproducible too.

**Mixing.** Each worker draws the dataset of its next sample with probability proportional to
the specs' weights (draw `i` of global worker `g` is a function of `(seed, g, i)`), then takes
that dataset's next good record, so corrupt records never skew the mix. Each dataset cycles
through its own epochs, and "epoch" is per dataset and per worker: a worker that finishes its
part of an epoch starts its part of the next one. With `epochs=E`, a dataset leaves the worker's
mix after `E` epochs and the remaining weights renormalise; the pass ends when every dataset is done.

**State and resume.** A worker's state is, per dataset: the epoch, the byte position `(shard,
offset)` where the current block starts, and how many of the block's records it has yielded
(plus counters). Each sample carries its worker's state after it; the main process keeps the
latest per worker and which worker the DataLoader's round robin serves next, which is the
loader state. A resume opens only the shards of each current block, re-reads at most
`shuffle_buffer` raw records per (worker, dataset) from the block start and decodes none of the
records already yielded; earlier shards are never opened. It needs the same seed, datasets,
shuffle_buffer, world_size and workers per rank (0 and 1 worker are interchangeable), and says so.

**Corrupt data.** Bad JSON, missing or wrongly typed fields, undecodable images, missing image
members, truncated or garbled tar members and unreadable shards are skipped and counted by
reason (`stats()`), and logged (the first few per reason and worker at WARNING, then DEBUG). The
count is of records, each once per time it is read (once per epoch), by the manifest's record count
of each shard (`manifest.json`'s `count`):
- a bad record counts 1, however many of its members are bad (a repeated member skips the record's
  remaining members with it: `duplicate_member`);
- a truncated or garbled tar ends that shard, since nothing after the damage can be located safely:
  the record it was in and every record the manifest lists after it count (`truncated`, `bad_tar`,
  `read_error`; at least 1). A shard cut at a record boundary ends without tar's end-of-archive
  marker: the records the manifest lists after the cut count as `truncated`; one that ends at its
  marker short of its count, as `missing_records`;
- an unreadable shard counts every record the manifest lists for it (`unreadable_shard`).
Without a manifest (a folder of tars, one tar) nobody knows how many records a broken shard held or
a truncation lost: the loader then counts what it saw (the damaged record, if any) and the shard
once in `LoaderStats.uncounted`, shards of unknown size by reason, never a guessed number of records.
An infinite stream raises `LoaderError` rather than spin when a worker finds no good record of a
dataset in max(20, shards) epochs in a row. `read_shard` reads one shard by the same rules (what
`reasonedit data verify` counts).

Tar shards are read with `tarfile` directly rather than through `webdataset`: resuming needs the
byte offset of each record (to seek straight to a block start), and a damaged member must become
one counted skip rather than a pipeline error. Records are grouped as webdataset groups them:
consecutive members sharing the name before the first dot of their basename.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
import tarfile
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import Record, SchemaError, record_from_wds
from .shards import MANIFEST, holds, shard_paths

log = logging.getLogger(__name__)

STATE_FORMAT = 1
_LOGGED_PER_REASON = 5  # per worker and dataset; later skips of the same reason go to DEBUG
_EMPTY_EPOCHS = 20  # at least this many epochs without a good record before an infinite stream gives up
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split
_NUL_BLOCK = bytes(tarfile.BLOCKSIZE)

# SchemaError messages from samples.py, mapped to a skip reason (first match wins).
_SCHEMA_REASONS = (
    ("missing image field", "missing_image"),
    ("cannot be decoded", "bad_image"),
    ("missing field 'json'", "missing_json"),
    ("not valid JSON", "bad_json"),
    ("not a valid JSON object", "bad_json"),
    ("unknown kind", "unknown_kind"),
    ("schema_version", "schema_version"),
    ("missing field", "missing_field"),
    ("expected true or false", "wrong_type"),
    ("field 'restart' is true but", "inconsistent_fields"),
)


class LoaderError(ValueError):
    """A loader that cannot be built or cannot go on: names the dataset, shard or setting."""


class LoaderStateError(LoaderError):
    """A saved loader state that does not fit this loader: names what differs."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a mix: a dataset directory, a folder of tars or one tar, and its weight."""

    name: str
    path: str | Path
    split: str | None = None
    kind: str | None = None  # keep only shards (via the manifest) and records of this kind
    weight: float = 1.0


@dataclass
class LoadedSample:
    """A decoded record and where it came from; `prepared`, the loader's `transform` of the record, computed in the
    worker that read it (`failure`: what the transform raised there, raised again by `result()` in the caller)."""

    record: Record
    dataset: str
    key: str
    shard: str  # the shard's path relative to its dataset
    epoch: int  # the dataset's epoch in the worker that read it
    worker: int  # the global worker: rank * workers_per_rank + worker
    prepared: Any = None
    failure: BaseException | None = None

    def result(self) -> Any:
        """The transform's output, or the exception it raised in the worker."""
        if self.failure is not None:
            raise self.failure
        return self.prepared


@dataclass(frozen=True)
class Skipped:
    """Records the loader skips at one place: why, how many (by the module's counting rule), and where."""

    reason: str
    records: int  # 0 for an unreadable shard of unknown size
    detail: str  # names the shard and, where known, the record
    unknown_more: bool = False  # records after it were lost and no manifest says how many


@dataclass
class LoaderStats:
    """Samples yielded and records skipped (by reason) per dataset, summed over workers; `uncounted`: shards whose
    lost records no manifest counts (per dataset and reason, in shards, not records)."""

    yielded: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    uncounted: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        """Records skipped, all datasets and reasons (shards of unknown size add nothing: see `uncounted`)."""
        return sum(sum(r.values()) for r in self.skipped.values())

    @property
    def total_uncounted(self) -> int:
        return sum(sum(r.values()) for r in self.uncounted.values())

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reasons in self.skipped.values():
            for reason, n in reasons.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def add(self, dataset: str, skip: Skipped) -> None:
        """Count one skip of `dataset` by the module's rule."""
        _tally(self.skipped.setdefault(dataset, {}), self.uncounted.setdefault(dataset, {}), skip)

    def merge(self, other: LoaderStats) -> LoaderStats:
        """The sum of two stats (e.g. the loaders of one rank's data streams)."""
        out = LoaderStats(dict(self.yielded), {k: dict(v) for k, v in self.skipped.items()},
                          {k: dict(v) for k, v in self.uncounted.items()})
        for name, n in other.yielded.items():
            out.yielded[name] = out.yielded.get(name, 0) + n
        for mine, theirs in ((out.skipped, other.skipped), (out.uncounted, other.uncounted)):
            for name, reasons in theirs.items():
                into = mine.setdefault(name, {})
                for reason, n in reasons.items():
                    into[reason] = into.get(reason, 0) + n
        return out

    def skips_of(self, name: str) -> str:
        """`dataset`'s skips by reason, e.g. "truncated 3, bad_json 1 + 1 shard of unknown size (unreadable_shard)"."""
        text = ", ".join(f"{r} {c}" for r, c in sorted(self.skipped.get(name, {}).items()) if c) or "none"
        unknown = {r: c for r, c in sorted(self.uncounted.get(name, {}).items()) if c}
        if unknown:
            n = sum(unknown.values())
            text += (f" + {n} shard{'s' if n > 1 else ''} of unknown size ("
                     + ", ".join(f"{r} {c}" if c > 1 else r for r, c in unknown.items()) + ")")
        return text

    def summary(self) -> str:
        """One line: per dataset, the samples yielded and the records skipped by reason."""
        names = list(dict.fromkeys([*self.yielded, *self.skipped, *self.uncounted]))
        parts = []
        for name in names:
            skipped, why = sum(self.skipped.get(name, {}).values()), self.skips_of(name)
            parts.append(f"{name}: {self.yielded.get(name, 0)} yielded, skipped {skipped} record{'s' * (skipped != 1)}"
                         + ("" if why == "none" else f" ({why})"))
        return "; ".join(parts)

    def table(self, read: str = "yielded") -> str:
        """Per dataset: the records `read`, the records skipped, and why; then the totals."""
        names = list(dict.fromkeys([*self.yielded, *self.skipped, *self.uncounted]))
        width = max([len(n) for n in names] + [7])
        lines = [f"{'dataset':<{width}} {read:>8} {'skipped':>8}  why"]
        for name in names:
            lines.append(f"{name:<{width}} {self.yielded.get(name, 0):>8} {sum(self.skipped.get(name, {}).values()):>8}"
                         f"  {self.skips_of(name)}")
        lines.append(f"{'total':<{width}} {sum(self.yielded.values()):>8} {self.total_skipped:>8}"
                     + (f"  + {self.total_uncounted} shard(s) of unknown size" if self.total_uncounted else ""))
        return "\n".join(lines)


def _tally(skipped: dict[str, int], uncounted: dict[str, int], skip: Skipped) -> None:
    if skip.records:
        skipped[skip.reason] = skipped.get(skip.reason, 0) + skip.records
    if skip.unknown_more:
        uncounted[skip.reason] = uncounted.get(skip.reason, 0) + 1


# ---------------------------------------------------------------------------------------------
# Datasets resolved to shard lists


@dataclass(frozen=True)
class _DatasetPlan:
    """A spec resolved to its shards; what a worker needs, and picklable."""

    name: str
    kind: str | None
    weight: float
    paths: tuple[str, ...]
    names: tuple[str, ...]  # relative to the dataset root, for provenance and the fingerprint
    counts: tuple[int | None, ...]  # records per shard from the manifest, None where unknown

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:16]

    def epoch_shards(self, seed: int, epoch: int, worker: int, workers: int) -> list[int]:
        """Indices of the shards global worker `worker` of `workers` reads in `epoch`."""
        order = list(range(len(self.paths)))
        _rng(seed, "shards", self.name, epoch).shuffle(order)
        return order[worker::workers]


def _plan(spec: DatasetSpec) -> _DatasetPlan:
    if not spec.name:
        raise LoaderError(f"dataset spec for {spec.path}: name must be non-empty")
    if not (spec.weight > 0 and spec.weight < float("inf")):
        raise LoaderError(f"dataset {spec.name!r}: weight must be a positive number, got {spec.weight}")
    root = Path(spec.path)
    paths = shard_paths(root, spec.split, spec.kind)
    if not paths:
        raise LoaderError(f"dataset {spec.name!r}: no shards at {root} for split={spec.split!r}, "
                          f"kind={spec.kind!r}; check the manifest's splits and kinds")
    counts = _manifest_counts(root)
    names = tuple(_relative(p, root) for p in paths)
    return _DatasetPlan(spec.name, spec.kind, float(spec.weight), tuple(str(p) for p in paths), names,
                        tuple(counts.get(n) for n in names))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # root is the tar itself
        return path.name


def _manifest_counts(root: Path) -> dict[str, int]:
    manifest = root / MANIFEST
    if not root.is_dir() or not manifest.exists():
        return {}
    try:
        doc = json.loads(manifest.read_text())
        return {f"{split}/{sh['path']}": int(sh["count"])
                for split, kinds in doc["shards"].items() for shards in kinds.values() for sh in shards}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoaderError(f"{manifest}: cannot read the shard counts ({e!r}); rewrite the dataset") from None


def _rng(*parts: Any) -> random.Random:
    # str seeds go through sha512, so the stream is the same in every process and Python run
    return random.Random("/".join(map(str, ("reasonedit.loader", *parts))))


# ---------------------------------------------------------------------------------------------
# Raw records from tar shards, by byte offset


@dataclass
class _Raw:
    """One record's undecoded members, or the reason it cannot be read and the records that reason stands for."""

    shard: int  # index into the worker's shard list of the epoch
    key: str
    members: dict[str, bytes]
    reason: str | None = None
    detail: str = ""
    records: int = 1  # a damaged shard's last entry stands for the records lost with it (see `_shard_step`)
    unknown_more: bool = False  # records were lost after it and no manifest says how many
    cut: bool = False  # the shard ends right after it without tar's end-of-archive marker: it may lack members


_DAMAGE = ("truncated", "bad_tar", "read_error")  # reasons that end a shard: nothing after them can be located


def _open_tar(path: str) -> tarfile.TarFile:
    return tarfile.open(path, mode="r:")  # reads and checks only the first header


def _read_record(tar: tarfile.TarFile, where: str, shard: int, offset: int) -> tuple[_Raw | None, int | None, bool]:
    """The record whose first header is at `offset`, the next record's offset (None: shard over), and whether the
    shard ended at tar's end-of-archive marker (a shard that ends without it was cut short)."""
    f = tar.fileobj
    key: str | None = None
    members: dict[str, bytes] = {}
    repeated: _Raw | None = None  # a member seen twice: the record is skipped with all its remaining members
    while True:
        f.seek(offset)
        head = f.read(tarfile.BLOCKSIZE)
        if not head or head == _NUL_BLOCK:  # the end-of-archive marker, or EOF without one
            last = _Raw(shard, key, members, cut=not head) if key is not None else None
            return (repeated or last), None, bool(head)
        if len(head) < tarfile.BLOCKSIZE:
            return _Raw(shard, key or "?", members, "truncated",
                        f"{where}: tar header at byte {offset} is cut short (record {key or '?'})"), None, False
        f.seek(offset)
        try:
            info = tarfile.TarInfo.fromtarfile(tar)
        except (tarfile.TarError, UnicodeDecodeError, ValueError) as e:
            return _Raw(shard, key or "?", members, "bad_tar",
                        f"{where}: unreadable tar header at byte {offset} after record {key or '?'} ({e})"), None, False
        end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        match = _KEY_EXT.match(info.name)
        if match and key is not None and match.group(1) != key:
            return repeated or _Raw(shard, key, members), offset, False
        if not info.isreg() or not match:  # directories, links, names without an extension: webdataset skips them
            offset = end
            continue
        key, ext = match.group(1), match.group(2).lower()
        f.seek(info.offset_data)
        data = f.read(info.size)
        if len(data) < info.size:
            cut = f"{where}: record {key}: member {info.name} holds {len(data)} of {info.size} bytes"
            return _Raw(shard, key, members, "truncated", cut), None, False
        if ext in members and repeated is None:
            repeated = _Raw(shard, key, members, "duplicate_member",
                            f"{where}: record {key}: member {info.name} appears twice in a row")
        members[ext] = data
        offset = end


def _shard_step(tar: tarfile.TarFile, where: str, shard: int, offset: int, index: int,
                count: int | None) -> tuple[list[_Raw], int | None]:
    """The shard's record number `index` (its first header at `offset`) and the next record's offset (None: the shard
    is over). At the end every record of the manifest's `count` is accounted for: a damaged last record stands for
    itself and every record after it, and a clean end short of `count` adds one entry standing for the missing ones."""
    try:
        raw, following, marker = _read_record(tar, where, shard, offset)
    except OSError as e:  # the disk failed under the shard: like garbled bytes, it ends the shard
        raw, following, marker = _Raw(shard, "?", {}, "read_error", f"{where}: cannot read at byte {offset} ({e})"), \
            None, False
    raws = [] if raw is None else [raw]
    if following is not None:
        return raws, following
    if raw is not None and raw.reason in _DAMAGE:
        if count is None:
            raw.unknown_more = True
            raw.detail += "; how many records followed is unknown (no manifest count)"
        else:
            raw.records = max(1, count - index)
            raw.detail += f"; {raw.records} of the shard's {count} records lost"
        return raws, None
    seen = index + len(raws)
    if count is not None and seen < count:
        reason, why = ("missing_records", "") if marker else ("truncated", ", then ends without tar's end-of-archive "
                                                                          "marker: it was cut short")
        raws.append(_Raw(shard, "?", {}, reason, f"{where}: holds {seen} of the {count} records its manifest "
                         f"lists{why}", records=count - seen))
    elif count is None and not marker:
        raws.append(_Raw(shard, "?", {}, "truncated", f"{where}: ends without tar's end-of-archive marker after {seen} "
                         "records: it was cut short; how many records followed is unknown (no manifest count)",
                         records=0, unknown_more=True))
    return raws, None


def _unreadable(shard: int, where: str, count: int | None, error: BaseException) -> _Raw:
    lost = f"its {count} records are lost" if count is not None else "how many records it held is unknown (no manifest)"
    return _Raw(shard, "?", {}, "unreadable_shard", f"{where}: cannot open the shard ({error}); {lost}",
                records=count or 0, unknown_more=count is None)


# ---------------------------------------------------------------------------------------------
# Decoding, with the reason for every refusal


class _Skip(Exception):
    def __init__(self, reason: str, detail: str, records: int = 1, unknown_more: bool = False):
        super().__init__(detail)
        self.skipped = Skipped(reason, records, detail, unknown_more)


def _schema_reason(message: str) -> str:
    return next((reason for text, reason in _SCHEMA_REASONS if text in message), "schema")


@functools.cache
def _field_types(cls: type[Record]) -> dict[str, type]:
    """The plain type each stored (non-image) field must have; samples.py checks presence only."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name == "key" or f.name in cls.IMAGES or f.name in cls.IMAGE_LISTS:
            continue
        origin = typing.get_origin(hints[f.name]) or hints[f.name]
        if origin in (str, int, float, bool, list, dict):
            out[f.name] = origin
    return out


def _decode(raw: _Raw, where: str, kind: str | None) -> Record:
    if raw.reason is not None:
        raise _Skip(raw.reason, raw.detail, raw.records, raw.unknown_more)
    try:
        record = record_from_wds({"__key__": raw.key, **raw.members}, where)
    except SchemaError as e:
        if raw.cut:  # what is missing was cut off with the rest of the shard
            raise _Skip("truncated", f"{e} (the shard ends right after it, without tar's end-of-archive marker: cut "
                                     "short)") from None
        raise _Skip(_schema_reason(str(e)), str(e)) from None
    except Exception as e:  # anything else a hostile record provokes is still one skipped record
        raise _Skip("truncated" if raw.cut else "decode_error",
                    f"{where}: record {raw.key}: {type(e).__name__}: {e}") from None
    for name, expected in _field_types(type(record)).items():
        value = getattr(record, name)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise _Skip("wrong_type", f"{where}: record {raw.key}: field '{name}' is a "
                                      f"{type(value).__name__}, expected {expected.__name__}")
    if kind is not None and record.KIND != kind:
        raise _Skip("wrong_kind", f"{where}: record {raw.key} is a {record.KIND}, expected {kind}")
    return record


def read_shard(path: str | Path, count: int | None = None, kind: str | None = None) -> Iterator[Record | Skipped]:
    """One shard's records in stored order, as the loader reads them: each good record decoded, each skip with its
    reason and the records it stands for. `count`: the shard's records by its manifest (None: unknown)."""
    where = str(path)
    try:
        tar = _open_tar(where)
    except (OSError, tarfile.TarError) as e:
        yield from _decoded([_unreadable(0, where, count, e)], where, kind)
        return
    with tar:
        offset: int | None = 0
        index = 0
        while offset is not None:
            raws, offset = _shard_step(tar, where, 0, offset, index, count)
            index += len(raws)
            yield from _decoded(raws, where, kind)


def _decoded(raws: list[_Raw], where: str, kind: str | None) -> Iterator[Record | Skipped]:
    for raw in raws:
        try:
            yield _decode(raw, where, kind)
        except _Skip as skip:
            yield skip.skipped


# ---------------------------------------------------------------------------------------------
# One dataset as one global worker sees it


def _initial_stream(epoch: int, epochs: int | None) -> dict[str, Any]:
    # (shard, offset, index): where the current block starts, `index` counting the shard's records before `offset`
    return {"epoch": epoch, "stop": None if epochs is None else epoch + epochs, "block": 0, "shard": 0,
            "offset": 0, "index": 0, "taken": 0, "good": 0, "empty_epochs": 0, "done": False, "yielded": 0,
            "skipped": {}, "uncounted": {}}


class _DatasetStream:
    """Reads one dataset's shards of each epoch for one global worker, in shuffled blocks."""

    def __init__(self, plan: _DatasetPlan, seed: int, worker: int, workers: int, buffer: int,
                 state: dict[str, Any]):
        self.plan, self.seed, self.worker, self.workers, self.buffer = plan, seed, worker, workers, buffer
        self.state = state  # updated in place; the worker snapshots it after every sample
        self._shards: list[int] = []
        self._shards_epoch: int | None = None
        self._tar: tuple[int, tarfile.TarFile] | None = None
        self._block: list[_Raw] | None = None
        self._order: list[int] = []
        self._end = (0, 0, 0)
        self._logged: dict[str, int] = {}

    def next(self) -> LoadedSample | None:
        """The next good sample, or None once this dataset's last epoch is done."""
        st = self.state
        while not st["done"]:
            if self._block is None:
                self._read_block()
                if not self._block:
                    self._block = None
                    self._end_epoch()
                    continue
            raw = self._block[self._order[st["taken"]]]
            st["taken"] += 1
            if st["taken"] == len(self._block):  # step the state past the block now, so it never points at a spent one
                st["block"], (st["shard"], st["offset"], st["index"]), st["taken"] = st["block"] + 1, self._end, 0
                self._block = None
            where = self.plan.paths[self._shards[raw.shard]]
            try:
                record = _decode(raw, where, self.plan.kind)
            except _Skip as skip:
                self._count_skip(skip.skipped)
                continue
            st["good"] += 1
            st["yielded"] += 1
            return LoadedSample(record, self.plan.name, record.key, self.plan.names[self._shards[raw.shard]],
                                st["epoch"], self.worker)
        return None

    def close(self) -> None:
        if self._tar is not None:
            self._tar[1].close()
            self._tar = None

    def _epoch_shards(self) -> list[int]:
        if self._shards_epoch != self.state["epoch"]:
            self.close()
            self._shards = self.plan.epoch_shards(self.seed, self.state["epoch"], self.worker, self.workers)
            self._shards_epoch = self.state["epoch"]
        return self._shards

    def _read_block(self) -> None:
        """The block starting at the state's (shard, offset): up to `buffer` raw records, good or not."""
        st, shards = self.state, self._epoch_shards()
        i, offset, index = st["shard"], st["offset"], st.get("index", 0)  # states before "index": 0, as before
        block: list[_Raw] = []
        while len(block) < self.buffer and i < len(shards):
            path, count = self.plan.paths[shards[i]], self.plan.counts[shards[i]]
            try:
                tar = self._open(i, path)
            except (OSError, tarfile.TarError) as e:
                block.append(_unreadable(i, path, count, e))
                i, offset, index = i + 1, 0, 0
                continue
            raws, offset = _shard_step(tar, path, i, offset, index, count)
            block += raws
            index += len(raws)
            if offset is None:
                i, offset, index = i + 1, 0, 0
        self._block, self._end = block, (i, offset, index)
        self._order = list(range(len(block)))
        _rng(self.seed, "block", self.plan.name, st["epoch"], self.worker, st["block"]).shuffle(self._order)

    def _open(self, i: int, path: str) -> tarfile.TarFile:
        if self._tar is None or self._tar[0] != i:
            self.close()
            self._tar = (i, _open_tar(path))
        return self._tar[1]

    def _end_epoch(self) -> None:
        st = self.state
        st["empty_epochs"] = 0 if st["good"] else st["empty_epochs"] + 1
        # An infinite stream whose worker keeps drawing only broken shards would spin forever; a
        # few empty epochs in a row are normal when many shards are broken, this many are not.
        if st["stop"] is None and st["empty_epochs"] >= max(_EMPTY_EPOCHS, len(self.plan.paths)):
            raise LoaderError(f"dataset {self.plan.name!r}: global worker {self.worker} read no usable record in "
                              f"{st['empty_epochs']} epochs in a row (skipped so far: {st['skipped']}); an infinite "
                              f"stream cannot go on: fix or drop the broken shards")
        st.update(epoch=st["epoch"] + 1, block=0, shard=0, offset=0, index=0, taken=0, good=0)
        if st["stop"] is not None and st["epoch"] >= st["stop"]:
            st["done"] = True
        self.close()

    def _count_skip(self, skip: Skipped) -> None:
        _tally(self.state["skipped"], self.state.setdefault("uncounted", {}), skip)
        n = self._logged[skip.reason] = self._logged.get(skip.reason, 0) + 1
        level = logging.WARNING if n <= _LOGGED_PER_REASON else logging.DEBUG
        more = "; further skips for this reason are logged at DEBUG" if n == _LOGGED_PER_REASON else ""
        what = "a record" if skip.records == 1 and not skip.unknown_more else (
            f"{skip.records} records" if not skip.unknown_more else
            f"{skip.records} record{'s' if skip.records != 1 else ''} and a shard of unknown size")
        log.log(level, "skipped %s of %s (%s): %s%s", what, self.plan.name, skip.reason, skip.detail, more)


# ---------------------------------------------------------------------------------------------
# The worker side: mixing the datasets of one global worker


def _initial_worker(plans: Sequence[_DatasetPlan], epoch: int, epochs: int | None) -> dict[str, Any]:
    return {"draws": 0, "streams": {p.name: _initial_stream(epoch, epochs) for p in plans}}


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {"draws": state["draws"],
            "streams": {n: {**s, "skipped": dict(s["skipped"]), "uncounted": dict(s.get("uncounted", {}))}
                        for n, s in state["streams"].items()}}


def _as_is(item: Any) -> Any:
    return item  # records are not tensors: no collation


class _MixedStream(IterableDataset):
    """What each DataLoader worker runs: yields (sample or None, local worker, its state after)."""

    def __init__(self, plans: Sequence[_DatasetPlan], seed: int, rank: int, world_size: int, workers: int,
                 buffer: int, states: list[dict[str, Any]], rotation: int, transform: Callable[[Record], Any] | None):
        self.plans, self.seed, self.buffer = list(plans), seed, buffer
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.states, self.rotation, self.transform = states, rotation, transform

    def __iter__(self) -> Iterator[tuple[LoadedSample | None, int, dict[str, Any]]]:
        info = get_worker_info()
        # The main process rotates workers so that the DataLoader's round robin, which always
        # starts at worker 0, resumes with the worker the interrupted run would have served next.
        local = ((info.id if info is not None else 0) + self.rotation) % self.workers
        worker = self.rank * self.workers + local
        state = _snapshot(self.states[local])
        active = [p for p in self.plans if not state["streams"][p.name]["done"]]
        if not active:
            return
        streams = {p.name: _DatasetStream(p, self.seed, worker, self.world_size * self.workers, self.buffer,
                                          state["streams"][p.name]) for p in self.plans}
        try:
            while active:
                plan = _pick(active, _rng(self.seed, "mix", worker, state["draws"]).random())
                sample = streams[plan.name].next()
                if sample is None:  # this dataset is done: the same draw picks among the others
                    active.remove(plan)
                    continue
                state["draws"] += 1
                if self.transform is not None:  # the caller's per-record work, here in the worker
                    try:
                        sample.prepared = self.transform(sample.record)
                    except Exception as e:  # handed over with the sample: the caller decides
                        sample.failure = e
                yield sample, local, _snapshot(state)
            yield None, local, _snapshot(state)  # the final counters, skips after the last sample included
        finally:
            for s in streams.values():
                s.close()


def _pick(plans: Sequence[_DatasetPlan], u: float) -> _DatasetPlan:
    """The plan that `u` in [0, 1) falls on, each owning a share of [0, 1) proportional to its weight."""
    u *= sum(p.weight for p in plans)
    for p in plans:
        if u < p.weight:
            return p
        u -= p.weight
    return plans[-1]  # float round-off at the top end


# ---------------------------------------------------------------------------------------------
# The main-process side: a DataLoader, and the state composed from what it hands out


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if initialised else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
    return rank, world_size


class StreamingLoader:
    """Iterates `LoadedSample`s of a weighted mix of shard datasets; see the module docstring.

    Each `iter()` continues from the current state (a fresh loader: the start of `epoch`), and
    the state advances as samples are handed out, so `state_dict()` after k samples resumes at
    sample k. Workers are started on each `iter()`; one iteration at a time.
    """

    def __init__(self, specs: Sequence[DatasetSpec], *, seed: int, num_workers: int, rank: int, world_size: int,
                 shuffle_buffer: int, epoch: int = 0, epochs: int | None = None, prefetch_factor: int = 2,
                 multiprocessing_context: Any = None, timeout: float = 0,
                 transform: Callable[[Record], Any] | None = None):
        if not specs:
            raise LoaderError("no datasets: pass at least one DatasetSpec")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise LoaderError(f"dataset names must be unique, got {names}")
        if shuffle_buffer < 1:
            raise LoaderError(f"shuffle_buffer must be at least 1 record (1: no shuffling), got {shuffle_buffer}")
        if num_workers < 0:
            raise LoaderError(f"num_workers must be >= 0, got {num_workers}")
        if epochs is not None and epochs < 1:
            raise LoaderError(f"epochs must be None (stream forever) or >= 1, got {epochs}")
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.transform = transform  # run on each record in the worker that reads it (LoadedSample.prepared)
        self.shuffle_buffer, self.epochs = shuffle_buffer, epochs
        self.workers_per_rank = max(1, num_workers)
        self.global_workers = world_size * self.workers_per_rank
        self.plans = [_plan(s) for s in specs]
        if epochs is None:
            for p in self.plans:
                if len(p.paths) < self.global_workers:
                    raise LoaderError(
                        f"dataset {p.name!r} has {len(p.paths)} shards, fewer than the {self.global_workers} global "
                        f"workers ({world_size} ranks x {self.workers_per_rank} workers); an infinite mixed stream "
                        f"needs a shard for every worker: write smaller shards or use fewer workers")
        self._dataloader_args = {"prefetch_factor": prefetch_factor, "multiprocessing_context": multiprocessing_context,
                                 "timeout": timeout}
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Restart every dataset at the start of `epoch` (counters carry on)."""
        old = getattr(self, "_workers", None)
        self._epoch = epoch
        self._workers = [_initial_worker(self.plans, epoch, self.epochs) for _ in range(self.workers_per_rank)]
        if old is not None:
            for new, prev in zip(self._workers, old):
                for name, stream in new["streams"].items():
                    stream["yielded"] = prev["streams"][name]["yielded"]
                    stream["skipped"] = dict(prev["streams"][name]["skipped"])
                    stream["uncounted"] = dict(prev["streams"][name].get("uncounted", {}))
        self._next_worker = 0

    def __iter__(self) -> Iterator[LoadedSample]:
        dataset = _MixedStream(self.plans, self.seed, self.rank, self.world_size, self.workers_per_rank,
                               self.shuffle_buffer, [_snapshot(w) for w in self._workers], self._next_worker,
                               self.transform)
        if self.num_workers == 0:
            items: Iterator = iter(dataset)
        else:
            items = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                                    persistent_workers=False, in_order=True, **self._dataloader_args))
        ended = False
        try:
            for sample, local, state in items:
                self._workers[local] = state
                self._next_worker = (local + 1) % self.workers_per_rank
                if sample is not None:
                    yield sample
            ended = True
        finally:
            del items  # tears the workers down now, not at garbage collection
            if ended:
                stats = self.stats()
                log.log(logging.WARNING if stats.total_skipped or stats.total_uncounted else logging.INFO,
                        "loader rank %d pass ended: %s", self.rank, stats.summary())

    def stats(self) -> LoaderStats:
        """Yielded and skipped counts of this rank, summed over its workers, as of the last sample handed out."""
        stats = LoaderStats({p.name: 0 for p in self.plans}, {p.name: {} for p in self.plans},
                            {p.name: {} for p in self.plans})
        for w in self._workers:
            for name, stream in w["streams"].items():
                stats.yielded[name] += stream["yielded"]
                for counts, mine in ((stream["skipped"], stats.skipped[name]),
                                     (stream.get("uncounted", {}), stats.uncounted[name])):
                    for reason, n in counts.items():
                        mine[reason] = mine.get(reason, 0) + n
        return stats

    def samples_per_rank(self, epoch: int | None = None) -> dict[str, list[int | None]]:
        """Records each rank reads of each dataset in `epoch` (manifest counts; None where unknown)."""
        epoch = self._epoch if epoch is None else epoch
        out: dict[str, list[int | None]] = {}
        for p in self.plans:
            per_rank: list[int | None] = [0] * self.world_size
            for g in range(self.global_workers):
                r = g // self.workers_per_rank
                counts = [p.counts[i] for i in p.epoch_shards(self.seed, epoch, g, self.global_workers)]
                per_rank[r] = None if per_rank[r] is None or None in counts else per_rank[r] + sum(counts)
            out[p.name] = per_rank
        return out

    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "workers_per_rank": self.workers_per_rank, "shuffle_buffer": self.shuffle_buffer,
                "datasets": [{"name": p.name, "kind": p.kind, "weight": p.weight, "shards": len(p.paths),
                              "fingerprint": p.fingerprint()} for p in self.plans]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: where every worker of this rank stands, and which worker serves next."""
        return {"format": STATE_FORMAT, "config": self._config(), "next_worker": self._next_worker,
                "epoch": self._epoch, "workers": [_snapshot(w) for w in self._workers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise LoaderStateError(f"loader state format {state.get('format') if isinstance(state, dict) else state!r}"
                                   f" is not {STATE_FORMAT}: it was not written by this loader")
        saved, mine = state.get("config", {}), self._config()
        differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if differ:
            raise LoaderStateError(
                "the loader state does not fit this loader (" + "; ".join(differ) + "). A resume must use the same "
                "seed, datasets (names, shards, weights), shuffle_buffer, rank, world_size and workers per rank "
                "(num_workers 0 and 1 are the same): every sample's place in the order is tied to its global worker")
        self._epoch = state["epoch"]
        self._workers = [_snapshot(w) for w in state["workers"]]
        self._next_worker = state["next_worker"]


# a stage's datasets: one directory, or (directory, weight) pairs
Sources = typing.Union[str, Path, typing.Sequence[typing.Tuple[typing.Union[str, Path], float]]]


def as_sources(data: Sources) -> list[tuple[Path, float]]:
    return [(Path(data), 1.0)] if isinstance(data, (str, Path)) else [(Path(p), float(w)) for p, w in data]


def kind_specs(data: Sources, kind: str, split: str, weight: float = 1.0) -> list[DatasetSpec]:
    """The datasets of `data` whose `split` holds records of `kind`, sharing `weight` in proportion to their own
    weights (empty when none does). A lone one is named after the kind, several after their folder and the kind."""
    having = [(p, w) for p, w in as_sources(data) if holds(p, split, kind)]
    if len(having) == 1:
        return [DatasetSpec(kind, having[0][0], split=split, kind=kind, weight=weight)]
    total, specs, names = sum(w for _, w in having), [], set()
    for p, w in having:
        name = f"{p.name}/{kind}"
        while name in names:  # two folders of the same name
            name += "'"
        names.add(name)
        specs.append(DatasetSpec(name, p, split=split, kind=kind, weight=weight * w / total))
    return specs


def make_loader(specs: Sequence[DatasetSpec], *, seed: int = 0, num_workers: int = 0, rank: int | None = None,
                world_size: int | None = None, shuffle_buffer: int = 1000, epoch: int = 0,
                epochs: int | None = None, prefetch_factor: int = 2, multiprocessing_context: Any = None,
                timeout: float = 0, transform: Callable[[Record], Any] | None = None) -> StreamingLoader:
    """A resumable loader over `specs`; rank and world_size default to torch.distributed's, else 0 of 1.

    `epochs=None` streams forever (each dataset cycling through its own epochs); `epochs=E`
    yields `E` epochs of every dataset from `epoch` on, then ends. `transform`: a pure function of a record, run
    in the worker that reads it (with num_workers > 0, in that worker process), its output in
    `LoadedSample.prepared`; it must not depend on anything but the record, so resume stays exact.
    """
    rank, world_size = _rank_and_world(rank, world_size)
    return StreamingLoader(specs, seed=seed, num_workers=num_workers, rank=rank, world_size=world_size,
                           shuffle_buffer=shuffle_buffer, epoch=epoch, epochs=epochs, prefetch_factor=prefetch_factor,
                           multiprocessing_context=multiprocessing_context, timeout=timeout, transform=transform)


__all__ = ["DatasetSpec", "LoadedSample", "Sources", "as_sources", "kind_specs", "LoaderError", "LoaderStateError", "LoaderStats", "STATE_FORMAT",
           "Skipped", "StreamingLoader", "make_loader", "read_shard"]
