"""One module per benchmark; `BENCHMARKS` maps each name to its class, `get_benchmark` makes one."""

from typing import Any

from ..benchmark import Benchmark

from .gedit import GEditBenchmark
from .imgedit import ImgEditBenchmark
from .kris import KrisBenchmark
from .rise import RiseBenchmark
from .shapes import ShapesBenchmark

BENCHMARKS = {
    "shapes": ShapesBenchmark,
    "gedit": GEditBenchmark,
    "imgedit": ImgEditBenchmark,
    "kris": KrisBenchmark,
    "rise": RiseBenchmark,
}



def get_benchmark(name: str, **options: Any) -> Benchmark:
    """A fresh benchmark by name (not loaded yet)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](**options)


__all__ = ["BENCHMARKS", "get_benchmark", "GEditBenchmark", "ImgEditBenchmark", "KrisBenchmark", "RiseBenchmark", "ShapesBenchmark"]
