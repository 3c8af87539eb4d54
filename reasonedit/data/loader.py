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
reason (`stats()`), and logged (the first few per reason and worker at WARNING, then DEBUG). A
truncated or garbled tar ends that shard (nothing after the damage can be located safely); an
unreadable shard counts once, whatever it held. An infinite stream raises `LoaderError` rather
than spin when a worker finds no good record of a dataset in max(20, shards) epochs in a row.

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


@dataclass
class LoaderStats:
    """Samples yielded and records skipped (by reason) per dataset, summed over workers."""

    yielded: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        return sum(sum(r.values()) for r in self.skipped.values())

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reasons in self.skipped.values():
            for reason, n in reasons.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def summary(self) -> str:
        parts = []
        for name, n in self.yielded.items():
            skipped = ", ".join(f"{r} {c}" for r, c in sorted(self.skipped.get(name, {}).items()))
            parts.append(f"{name}: {n} yielded" + (f", skipped {skipped}" if skipped else ""))
        return "; ".join(parts)


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
    """One record's undecoded members, or the reason it cannot be read."""

    shard: int  # index into the worker's shard list of the epoch
    key: str
    members: dict[str, bytes]
    reason: str | None = None
    detail: str = ""


def _open_tar(path: str) -> tarfile.TarFile:
    return tarfile.open(path, mode="r:")  # reads and checks only the first header


def _read_record(tar: tarfile.TarFile, where: str, shard: int, offset: int) -> tuple[_Raw | None, int | None]:
    """The record whose first header is at `offset`, and the next record's offset (None: shard over)."""
    f = tar.fileobj
    key: str | None = None
    members: dict[str, bytes] = {}
    while True:
        f.seek(offset)
        head = f.read(tarfile.BLOCKSIZE)
        if not head or head == _NUL_BLOCK:  # the end-of-archive marker, or EOF without one
            return (_Raw(shard, key, members) if key is not None else None), None
        if len(head) < tarfile.BLOCKSIZE:
            return _Raw(shard, key or "?", members, "truncated",
                        f"{where}: tar header at byte {offset} is cut short (record {key or '?'})"), None
        f.seek(offset)
        try:
            info = tarfile.TarInfo.fromtarfile(tar)
        except (tarfile.TarError, UnicodeDecodeError, ValueError) as e:
            return _Raw(shard, key or "?", members, "bad_tar",
                        f"{where}: unreadable tar header at byte {offset} after record {key or '?'} ({e})"), None
        end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        match = _KEY_EXT.match(info.name)
        if match and key is not None and match.group(1) != key:
            return _Raw(shard, key, members), offset
        if not info.isreg() or not match:  # directories, links, names without an extension: webdataset skips them
            offset = end
            continue
        key, ext = match.group(1), match.group(2).lower()
        f.seek(info.offset_data)
        data = f.read(info.size)
        if len(data) < info.size:
            return _Raw(shard, key, members, "truncated",
                        f"{where}: record {key}: member {info.name} holds {len(data)} of {info.size} bytes"), None
        if ext in members:
            return _Raw(shard, key, members, "duplicate_member",
                        f"{where}: record {key}: member {info.name} appears twice in a row"), end
        members[ext] = data
        offset = end


# ---------------------------------------------------------------------------------------------
# Decoding, with the reason for every refusal


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


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
        raise _Skip(raw.reason, raw.detail)
    try:
        record = record_from_wds({"__key__": raw.key, **raw.members}, where)
    except SchemaError as e:
        raise _Skip(_schema_reason(str(e)), str(e)) from None
    except Exception as e:  # anything else a hostile record provokes is still one skipped record
        raise _Skip("decode_error", f"{where}: record {raw.key}: {type(e).__name__}: {e}") from None
    for name, expected in _field_types(type(record)).items():
        value = getattr(record, name)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise _Skip("wrong_type", f"{where}: record {raw.key}: field '{name}' is a "
                                      f"{type(value).__name__}, expected {expected.__name__}")
    if kind is not None and record.KIND != kind:
        raise _Skip("wrong_kind", f"{where}: record {raw.key} is a {record.KIND}, expected {kind}")
    return record


# ---------------------------------------------------------------------------------------------
# One dataset as one global worker sees it


def _initial_stream(epoch: int, epochs: int | None) -> dict[str, Any]:
    return {"epoch": epoch, "stop": None if epochs is None else epoch + epochs, "block": 0, "shard": 0,
            "offset": 0, "taken": 0, "good": 0, "empty_epochs": 0, "done": False, "yielded": 0, "skipped": {}}


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
        self._end = (0, 0)
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
                st["block"], (st["shard"], st["offset"]), st["taken"] = st["block"] + 1, self._end, 0
                self._block = None
            where = self.plan.paths[self._shards[raw.shard]]
            try:
                record = _decode(raw, where, self.plan.kind)
            except _Skip as skip:
                self._count_skip(skip)
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
        i, offset = st["shard"], st["offset"]
        block: list[_Raw] = []
        while len(block) < self.buffer and i < len(shards):
            path = self.plan.paths[shards[i]]
            try:
                tar = self._open(i, path)
            except (OSError, tarfile.TarError) as e:
                block.append(_Raw(i, "?", {}, "unreadable_shard", f"{path}: cannot open the shard ({e})"))
                i, offset = i + 1, 0
                continue
            raw, offset = _read_record(tar, path, i, offset)
            if raw is not None:
                block.append(raw)
            if offset is None:
                i, offset = i + 1, 0
        self._block, self._end = block, (i, offset)
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
        st.update(epoch=st["epoch"] + 1, block=0, shard=0, offset=0, taken=0, good=0)
        if st["stop"] is not None and st["epoch"] >= st["stop"]:
            st["done"] = True
        self.close()

    def _count_skip(self, skip: _Skip) -> None:
        skipped = self.state["skipped"]
        skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
        n = self._logged[skip.reason] = self._logged.get(skip.reason, 0) + 1
        level = logging.WARNING if n <= _LOGGED_PER_REASON else logging.DEBUG
        more = "; further skips for this reason are logged at DEBUG" if n == _LOGGED_PER_REASON else ""
        log.log(level, "skipped a record of %s (%s): %s%s", self.plan.name, skip.reason, skip.detail, more)


# ---------------------------------------------------------------------------------------------
# The worker side: mixing the datasets of one global worker


def _initial_worker(plans: Sequence[_DatasetPlan], epoch: int, epochs: int | None) -> dict[str, Any]:
    return {"draws": 0, "streams": {p.name: _initial_stream(epoch, epochs) for p in plans}}


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {"draws": state["draws"],
            "streams": {n: {**s, "skipped": dict(s["skipped"])} for n, s in state["streams"].items()}}


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
                log.log(logging.WARNING if stats.total_skipped else logging.INFO,
                        "loader rank %d pass ended: %s", self.rank, stats.summary())

    def stats(self) -> LoaderStats:
        """Yielded and skipped counts of this rank, summed over its workers, as of the last sample handed out."""
        stats = LoaderStats({p.name: 0 for p in self.plans}, {p.name: {} for p in self.plans})
        for w in self._workers:
            for name, stream in w["streams"].items():
                stats.yielded[name] += stream["yielded"]
                for reason, n in stream["skipped"].items():
                    stats.skipped[name][reason] = stats.skipped[name].get(reason, 0) + n
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
           "StreamingLoader", "make_loader"]
