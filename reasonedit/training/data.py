"""The stage's batch stream: loader -> preprocess -> packer, with a state that resumes it exactly.

Every rank reads the same record stream and packs the same sequence of batches; global batch g
goes to rank g % world_size. So one optimiser step of W ranks x A micro-batches takes the same
W * A consecutive batches as one process with W * A micro-batches, which is what makes a 2-rank
run equal to a 1-rank run. (Each rank decodes every record: right for the tiny and mid-size runs
this targets; sharding records over ranks is the loader's `rank=` and changes which batches exist.)
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

from reasonedit.data.loader import DatasetSpec, StreamingLoader, make_loader
from reasonedit.data.packing import PackedBatch, Packer
from reasonedit.data.shards import holds


class BatchStream:
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
            for seg in self.segments(sample.record):
                self.ready.extend(self.packer.add(seg))
        self.handed_out += 1
        return self.ready.popleft()

    def next(self) -> PackedBatch:
        """This rank's next batch: of the next world_size global batches, the rank-th."""
        batches = [self._next_global() for _ in range(self.world_size)]
        return batches[self.rank]

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "packer": self.packer.state_dict(),
                "ready": list(self.ready), "handed_out": self.handed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.packer.load_state_dict(state["packer"])
        self.ready = deque(state["ready"])
        self.handed_out = state["handed_out"]
        self._records = None  # a fresh iterator continues from the restored loader state


Sources = Union[str, Path, Sequence[tuple[Union[str, Path], float]]]


def stage_specs(data: Sources, mix: dict[str, float]) -> list[DatasetSpec]:
    """The loader's datasets for a stage: for each record kind of the mix, every source that holds train records
    of it, the kind's weight split over them in proportion to their weights. One source: every kind is read
    from it (the loader names a kind it lacks)."""
    sources = [(Path(data), 1.0)] if isinstance(data, (str, Path)) else [(Path(p), float(w)) for p, w in data]
    if len(sources) == 1:
        return [DatasetSpec(kind, sources[0][0], split="train", kind=kind, weight=w) for kind, w in mix.items()]
    specs, names = [], set()
    for kind, w in mix.items():
        having = [(p, sw) for p, sw in sources if holds(p, "train", kind)]
        if not having:
            raise FileNotFoundError(f"no train records of kind {kind!r} (in the stage's mix) in any of the stage's "
                                    f"datasets {[str(p) for p, _ in sources]}")
        total = sum(sw for _, sw in having)
        for p, sw in having:
            name = f"{p.name}/{kind}"
            while name in names:
                name += "'"
            names.add(name)
            specs.append(DatasetSpec(name, p, split="train", kind=kind, weight=w * sw / total))
    return specs


def stage_loader(data: Sources, mix: dict[str, float], seed: int, shuffle_buffer: int,
                 num_workers: int = 0) -> StreamingLoader:
    """The stage's endless train stream over `data`: one dataset directory, or (directory, weight) pairs."""
    return make_loader(stage_specs(data, mix), seed=seed, num_workers=num_workers, rank=0, world_size=1,
                       shuffle_buffer=shuffle_buffer, epochs=None)


__all__ = ["BatchStream", "Sources", "stage_loader", "stage_specs"]
