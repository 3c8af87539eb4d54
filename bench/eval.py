"""Samples per second of the eval harness: generation on a tiny model, judging against a loopback judge.

    python bench/eval.py [--samples 16 --steps 8 --guidance 4 --batch-size 8 --modes base,think_reflect --rounds 2]
                         [--judge-samples 64 --concurrency 1,4,16 --latency 0.05 --image-size 224]

Generation: `reasonedit.eval.runner.generate` over held-out shapes scenes (half concrete, half abstract)
with a random tiny ReasonEditModel (the tiny preset) on this machine's CPU (or --device), writing every
image in the official layout as a real run does; after one warm-up batch, timed per mode. A random
reasoner's replies do not parse, so think_reflect's rounds end early (a parse failure at describe skips
score and decide): its figure is a lower bound on the loop's cost.
Judging: `runner.score` over a GEdit-Bench copy made in a temporary folder (--judge-samples samples of
--image-size PNGs, 2 judge queries each: semantic consistency with 2 images, perceptual quality with 1),
sent to the scripted OpenAI-compatible server on loopback, which answers every query after --latency
seconds (the stand-in for a paid judge's latency), at each --concurrency, with an empty reply cache; then
once more with the cache warm (every reply from disk).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def bench_generation(args, root: Path) -> None:
    import torch

    from reasonedit.eval.benchmarks import get_benchmark
    from reasonedit.eval.runner import GenerationSettings, generate
    from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker
    from reasonedit.models import prompts
    from reasonedit.config.model import ModelConfig
    from reasonedit.models.model import ReasonEditModel

    bench = get_benchmark("shapes", n=max(1, args.samples // 2)).load(None)
    texts = [s.instruction for s in bench.samples()] + prompts.template_texts()
    model = ReasonEditModel.tiny(ModelConfig(), texts, seed=0).eval().to(args.device)
    editor, thinker = GeneratorEditor(model), ReasonerThinker(model, max_new_tokens=args.max_new_tokens)
    print(f"generation: tiny model on {args.device} (torch threads {torch.get_num_threads()}), "
          f"{len(bench.samples())} shapes samples of 224x224, {args.steps} steps, guidance {args.guidance:g}, "
          f"batch {args.batch_size}")
    warm = GenerationSettings(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size, limit=1)
    generate(bench, editor, thinker, root / "warmup", "tiny", warm)
    for mode in args.modes.split(","):
        settings = GenerationSettings(mode=mode, rounds=args.rounds, steps=args.steps, guidance=args.guidance,
                                      batch_size=args.batch_size)
        stats = generate(bench, editor, thinker, root / mode, "tiny", settings)
        extra = f", at most {args.rounds} rounds" if mode == "think_reflect" else ""
        print(f"  {mode:<14} {stats.generated} samples in {stats.seconds:7.2f}s: "
              f"{stats.samples_per_second:7.2f} samples/s{extra}")


def make_gedit(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """A GEdit-Bench copy (metadata.jsonl + inputs) and an edited image for every sample."""
    from reasonedit.eval.benchmarks import get_benchmark
    from reasonedit.eval.runner import write_image

    data, images = root / "gedit", root / "images"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    types = ["background_change", "color_alter", "style_change", "subject-add"]
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(data / f"in{i}.png")
        rows.append({"key": f"k{i}", "task_type": types[i % len(types)], "instruction": f"edit number {i}",
                     "instruction_language": "en", "input_image": f"in{i}.png", "input_image_raw": f"in{i}.png",
                     "Intersection_exist": True})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = get_benchmark("gedit").load(data)
    for s in bench.samples():
        write_image(bench.output_path(images, s, "m"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return data, images


def bench_judging(args, root: Path) -> None:
    from reasonedit.eval.benchmarks import get_benchmark
    from reasonedit.eval.judge import Judge, JudgeSettings
    from reasonedit.eval.runner import score
    from reasonedit.testing.chat_server import Reply, ScriptedChatServer

    data, images = make_gedit(root, args.judge_samples, args.image_size)
    bench = get_benchmark("gedit").load(data)
    reply = Reply('{"score": [8, 7], "reasoning": "scripted"}', delay=args.latency)
    print(f"judging: {args.judge_samples} GEdit samples ({args.image_size}x{args.image_size} PNGs, 2 queries each) "
          f"against the loopback judge answering after {args.latency * 1000:.0f} ms")
    with ScriptedChatServer(lambda req: reply) as server:
        for c in [int(x) for x in args.concurrency.split(",")]:
            cache = root / f"cache_{c}.jsonl"
            settings = JudgeSettings(base_url=server.base_url, model="bench-judge", concurrency=c)
            with Judge(settings, cache=cache) as judge:
                results, stats = score(bench, images, "m", judge)
            assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
            print(f"  concurrency {c:>3}: {stats.total} samples in {stats.seconds:7.2f}s: "
                  f"{stats.total / stats.seconds:8.2f} samples/s ({stats.queries / stats.seconds:.1f} queries/s)")
        with Judge(settings, cache=cache) as judge:
            _, stats = score(bench, images, "m", judge)
        assert judge.stats.requests == 0
        print(f"  warm cache     : {stats.total} samples in {stats.seconds:7.2f}s: "
              f"{stats.total / stats.seconds:8.2f} samples/s (no request sent)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16, help="shapes samples to generate per mode")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--modes", default="base,think_reflect")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="the tiny reasoner's reply length")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--judge-samples", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the judge takes per query")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # a random reasoner's unparsable replies are expected here
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_generation:
            bench_generation(args, root)
        bench_judging(args, root)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.1f}s")
