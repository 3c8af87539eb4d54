"""Progress of long work: the callback type every long loop takes, and the stderr line the CLI passes."""

from __future__ import annotations

import sys
import time
from typing import Callable

Progress = Callable[[str, int, int], None]  # progress(label, done, total)


class ProgressLine:
    """A `Progress` that prints one line on stderr: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, stream=None):
        stream = stream or sys.stderr  # looked up per call: a stream bound at import time may be closed since
        self.stream, self.tty = stream, stream.isatty()
        self.started = time.perf_counter()
        self.last_draw, self.last_tenth = 0.0, -1

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.perf_counter()
        tenth = done * 10 // total
        if self.tty and (now - self.last_draw > 0.2 or done == total):
            rate = done / max(now - self.started, 1e-9)
            self.stream.write(f"\r  {done}/{total} records ({rate:.0f}/s) {label:<28}")
            if done == total:
                self.stream.write("\n")
            self.last_draw = now
        elif not self.tty and tenth != self.last_tenth:
            rate = done / max(now - self.started, 1e-9)
            self.stream.write(f"  {done}/{total} records ({rate:.0f}/s) {label}\n")
            self.last_tenth = tenth
        self.stream.flush()


__all__ = ["Progress", "ProgressLine"]
