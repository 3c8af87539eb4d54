"""One worker thread owns the model: it takes queued edits, gathers those that arrive within a short wait
into one `editor.edit(batch)` call, and resolves each request's future. Plain edits and the loop's edits
wait in separate bounded lanes: a submit to a full lane raises `QueueFull` (the service answers 503). A
caller that gives its edit up (`Ticket.abandon`) stops it: before it runs, or at the batch's next
cancellation check (`inference.cancel`) once nobody in the batch waits any more."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from reasonedit.inference import cancel
from reasonedit.inference.types import EditRequest, Editor, Reflection, Thinker

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The lane's queue holds as many requests as it may already."""


class ShuttingDown(RuntimeError):
    """The service is stopping: the request was not run."""


LANES = ("edit", "loop")  # plain edits; the edits of think/reflect loops


@dataclass
class _Job:
    request: EditRequest
    future: Future
    lane: str
    queued_at: float = field(default_factory=time.perf_counter)
    abandoned: threading.Event = field(default_factory=threading.Event)
    given_up: Optional[cancel.ShouldStop] = None  # the submitter's cancel scope, asked as well

    def is_given_up(self) -> bool:
        return self.abandoned.is_set() or (self.given_up is not None and bool(self.given_up()))


class Ticket:
    """A queued edit. `future` resolves to the edited image. `abandon()` gives it up: a job that has not run is
    dropped; a running batch stops at its next cancellation check (the sampler's next step) once every request
    in it has been given up (a batch others still wait for runs on)."""

    def __init__(self, job: _Job):
        self._job = job

    @property
    def future(self) -> Future:
        return self._job.future

    def abandon(self) -> None:
        self._job.abandoned.set()
        self._job.future.cancel()  # a job still queued is dropped when the worker reaches it


@dataclass
class BatcherStats:
    served: int = 0  # edits answered with an image
    failed: int = 0  # edits the editor raised on
    rejected: int = 0  # refused: the lane's queue was full
    cancelled: int = 0  # given up by their caller (timeout) before they ran
    stopped: int = 0  # given up while running: the batch stopped at its next cancellation check
    batches: int = 0  # editor.edit calls
    batched: int = 0  # requests over all those calls
    loop_edits: int = 0  # of the served, edits of think/reflect loops
    max_batch_size: int = 0
    edit_seconds: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.batched / self.batches if self.batches else 0.0


