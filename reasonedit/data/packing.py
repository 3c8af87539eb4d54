"""Packing samples into fixed token budgets, and packed segments into the models' inputs.

The packer is generic: an item is anything with a length, one int per budget. The three streams:

- stage 1, reasoner: `Packer(budget=R)` over `ReasonerSegment`s (length `num_tokens`);
- stage 2, generator: `Packer(budget=G)` over `GeneratorSegment`s (length `num_tokens`, the
  generator row; the frozen reasoner's condition forward runs without gradients, in chunks, or
  from a cache, so it is not budgeted);
- stage 3, mixed: `Packer(budget=(R, G), length=stage3_lengths)`. Two budgets, not one combined:
  each step runs two forwards, the reasoner's row and the generator's row, and each row's memory
  and time depend on its own length and its own model's width, so a combined count would let
  either row overflow. A generator segment costs its condition prompt in the reasoner's row (the
  reasoner trains through the condition states in stage 3, so those prompts share the forward
  with the next-token segments) and its text + latents in the generator's row; a reasoner
  segment costs (n, 0). Items fit a bin when they fit every budget; utilisation is reported per
  budget and as their mean.

Algorithm: best-fit-decreasing over a window. Items enter the window as they come; when it holds
`window` items, they are packed best-fit-decreasing (largest first, each into the fullest bin it
fits) and every bin at least `min_fill` full leaves as a batch; the rest stay in the window to
combine with the next items. When no bin is full enough, the fullest one leaves anyway, so the
window never grows past `window`. An item that has waited `max_age` arrivals (default 4 x window)
leaves at once, in a bin built around it and filled largest-first from the window: without that
bound an awkward item can wait for tens of thousands of samples (measured: 13k on the shapes
mix), which skews what the model sees when. `flush()` empties the window at the end.
Everything is a function of the input order: ties go to the earlier item and the earlier bin.

Oversize rule: an item longer than the budget (in any dimension) is skipped: counted in
`stats.oversize` (with its tokens and, for the first 100, its key) and logged; it is never
truncated. A reasoner segment cannot be cut safely: its image tokens must all be there to match
its pixel values, and its answer, the only labelled tokens, sits at the end. A generator sample's
latents cannot be cut either. The remedy is a larger budget or a smaller bucket, which the log says.

What a packed batch becomes for the models (next-token rows, noisy generator rows, stage 3's mixed
row) is `reasonedit.models.inputs`.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, Sequence, TypeVar, Union


log = logging.getLogger(__name__)

# Packed rows are multiples of this many tokens: the block of the attention kernel's block mask
# (`reasonedit.models.attention` pads rows to it), so a full row never needs padding.
BLOCK = 128

T = TypeVar("T")
Lengths = tuple[int, ...]
OVERSIZE_KEYS_KEPT = 100  # keys of the first oversize items, for the report; the count is exact
OVERSIZE_LOGGED = 10  # oversize items logged one by one; after that, one line per power of ten


# ---------------------------------------------------------------------------------------------------
# Best-fit-decreasing


def _scaled_size(length: Lengths, budget: Lengths) -> float:
    return sum(n / b for n, b in zip(length, budget))


def best_fit_decreasing(lengths: Sequence[Lengths], budget: Lengths) -> list[list[int]]:
    """Group item indices into bins within `budget`: largest first (ties: earlier item), each into the
    bin it leaves least room in (ties: earlier bin). Every length must fit the budget on its own.

    Several budgets: sizes and room are summed over dimensions, each scaled by its budget.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-_scaled_size(lengths[i], budget), i))
    bins: list[list[int]] = []
    if len(budget) == 1:
        # one budget: keep (room left, bin) sorted and bisect for the tightest bin that fits
        cap = budget[0]
        rooms: list[tuple[int, int]] = []
        for i in order:
            n = lengths[i][0]
            at = bisect.bisect_left(rooms, (n, -1))
            if at == len(rooms):
                bins.append([i])
                bisect.insort(rooms, (cap - n, len(bins) - 1))
            else:
                room, b = rooms.pop(at)
                bins[b].append(i)
                bisect.insort(rooms, (room - n, b))
        return bins
    room_left: list[list[int]] = []
    for i in order:
        best, best_slack = -1, float("inf")
        for b, room in enumerate(room_left):
            if all(n <= r for n, r in zip(lengths[i], room)):
                slack = sum((r - n) / c for n, r, c in zip(lengths[i], room, budget))
                if slack < best_slack:
                    best, best_slack = b, slack
        if best < 0:
            bins.append([i])
            room_left.append([c - n for n, c in zip(lengths[i], budget)])
        else:
            bins[best].append(i)
            room_left[best] = [r - n for n, r in zip(lengths[i], room_left[best])]
    return bins


