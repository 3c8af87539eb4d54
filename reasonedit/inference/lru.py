"""The least-recently-used store behind the inference caches (vision embeddings, prefix KV caches, condition
prefixes, target descriptions)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `capacity` values; reading or writing a key makes it the most recent, the least recent goes first.
    `what` names the cache in the capacity error."""

    def __init__(self, capacity: int, what: str = "cache"):
        if capacity < 1:
            raise ValueError(f"{what} capacity: must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> Optional[V]:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


__all__ = ["LRU"]
