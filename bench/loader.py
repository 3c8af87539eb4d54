"""Samples per second read from tar shards and decoded by the streaming loader, by worker count.

Writes a synthetic dataset to a temporary directory, then reads one epoch of it with each
worker count, and times a resume from the middle of the epoch.

    python bench/loader.py [--n 750] [--image-size 224] [--workers 0 1 2] [--shuffle-buffer 500]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from reasonedit.data.loader import DatasetSpec, make_loader
from reasonedit.shapes.world import ShapesWorld, WorldConfig
from reasonedit.shapes.synth import KINDS, SynthConfig, synthesize


def read_epoch(spec: DatasetSpec, workers: int, buffer: int) -> tuple[int, float, float]:
    """(samples, seconds to the first sample, seconds for the whole epoch)."""
    loader = make_loader([spec], seed=0, num_workers=workers, shuffle_buffer=buffer, epochs=1)
    started = time.perf_counter()
    first = None
    n = 0
    for _ in loader:
        n += 1
        if first is None:
            first = time.perf_counter() - started
    return n, first or 0.0, time.perf_counter() - started


def resume_latency(spec: DatasetSpec, buffer: int, at: int) -> tuple[float, float]:
    """Seconds to the first sample of a fresh loader, and of one restored `at` samples into the epoch."""
    def build():
        return make_loader([spec], seed=0, num_workers=0, shuffle_buffer=buffer, epochs=1)
    started = time.perf_counter()
    it = iter(build())
    next(it)
    fresh = time.perf_counter() - started
    it.close()
    loader = build()
    it = iter(loader)
    for _ in range(at):
        next(it)
    state = loader.state_dict()
    it.close()
    started = time.perf_counter()
    resumed = build()
    resumed.load_state_dict(state)
    it = iter(resumed)
    next(it)
    restored = time.perf_counter() - started
    it.close()
    return fresh, restored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=750, help="records of each of the four kinds")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shuffle-buffer", type=int, default=500)
    args = ap.parse_args()
    world = ShapesWorld(WorldConfig(image_size=args.image_size))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "shapes")
        started = time.perf_counter()
        synthesize(out, SynthConfig(n=args.n, splits=("train",), shard_size=args.shard_size), world)
        total = args.n * len(KINDS)
        print(f"{total} records ({args.n} of each kind), {args.image_size}x{args.image_size} images, "
              f"{args.shard_size} per shard, written in {time.perf_counter() - started:.1f}s; "
              f"{os.cpu_count()} CPUs, shuffle buffer {args.shuffle_buffer}")
        spec = DatasetSpec("shapes", out, split="train")
        print(f"{'workers':>7} {'samples/s':>10} {'first sample':>13} {'epoch':>7}")
        for workers in args.workers:
            n, first, seconds = read_epoch(spec, workers, args.shuffle_buffer)
            assert n == total, f"read {n} of {total} records"
            print(f"{workers:>7} {n / seconds:>10.0f} {first * 1000:>11.0f}ms {seconds:>6.2f}s")
        fresh, restored = resume_latency(spec, args.shuffle_buffer, total // 2)
        print(f"first sample, 0 workers: fresh start {fresh * 1000:.0f}ms, "
              f"restored {total // 2} samples into the epoch {restored * 1000:.0f}ms")


if __name__ == "__main__":
    main()
