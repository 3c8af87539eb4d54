"""Samples per second of the synthetic shapes world on one core: generated, and generated + written.

    python bench/synth.py [--n 200] [--image-size 224]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from reasonedit.shapes.world import ShapesWorld, WorldConfig
from reasonedit.shapes.synth import KINDS, SynthConfig, Synthesizer, synthesize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200, help="records of each kind")
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    world = ShapesWorld(WorldConfig(image_size=args.image_size))
    print(f"one core, {args.image_size}x{args.image_size} images, {args.n} records of each kind, split train")
    print(f"{'kind':<16} {'generated/s':>12}")
    synth = Synthesizer(world, seed=0)
    for kind in KINDS:
        started = time.perf_counter()
        for i in range(args.n):
            synth.make(kind, "train", i)
        print(f"{kind:<16} {args.n / (time.perf_counter() - started):>12.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        config = SynthConfig(n=args.n, splits=("train",), shard_size=100)
        started = time.perf_counter()
        synthesize(os.path.join(tmp, "d"), config, world)
        total = args.n * len(KINDS)
        print(f"{'all, written':<16} {total / (time.perf_counter() - started):>12.0f}  "
              f"(generated, PNG-encoded and written to tar shards)")


if __name__ == "__main__":
    main()
