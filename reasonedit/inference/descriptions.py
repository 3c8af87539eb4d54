"""The reflection's description of the expected target, kept per (source image, user instruction).

The description depends only on the source and the user's instruction, never on a round's edit, so a
thinker asks for it once per sample and every later round of the loop (and a later request about the same
source and instruction) reads it back. Only descriptions that parsed are kept: a failed one is asked again.
"""

from __future__ import annotations

import threading
from typing import Optional

from reasonedit.inference.lru import LRU
from reasonedit.inference.vision_cache import image_key


class TargetDescriptions:
    """Least-recently-used store of `capacity` parsed target descriptions; `hits` answers read back."""

    def __init__(self, capacity: int = 256):
        self._store: LRU[tuple[bytes, str], tuple[str, str]] = LRU(capacity, "TargetDescriptions")
        self.capacity = capacity
        self._lock = threading.Lock()  # OpenAIThinker reflects from a thread pool
        self.hits = 0

    @staticmethod
    def key(source, instruction: str) -> tuple[bytes, str]:
        return image_key(source), instruction

    def get(self, key: tuple[bytes, str]) -> Optional[tuple[str, str]]:
        """(raw reply, description) stored for `key`, or None."""
        with self._lock:
            found = self._store.get(key)
            if found is not None:
                self.hits += 1
            return found

    def put(self, key: tuple[bytes, str], raw: str, description: str) -> None:
        with self._lock:
            self._store.put(key, (raw, description))

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()


__all__ = ["TargetDescriptions"]