# ---------------------------------------------------------------------------------------------------
# Batches and statistics


@dataclass(eq=False)
class PackedBatch(Generic[T]):
    """Items that go into one step, in arrival order, with their lengths and the budget they share."""

    items: list[T]
    lengths: list[Lengths]
    budget: Lengths
    reason: str  # why it left the window: full | window | age | flush

    @property
    def tokens(self) -> Lengths:
        """Real tokens per budget."""
        return tuple(sum(n[d] for n in self.lengths) for d in range(len(self.budget)))

    @property
    def utilisations(self) -> tuple[float, ...]:
        """Real tokens / budget, per budget."""
        return tuple(t / b for t, b in zip(self.tokens, self.budget))

    @property
    def utilisation(self) -> float:
        """Real tokens / budget (the mean over budgets when there are several)."""
        u = self.utilisations
        return sum(u) / len(u)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class PackerStats:
    """Running totals since the packer started (or since the state it was restored from)."""

    batches: int = 0
    items: int = 0
    tokens: list[int] = field(default_factory=list)  # real tokens emitted, per budget
    budget_tokens: list[int] = field(default_factory=list)  # batches * budget, per budget
    below_min_fill: int = 0  # batches that left the window less than min_fill full
    oversize: int = 0
    oversize_tokens: list[int] = field(default_factory=list)
    oversize_keys: list[str] = field(default_factory=list)  # the first OVERSIZE_KEYS_KEPT

    @property
    def utilisations(self) -> tuple[float, ...]:
        return tuple(t / b if b else 0.0 for t, b in zip(self.tokens, self.budget_tokens))

    @property
    def utilisation(self) -> float:
        """Real tokens / budget tokens over every batch so far (mean over budgets)."""
        u = self.utilisations
        return sum(u) / len(u) if u else 0.0


def default_length(item: Any) -> Union[int, Sequence[int]]:
    """An int is its own length; otherwise `num_tokens`, else `len()`."""
    if isinstance(item, int):
        return item
    if hasattr(item, "num_tokens"):
        return item.num_tokens
    return len(item)


def default_key(item: Any) -> str:
    key = getattr(item, "key", None)
    return str(key) if key is not None else repr(item)[:80]


# ---------------------------------------------------------------------------------------------------
# The packer


@dataclass
class _Pending(Generic[T]):
    seq: int  # arrival number: the tie-breaker and the age
    item: T
    length: Lengths


