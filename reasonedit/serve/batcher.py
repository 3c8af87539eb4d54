"""One worker thread owns the model: it takes queued edits, gathers those that arrive within a short wait
into one `editor.edit(batch)` call, and resolves each request's future. The queue is bounded: a submit
to a full queue raises `QueueFull` (the service answers 503)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from reasonedit.inference.types import EditRequest, Editor, Reflection, Thinker

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The edit queue holds `max_queue` requests already."""


@dataclass
class _Job:
    request: EditRequest
    future: Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    served: int = 0  # edits answered with an image
    failed: int = 0  # edits the editor raised on
    rejected: int = 0  # refused: queue full
    cancelled: int = 0  # given up by their caller (timeout) before they ran
    batches: int = 0  # editor.edit calls
    batched: int = 0  # requests over all those calls
    max_batch_size: int = 0
    edit_seconds: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.batched / self.batches if self.batches else 0.0


class EditBatcher:
    """See the module docstring. `model_lock` is held around every editor call, so a thinker sharing the
    model (the built-in reasoner) can hold it too and the two never run on the model at once."""

    def __init__(self, editor: Editor, *, max_queue: int = 64, max_batch: int = 8, batch_wait: float = 0.01,
                 model_lock: Optional[threading.Lock] = None):
        if max_queue < 1 or max_batch < 1 or batch_wait < 0:
            raise ValueError(f"max_queue ({max_queue}) and max_batch ({max_batch}) must be >= 1, "
                             f"batch_wait ({batch_wait}) >= 0")
        self.editor, self.max_batch, self.batch_wait = editor, max_batch, batch_wait
        self.max_queue = max_queue
        self.model_lock = model_lock or threading.Lock()
        self.stats = BatcherStats()
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.in_flight = 0

    # -- lifecycle
    def start(self) -> "EditBatcher":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edit-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:  # whoever still waits gets an answer
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the edit service is shutting down"))

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # -- producers
    def submit(self, request: EditRequest) -> Future:
        """Queue one edit; its future resolves to the edited image. QueueFull when the queue is full."""
        if self._thread is None:
            raise RuntimeError("the edit batcher is not started")
        job = _Job(request, Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._stats_lock:
                self.stats.rejected += 1
            raise QueueFull(f"the edit queue is full ({self.max_queue} waiting); try again later") from None
        return job.future

    def as_editor(self, name: Optional[str] = None) -> "QueuedEditor":
        """An `Editor` whose edits go through this queue (so the loop's edits batch with other traffic)."""
        return QueuedEditor(self, name or getattr(self.editor, "name", "queued"))

    # -- the worker
    def _gather(self) -> list[_Job]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        jobs = [first]
        deadline = time.perf_counter() + self.batch_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                jobs.append(self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._gather()
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if len(live) < len(jobs):
                with self._stats_lock:
                    self.stats.cancelled += len(jobs) - len(live)
            if live:
                self._edit(live)

    def _edit(self, jobs: Sequence[_Job]) -> None:
        self.in_flight = len(jobs)
        t0 = time.perf_counter()
        try:
            with self.model_lock:
                images = self.editor.edit([j.request for j in jobs])
            if len(images) != len(jobs):
                raise RuntimeError(f"editor returned {len(images)} images for {len(jobs)} requests")
        except Exception as e:
            if len(jobs) > 1:  # find the culprit: one bad request must not fail its neighbours
                log.warning("a batch of %d failed (%s: %s); running its requests one by one", len(jobs),
                            type(e).__name__, e)
                self.in_flight = 0
                for job in jobs:
                    self._edit([job])
                return
            log.warning("edit failed: %s: %s", type(e).__name__, e)
            with self._stats_lock:
                self.stats.failed += 1
            jobs[0].future.set_exception(e)
            self.in_flight = 0
            return
        seconds = time.perf_counter() - t0
        with self._stats_lock:
            s = self.stats
            s.batches += 1
            s.batched += len(jobs)
            s.max_batch_size = max(s.max_batch_size, len(jobs))
            s.served += len(jobs)
            s.edit_seconds += seconds
        for job, image in zip(jobs, images):
            job.future.set_result(np.asarray(image))
        self.in_flight = 0


class QueuedEditor:
    """An `Editor` that submits to an `EditBatcher` and waits for its answers."""

    def __init__(self, batcher: EditBatcher, name: str, timeout: Optional[float] = None):
        self.batcher, self.name, self.timeout = batcher, name, timeout

    def edit(self, requests: Sequence[EditRequest]) -> list[np.ndarray]:
        futures = [self.batcher.submit(r) for r in requests]
        return [f.result(timeout=self.timeout) for f in futures]


class LockedThinker:
    """A `Thinker` that holds the model lock while it runs, for a thinker on the served model."""

    def __init__(self, thinker: Thinker, lock: threading.Lock):
        self.thinker, self.lock = thinker, lock
        self.name = getattr(thinker, "name", type(thinker).__name__)

    def think(self, sources: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
        with self.lock:
            return self.thinker.think(sources, instructions)

    def reflect(self, sources: Sequence[np.ndarray], edited: Sequence[np.ndarray], instructions: Sequence[str],
                previous: Sequence[Optional[str]]) -> list[Reflection]:
        with self.lock:
            return self.thinker.reflect(sources, edited, instructions, previous)


__all__ = ["BatcherStats", "EditBatcher", "LockedThinker", "QueueFull", "QueuedEditor"]
