"""Cooperative cancellation: work that its caller gave up (a request that timed out) stops at its next check.

Whoever runs work on someone's behalf opens a scope with the question "has it been given up?":

    with cancel_scope(lambda: job.abandoned):
        editor.edit(batch)          # the sampler checks before every step, the loop before every phase

and the long-running parts call `check()` at their natural boundaries: the flow-matching sampler before each
Euler step, the think -> edit -> reflect loop before each phase, the built-in reasoner before each generation
and, on its prefix cache's decode path, before each token. A check in a given-up scope raises `Cancelled`; outside any scope it costs one
context-variable read and never raises. The scope lives in a `ContextVar`, so it belongs to the thread (or
task) that opened it: the edit worker's scope covers exactly the batch it is running.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

ShouldStop = Callable[[], bool]

_scope: ContextVar[Optional[ShouldStop]] = ContextVar("reasonedit_cancel_scope", default=None)


class Cancelled(Exception):
    """The work was given up by whoever asked for it; raised at the next `check()` in its scope."""


@contextmanager
def cancel_scope(should_stop: ShouldStop) -> Iterator[None]:
    """Within the block, `check()` raises `Cancelled` once `should_stop()` is true. Scopes nest: an inner scope
    also stops when an outer one does."""
    outer = _scope.get()
    token = _scope.set(should_stop if outer is None else (lambda: should_stop() or outer()))
    try:
        yield
    finally:
        _scope.reset(token)


def current() -> Optional[ShouldStop]:
    """The current scope's question (None outside any scope), for work handed to another thread on its behalf."""
    return _scope.get()


def requested() -> bool:
    """Whether the current scope's work has been given up (False outside any scope)."""
    should_stop = _scope.get()
    return should_stop is not None and bool(should_stop())


def check(what: str = "the work") -> None:
    """Raise `Cancelled` when the current scope's work has been given up."""
    if requested():
        raise Cancelled(f"{what} was cancelled: its caller gave it up")


__all__ = ["Cancelled", "cancel_scope", "check", "current", "requested"]