class Packer(Generic[T]):
    """Streaming best-fit-decreasing packer into a token budget (one int, or one per row in stage 3).

    `add(item)` returns the batches that leave the window (often none), `flush()` the rest at the end
    of the stream, and `pack(items)` does both over an iterable. `pending()` and `state_dict()` give
    the window's contents for a checkpoint; `load_state_dict` puts them back so the batches that
    follow are the ones an uninterrupted run would have made.
    """

    def __init__(
        self,
        budget: Union[int, Sequence[int]],
        window: int = 256,
        *,
        length: Callable[[T], Union[int, Sequence[int]]] = default_length,
        key: Callable[[T], str] = default_key,
        min_fill: float = 0.99,
        max_age: Optional[int] = None,  # None: 4 * window
        multiple: int = BLOCK,
        name: str = "packer",
    ):
        self.budget: Lengths = (int(budget),) if isinstance(budget, int) else tuple(int(b) for b in budget)
        if not self.budget or any(b <= 0 or b % multiple for b in self.budget):
            fixed = [max(multiple, -(-b // multiple) * multiple) for b in self.budget]
            raise ValueError(f"{name}: budget {list(self.budget)} must be positive multiples of {multiple} "
                             f"(the attention block size a packed row is padded to); use {fixed}")
        if window < 1:
            raise ValueError(f"{name}: window must hold at least one item, got {window}")
        if not 0.0 < min_fill <= 1.0:
            raise ValueError(f"{name}: min_fill must lie in (0, 1], got {min_fill}")
        max_age = 4 * window if max_age is None else max_age
        if max_age < window:
            raise ValueError(f"{name}: max_age={max_age} is below window={window}; a bound shorter than the window "
                             "would force most bins out early, so use max_age >= window")
        self.window, self.min_fill, self.max_age, self.name = window, min_fill, max_age, name
        self._length, self._key = length, key
        self._pending: list[_Pending[T]] = []
        self._seq = 0
        self.stats = self._fresh_stats()

    def _fresh_stats(self) -> PackerStats:
        zeros = [0] * len(self.budget)
        return PackerStats(tokens=list(zeros), budget_tokens=list(zeros), oversize_tokens=list(zeros))

    # -- input ----------------------------------------------------------------------------------

    def lengths_of(self, item: T) -> Lengths:
        raw = self._length(item)
        length = (int(raw),) if isinstance(raw, int) else tuple(int(n) for n in raw)
        if len(length) != len(self.budget):
            raise ValueError(f"{self.name}: item {self._key(item)} has {len(length)} lengths for "
                             f"{len(self.budget)} budgets")
        if any(n < 0 for n in length) or not any(length):
            raise ValueError(f"{self.name}: item {self._key(item)} has lengths {list(length)}; need non-negative "
                             "token counts, not all zero")
        return length

    def add(self, item: T) -> list[PackedBatch[T]]:
        """Take one item; return the batches that leave the window because of it."""
        length = self.lengths_of(item)
        if any(n > b for n, b in zip(length, self.budget)):
            self._oversize(item, length)
            return []
        self._pending.append(_Pending(self._seq, item, length))
        self._seq += 1
        if len(self._pending) < self.window and not self._aged(self._pending[0]):
            return []
        return self._emit()

    def _oversize(self, item: T, length: Lengths) -> None:
        s = self.stats
        s.oversize += 1
        s.oversize_tokens = [t + n for t, n in zip(s.oversize_tokens, length)]
        if len(s.oversize_keys) < OVERSIZE_KEYS_KEPT:
            s.oversize_keys.append(self._key(item))
        if s.oversize <= OVERSIZE_LOGGED or str(s.oversize).rstrip("0") == "1":
            log.warning("%s: skipped %s: %s tokens is over the budget %s (%d oversize so far); raise the budget "
                        "or lower the bucket pixel budget", self.name, self._key(item), list(length),
                        list(self.budget), s.oversize)

    def pack(self, items: Iterable[T]) -> Iterator[PackedBatch[T]]:
        """Every batch of a stream: as items come in, then the window flushed at the end."""
        for item in items:
            yield from self.add(item)
        yield from self.flush()

    # -- output ---------------------------------------------------------------------------------

    def _bins(self) -> list[list[_Pending[T]]]:
        groups = best_fit_decreasing([p.length for p in self._pending], self.budget)
        return [sorted((self._pending[i] for i in g), key=lambda p: p.seq) for g in groups]

    def _fill(self, members: Sequence[_Pending[T]]) -> float:
        return sum(_scaled_size(p.length, self.budget) for p in members) / len(self.budget)

    def _emit(self) -> list[PackedBatch[T]]:
        if self._aged(self._pending[0]):
            batches = []
            while self._pending and self._aged(self._pending[0]):
                batches += self._release([(self._fill_around_aged(), "age")])
            return batches
        bins = self._bins()
        fills = [self._fill(b) for b in bins]
        full = [(b, "full") for b, fill in zip(bins, fills) if fill >= self.min_fill]
        if not full:  # the window is full and no bin is full enough: the fullest one goes
            full = [(bins[max(range(len(bins)), key=lambda b: (fills[b], -b))], "window")]
        return self._release(full)

    def _aged(self, p: _Pending[T]) -> bool:
        return p.seq <= self._seq - 1 - self.max_age

    def _fill_around_aged(self) -> list[_Pending[T]]:
        """A bin that takes the items which waited too long (oldest first, as many as fit), then is
        filled largest-first from the rest of the window.

        Emitting whichever bin BFD happened to give an old item would often be a poor one: the items
        that age are the awkward ones, which BFD leaves to its last, emptiest bins.
        """
        room = list(self.budget)
        members = []
        aged = [p for p in self._pending if self._aged(p)]
        rest = sorted((p for p in self._pending if not self._aged(p)),
                      key=lambda p: (-_scaled_size(p.length, self.budget), p.seq))
        for p in aged + rest:
            if all(n <= r for n, r in zip(p.length, room)):
                members.append(p)
                room = [r - n for n, r in zip(p.length, room)]
        return sorted(members, key=lambda p: p.seq)

    def flush(self) -> list[PackedBatch[T]]:
        """Pack and return everything still in the window (end of stream)."""
        if not self._pending:
            return []
        return self._release([(b, "flush") for b in self._bins()])

    def _release(self, chosen: list[tuple[list[_Pending[T]], str]]) -> list[PackedBatch[T]]:
        chosen.sort(key=lambda c: c[0][0].seq)  # oldest first
        gone = {p.seq for members, _ in chosen for p in members}
        self._pending = [p for p in self._pending if p.seq not in gone]
        batches = []
        s = self.stats
        for members, reason in chosen:
            batch = PackedBatch([p.item for p in members], [p.length for p in members], self.budget, reason)
            s.batches += 1
            s.items += len(batch)
            s.tokens = [t + n for t, n in zip(s.tokens, batch.tokens)]
            s.budget_tokens = [t + b for t, b in zip(s.budget_tokens, self.budget)]
            s.below_min_fill += batch.utilisation < self.min_fill
            batches.append(batch)
        return batches

    # -- checkpointing --------------------------------------------------------------------------

    def pending(self) -> list[T]:
        """The items waiting in the window, in arrival order."""
        return [p.item for p in self._pending]

    def state_dict(self) -> dict[str, Any]:
        """The window and the running totals. The items are returned as they are: a trainer saves
        whatever identifies them (keys, or the segments themselves) and gives them back on load."""
        return {"pending": self.pending(), "seqs": [p.seq for p in self._pending], "next_seq": self._seq,
                "stats": asdict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a window saved by `state_dict` (`pending` may hold re-made items, in the same order)."""
        for name in ("pending", "stats"):
            if name not in state:
                raise KeyError(f"{self.name}: packer state has no {name!r}; save it with Packer.state_dict()")
        items = list(state["pending"])
        seqs = list(state.get("seqs", range(len(items))))
        if len(seqs) != len(items):
            raise ValueError(f"{self.name}: packer state has {len(items)} pending items but {len(seqs)} seqs")
        self._pending = [_Pending(q, item, self.lengths_of(item)) for q, item in zip(seqs, items)]
        self._seq = int(state.get("next_seq", len(items)))
        self.stats = PackerStats(**state["stats"])


__all__ = ["BLOCK", "PackedBatch", "Packer", "PackerStats", "best_fit_decreasing", "default_key", "default_length"]
