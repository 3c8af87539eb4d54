"""One module per benchmark; `BENCHMARKS` maps each name to its class."""

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

__all__ = ["BENCHMARKS", "GEditBenchmark", "ImgEditBenchmark", "KrisBenchmark", "RiseBenchmark", "ShapesBenchmark"]
