"""The stage's batch stream: loader -> preprocess -> packer, with a state that resumes it exactly.

Global micro-batch g of a run goes to rank g % world_size, so one optimiser step of W ranks x A
micro-batches takes the same W * A batches as one process with W * A micro-batches: that is what makes a
2-rank run equal to a 1-rank run. Where the batches come from is `train.data_streams`:

- 0 (`BatchStream`): every rank reads the same record stream and packs the same sequence of batches, and
  keeps every world_size-th. Each rank reads, preprocesses and encodes every record: fine for small runs.
- S > 0 (`SplitBatchStream`): the data is split into S streams by the loader's shard split (stream s reads
  the shards of "rank" s of S), each packed on its own; global batch g comes from stream g % S, and rank r
  owns the streams s = r (mod W). A rank reads, preprocesses and VAE-encodes only its own streams' records,
  1/W of the data. S must be a multiple of W; the same S on W ranks with A micro-batches and on one process
  with W x A micro-batches trains the same batches.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator

from reasonedit.data.loader import (DatasetSpec, LoaderError, LoaderStats, Sources, StreamingLoader, as_sources,
                                    kind_specs, make_loader)
from reasonedit.data.packing import PackedBatch, Packer, PackerStats


class BatchStream:
    """loader -> segments -> packer. `segments(sample)`: a `LoadedSample`'s segments (what the loader's transform
    prepared in its worker, finished here, e.g. latents encoded on the VAE's device)."""

    def __init__(self, loader: StreamingLoader, packer: Packer, segments: Callable[[Any], list],
                 rank: int = 0, world_size: int = 1):
        self.loader, self.packer, self.segments = loader, packer, segments
        self.rank, self.world_size = rank, world_size
        self.ready: deque[PackedBatch] = deque()  # packed, not yet handed out
        self.handed_out = 0  # global batches consumed (all ranks')
        self._records: Iterator | None = None

    def _next_global(self) -> PackedBatch:
        while not self.ready:
            if self._records is None:
                self._records = iter(self.loader)
            sample = next(self._records)  # an infinite stream: never StopIteration
            for seg in self.segments(sample):
                self.ready.extend(self.packer.add(seg))
        self.handed_out += 1
        return self.ready.popleft()

    def next(self) -> PackedBatch:
        """This rank's next batch: of the next world_size global batches, the rank-th."""
        batches = [self._next_global() for _ in range(self.world_size)]
        return batches[self.rank]

    @property
    def utilisation(self) -> float:
        return self.packer.stats.utilisation

    @property
    def records(self) -> int:
        """Records this stream has read and preprocessed."""
        return sum(self.loader.stats().yielded.values())

    @property
    def loader_stats(self) -> LoaderStats:
        """Records yielded and skipped (by dataset and reason) so far, resumed runs included."""
        return self.loader.stats()

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "packer": self.packer.state_dict(),
                "ready": list(self.ready), "handed_out": self.handed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.packer.load_state_dict(state["packer"])
        self.ready = deque(state["ready"])
        self.handed_out = state["handed_out"]
        self._records = None  # a fresh iterator continues from the restored loader state


class SplitBatchStream:
    """This rank's share of S streams: global batch g comes from stream g % S; the rank holds s = rank (mod W)."""

    def __init__(self, make_stream: Callable[[int, int], BatchStream], streams: int, rank: int, world_size: int):
        if streams < world_size or streams % world_size:
            raise ValueError(f"train.data_streams: {streams} streams cannot be split over {world_size} ranks; use a "
                             f"multiple of the rank count ({world_size}, {2 * world_size}, ...)")
        self.count, self.rank, self.world_size = streams, rank, world_size
        self.streams = {s: make_stream(s, streams) for s in range(rank, streams, world_size)}
        self.handed_out = 0  # this rank's batches

    def next(self) -> PackedBatch:
        g = self.rank + self.handed_out * self.world_size
        self.handed_out += 1
        return self.streams[g % self.count].next()

    @property
    def utilisation(self) -> float:
        """Real tokens / budget tokens over all this rank's streams (mean over budgets), by PackerStats' rule."""
        stats = [s.packer.stats for s in self.streams.values()]
        return PackerStats(tokens=[sum(t) for t in zip(*(x.tokens for x in stats))],
                           budget_tokens=[sum(b) for b in zip(*(x.budget_tokens for x in stats))]).utilisation

    @property
    def records(self) -> int:
        return sum(s.records for s in self.streams.values())

    @property
    def loader_stats(self) -> LoaderStats:
        """This rank's streams' loader stats, summed."""
        total = LoaderStats()
        for s in self.streams.values():
            total = total.merge(s.loader_stats)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "handed_out": self.handed_out,
                "streams": {s: st.state_dict() for s, st in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("count") != self.count:
            raise ValueError(f"the checkpoint's data was split into {state.get('count', 0)} streams "
                             f"(train.data_streams), this run into {self.count}: resume with the same value")
        self.handed_out = state["handed_out"]
        for s, st in self.streams.items():
            st.load_state_dict(state["streams"][s])



def stage_specs(data: Sources, mix: dict[str, float]) -> list[DatasetSpec]:
    """The loader's datasets for a stage: for each record kind of the mix, every source that holds train records
    of it, the kind's weight split over them in proportion to their weights (`data.loader.kind_specs`)."""
    specs = []
    for kind, w in mix.items():
        found = kind_specs(data, kind, "train", w)
        if not found:
            raise FileNotFoundError(f"no train records of kind {kind!r} (in the stage's mix) in any of the stage's "
                                    f"datasets {[str(p) for p, _ in as_sources(data)]}")
        specs += found
    return specs


def stage_loader(data: Sources, mix: dict[str, float], seed: int, shuffle_buffer: int,
                 num_workers: int = 0, part: int = 0, parts: int = 1,
                 transform: Callable[[Any], Any] | None = None) -> StreamingLoader:
    """The stage's endless train stream over `data` (one dataset directory, or (directory, weight) pairs), or its
    part `part` of `parts` (the loader's shard split, as if `part` were a rank of `parts`); `transform` runs on
    each record in the loader worker that reads it."""
    try:
        return make_loader(stage_specs(data, mix), seed=seed, num_workers=num_workers, rank=part, world_size=parts,
                           shuffle_buffer=shuffle_buffer, epochs=None, transform=transform)
    except LoaderError as e:
        if parts == 1:
            raise
        raise LoaderError(f"train.data_streams={parts} (each stream reads its part of the shards as a rank would): "
                          f"{e}") from None


__all__ = ["BatchStream", "Sources", "SplitBatchStream", "stage_loader", "stage_specs"]