class EditBatcher:
    """See the module docstring. `model_lock` is held around every editor call, so a thinker sharing the
    model (the built-in reasoner) can hold it too and the two never run on the model at once.

    Two lanes, each with its own bounded queue: plain edits ("edit", `max_queue`) and the edits of
    think/reflect loops ("loop", `max_loop_queue`). A batch holds one lane's requests. Plain edits go first,
    but after `edit_turns` plain batches in a row while loop edits wait, one loop batch runs: neither kind
    can starve the other, and a plain edit waits at most for the batch already running.
    """

    def __init__(self, editor: Editor, *, max_queue: int = 64, max_batch: int = 8, batch_wait: float = 0.01,
                 model_lock: Optional[threading.Lock] = None, max_loop_queue: Optional[int] = None,
                 edit_turns: int = 4):
        max_loop_queue = max_queue if max_loop_queue is None else max_loop_queue
        if min(max_queue, max_loop_queue, max_batch, edit_turns) < 1 or batch_wait < 0:
            raise ValueError(f"max_queue ({max_queue}), max_loop_queue ({max_loop_queue}), max_batch ({max_batch}) "
                             f"and edit_turns ({edit_turns}) must be >= 1, batch_wait ({batch_wait}) >= 0")
        self.editor, self.max_batch, self.batch_wait = editor, max_batch, batch_wait
        self.max_queue, self.max_loop_queue, self.edit_turns = max_queue, max_loop_queue, edit_turns
        self.model_lock = model_lock or threading.Lock()
        self.stats = BatcherStats()
        self._pending: dict[str, deque[_Job]] = {lane: deque() for lane in LANES}
        self._bound = {"edit": max_queue, "loop": max_loop_queue}
        self._cond = threading.Condition()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._running: list[_Job] = []
        self._edit_streak = 0  # plain batches in a row while loop edits waited
        self.in_flight = 0

    # -- lifecycle
    def start(self) -> "EditBatcher":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edit-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker: queued requests fail at once, a running batch is told to stop at its next check,
        and the worker is waited for at most `timeout` seconds (an editor without checks may run on)."""
        self._stop.set()
        for job in list(self._running):
            job.abandoned.set()
        with self._cond:
            queued = [job for lane in LANES for job in self._pending[lane]]
            for lane in LANES:
                self._pending[lane].clear()
            self._cond.notify_all()
        for job in queued:  # whoever still waits gets an answer
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the edit service is shutting down; try again elsewhere"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        """Plain edits waiting."""
        return len(self._pending["edit"])

    @property
    def loop_depth(self) -> int:
        """Loop edits waiting."""
        return len(self._pending["loop"])

    # -- producers
    def submit(self, request: EditRequest, lane: str = "edit", given_up: Optional[cancel.ShouldStop] = None) -> Ticket:
        """Queue one edit in `lane`; QueueFull when that lane's queue is full. `given_up`: the submitter's own
        cancel question, asked with the ticket's (a loop given up stops its edit at once, not when it next looks)."""
        if lane not in LANES:
            raise ValueError(f"lane: {lane!r} is not one of {', '.join(LANES)}")
        if self._thread is None or self._stop.is_set():
            raise ShuttingDown("the edit service is not running (shutting down); try again elsewhere")
        job = _Job(request, Future(), lane, given_up=given_up)
        with self._cond:
            if len(self._pending[lane]) >= self._bound[lane]:
                with self._stats_lock:
                    self.stats.rejected += 1
                what = "edit queue" if lane == "edit" else "loop edit queue"
                raise QueueFull(f"the {what} is full ({self._bound[lane]} waiting); try again later")
            self._pending[lane].append(job)
            self._cond.notify()
        return Ticket(job)

    def as_editor(self, name: Optional[str] = None, lane: str = "loop") -> "QueuedEditor":
        """An `Editor` whose edits go through this queue's `lane` (so the loop's edits batch with other loops')."""
        return QueuedEditor(self, name or getattr(self.editor, "name", "queued"), lane=lane)

    # -- the worker
    def _lane(self) -> Optional[str]:
        edits, loops = self._pending["edit"], self._pending["loop"]
        if edits and (not loops or self._edit_streak < self.edit_turns):
            self._edit_streak = self._edit_streak + 1 if loops else 0
            return "edit"
        if loops:
            self._edit_streak = 0
            return "loop"
        return None

    def _gather(self) -> list[_Job]:
        with self._cond:
            lane = self._lane()
            if lane is None:
                self._cond.wait(0.05)
                lane = self._lane()
                if lane is None:
                    return []
            pending = self._pending[lane]
            jobs = [pending.popleft()]
            deadline = time.perf_counter() + self.batch_wait
            while len(jobs) < self.max_batch and not self._stop.is_set():
                if pending:
                    jobs.append(pending.popleft())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or (lane == "loop" and self._pending["edit"]):
                    break  # a plain edit arrived: do not make it wait for company of the loop batch
                self._cond.wait(remaining)
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._gather()
            live = [j for j in jobs if not j.is_given_up() and j.future.set_running_or_notify_cancel()]
            if len(live) < len(jobs):
                with self._stats_lock:
                    self.stats.cancelled += len(jobs) - len(live)
            if live:
                self._edit(live)

    def _edit(self, jobs: Sequence[_Job]) -> None:
        self.in_flight, self._running = len(jobs), list(jobs)
        t0 = time.perf_counter()
        try:
            with self.model_lock, cancel.cancel_scope(lambda: all(j.is_given_up() for j in jobs)):
                images = self.editor.edit([j.request for j in jobs])
            if len(images) != len(jobs):
                raise RuntimeError(f"editor returned {len(images)} images for {len(jobs)} requests")
        except cancel.Cancelled as e:  # every request of the batch was given up: nobody waits for an answer
            with self._stats_lock:
                self.stats.stopped += len(jobs)
            for job in jobs:
                job.future.set_exception(e)
            self.in_flight, self._running = 0, []
            return
        except Exception as e:
            self.in_flight, self._running = 0, []
            if len(jobs) > 1:  # find the culprit: one bad request must not fail its neighbours
                log.warning("a batch of %d failed (%s: %s); running its requests one by one", len(jobs),
                            type(e).__name__, e)
                for job in jobs:
                    if job.is_given_up():
                        with self._stats_lock:
                            self.stats.cancelled += 1
                        job.future.set_exception(cancel.Cancelled("given up before its own run"))
                    else:
                        self._edit([job])
                return
            log.warning("edit failed: %s: %s", type(e).__name__, e)
            with self._stats_lock:
                self.stats.failed += 1
            jobs[0].future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        with self._stats_lock:
            s = self.stats
            s.batches += 1
            s.batched += len(jobs)
            s.max_batch_size = max(s.max_batch_size, len(jobs))
            s.served += len(jobs)
            s.loop_edits += sum(j.lane == "loop" for j in jobs)
            s.edit_seconds += seconds
        for job, image in zip(jobs, images):
            job.future.set_result(np.asarray(image))
        self.in_flight, self._running = 0, []


class QueuedEditor:
    """An `Editor` that submits to an `EditBatcher`'s lane and waits for its answers. Inside a cancel scope
    that is given up (the loop's request timed out) it abandons its edits and raises `Cancelled`."""

    def __init__(self, batcher: EditBatcher, name: str, timeout: Optional[float] = None, lane: str = "loop"):
        self.batcher, self.name, self.timeout, self.lane = batcher, name, timeout, lane

    def edit(self, requests: Sequence[EditRequest]) -> list[np.ndarray]:
        scope = cancel.current()
        tickets = [self.batcher.submit(r, self.lane, given_up=scope) for r in requests]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            out = []
            for ticket in tickets:
                while True:
                    if cancel.requested():
                        raise cancel.Cancelled("the loop's edit was cancelled: its caller gave it up")
                    wait = 0.05 if deadline is None else min(0.05, max(0.0, deadline - time.monotonic()))
                    try:
                        out.append(ticket.future.result(timeout=wait))
                        break
                    except TimeoutError:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise
            return out
        except BaseException:
            for ticket in tickets:
                ticket.abandon()
            raise


class LockedThinker:
    """A `Thinker` that holds the model lock while it runs, for a thinker on the served model."""

    def __init__(self, thinker: Thinker, lock: threading.Lock):
        self.thinker, self.lock = thinker, lock
        self.name = getattr(thinker, "name", type(thinker).__name__)
        self.loop = getattr(thinker, "loop", None)  # the loop's rules the thinker was built for

    def think(self, sources: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
        with self.lock:
            return self.thinker.think(sources, instructions)

    def reflect(self, sources: Sequence[np.ndarray], edited: Sequence[np.ndarray], instructions: Sequence[str],
                previous: Sequence[Optional[str]]) -> list[Reflection]:
        with self.lock:
            return self.thinker.reflect(sources, edited, instructions, previous)


__all__ = ["LANES", "BatcherStats", "EditBatcher", "LockedThinker", "QueueFull", "QueuedEditor", "ShuttingDown", "Ticket"]
