"""Packer utilisation, padding avoided, and packing speed, on the shapes mix and on a long-tailed mix.

    python bench/packing.py [--records 300 --stream 20000 --window 256 --min-fill 0.99]

(a) shapes mix: records of all four kinds from the synthetic world, preprocessed for the tiny model
    (tokenizer learned from their text, 224 px buckets), giving their exact token counts:
    - reasoner stream (stage 1): think / describe / score / decide segments;
    - generator stream (stage 2): edit pairs, text-to-image, thinking-pair targets, 10% text and
      10% image condition dropout;
    - stage-3 mix: both kinds under two budgets (reasoner row, generator row).
    The stream is the records' segments in record order, records reshuffled every epoch, repeated
    until --stream samples.
(b) long-tailed mix: log-normal lengths (median --ln-median, sigma --ln-sigma), one budget.

Per stream: the packer's utilisation (real tokens / budget, every batch counted, the final flush
included); the share of padding when the same samples, in the same order, go into padded batches
with the same number of samples as each packed batch (each padded to its longest); the ratio of
real tokens per step, packed over padded, at the same tokens computed per step (= utilisation /
(1 - padding share)); and samples per second through the packer alone on one core.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

from reasonedit.data.packing import Packer


@dataclass(frozen=True)
class Sample:
    """A stand-in for a segment: a key and its token count(s), as the packer sees a segment."""

    key: str
    length: tuple[int, ...]


def shapes_lengths(records_per_kind: int, seed: int) -> dict[str, list[list[tuple[int, ...]]]]:
    """Per stream, per record, the exact token counts of its segments (preprocessed for the tiny model)."""
    from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
    from reasonedit.data.segments import ConditionDropout, ReasonerSegment, stage3_lengths
    from reasonedit.data.samples import EditPair, ReflectionSample, TextToImage, ThinkingPair
    from reasonedit.shapes.world import ShapesWorld
    from reasonedit.shapes.synth import KINDS, Synthesizer
    from reasonedit.config.model import ModelConfig
    from reasonedit.models.model import ReasonEditModel

    synth = Synthesizer(ShapesWorld(), seed=seed)
    records = [synth.make(kind, "train", i) for kind in KINDS for i in range(records_per_kind)]
    texts = []
    for r in records:
        if isinstance(r, EditPair):
            texts.append(r.instruction)
        elif isinstance(r, ThinkingPair):
            texts += [r.abstract_instruction, r.concrete_instruction]
        elif isinstance(r, ReflectionSample):
            texts += [r.instruction, r.target_description, r.reason, r.thought, r.new_instruction]
        elif isinstance(r, TextToImage):
            texts.append(r.caption)
    model = ReasonEditModel.tiny(ModelConfig(), texts, components=("reasoner", "vae"))
    # counts only: the latents are not needed to know their token counts
    config = PreprocessConfig(buckets=buckets_for(model, 224 * 224, generator_patch=2),
                              dropout=ConditionDropout(text=0.1, image=0.1), seed=seed, encode_latents=False)
    pre = Preprocessor.from_model(model, config)
    out: dict[str, list[list[tuple[int, ...]]]] = {"reasoner": [], "generator": [], "stage3": []}
    for r in records:
        segments = pre(r)
        text = [s for s in segments if isinstance(s, ReasonerSegment)]
        gen = [s for s in segments if not isinstance(s, ReasonerSegment)]
        if text:
            out["reasoner"].append([(s.num_tokens,) for s in text])
        if gen:
            out["generator"].append([(s.num_tokens,) for s in gen])
        out["stage3"].append([stage3_lengths(s) for s in segments])
    return out


def epochs(per_record: list[list[tuple[int, ...]]], n: int, seed: int) -> list[Sample]:
    """The records' segments in record order, records reshuffled each epoch, until n samples."""
    rng = random.Random(seed)
    out: list[Sample] = []
    epoch = 0
    while len(out) < n:
        order = list(range(len(per_record)))
        rng.shuffle(order)
        for r in order:
            for j, length in enumerate(per_record[r]):
                out.append(Sample(f"e{epoch}/r{r}/{j}", length))
        epoch += 1
    return out[:n]


def lognormal(n: int, median: float, sigma: float, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    return [Sample(f"s{i}", (max(1, round(rng.lognormvariate(math.log(median), sigma))),)) for i in range(n)]


def padded_share(batches, samples: Sequence[Sample], budget: tuple[int, ...]) -> list[float]:
    """Per budget: padding share of padded batches of the same sizes as the packed ones, in stream order."""
    kept = [s for s in samples if all(n <= b for n, b in zip(s.length, budget))]
    real = [0] * len(budget)
    padded = [0] * len(budget)
    at = 0
    for batch in batches:
        chunk = kept[at: at + len(batch)]
        at += len(batch)
        for d in range(len(budget)):
            real[d] += sum(s.length[d] for s in chunk)
            padded[d] += len(chunk) * max(s.length[d] for s in chunk)
    return [1 - r / p if p else 0.0 for r, p in zip(real, padded)]


def max_wait(packer: Packer[Sample], samples: Sequence[Sample]) -> int:
    """The most arrivals any sample waited in the window before its batch left (the flush excluded)."""
    arrived: dict[str, int] = {}
    longest = 0
    for i, sample in enumerate(samples):
        arrived[sample.key] = i
        for batch in packer.add(sample):
            longest = max(longest, i - min(arrived[s.key] for s in batch.items))
    return longest


def run(name: str, samples: list[Sample], budget: tuple[int, ...], window: int, min_fill: float,
        max_age: int | None) -> None:
    packer: Packer[Sample] = Packer(budget, window=window, length=lambda s: s.length, min_fill=min_fill,
                                    max_age=max_age, name=name)
    start = time.perf_counter()
    batches = list(packer.pack(samples))
    seconds = time.perf_counter() - start
    wait = max_wait(Packer(budget, window=window, length=lambda s: s.length, min_fill=min_fill, max_age=max_age,
                           name=name), samples)
    stats = packer.stats
    pad = padded_share(batches, samples, budget)
    util = stats.utilisations
    ratio = [u / (1 - p) for u, p in zip(util, pad)]
    mean_len = [sum(s.length[d] for s in samples) / len(samples) for d in range(len(budget))]
    fmt = lambda xs, spec: "/".join(format(x, spec) for x in xs)  # noqa: E731
    print(f"{name:<22} budget {fmt(budget, 'd'):>11}  window {window:>4}  min_fill {min_fill}  "
          f"max_age {packer.max_age}  samples {len(samples)}  mean len {fmt(mean_len, '.0f')}")
    print(f"{'':<22} utilisation {fmt(util, '.4f')}  padded-batch padding share {fmt(pad, '.3f')}  "
          f"real tokens/step packed/padded {fmt(ratio, '.2f')}x")
    print(f"{'':<22} batches {stats.batches} ({len(samples) / max(stats.batches, 1):.1f} samples each, "
          f"{stats.below_min_fill} below min_fill)  oversize skipped {stats.oversize}  longest wait {wait} "
          f"arrivals  packing {len(samples) / seconds:,.0f} samples/s on one core")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=300, help="shapes records of each kind to preprocess")
    p.add_argument("--stream", type=int, default=20000, help="samples per stream")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--min-fill", type=float, default=0.99)
    p.add_argument("--max-age", type=int, default=None,
                   help="arrivals an item may wait (default: the packer's, 4 x window)")
    p.add_argument("--reasoner-budget", type=int, default=4096)
    p.add_argument("--generator-budget", type=int, default=8192)
    p.add_argument("--stage3-budgets", type=int, nargs=2, default=None,
                   help="reasoner-row and generator-row budgets (default: 8192 generator tokens and the "
                        "reasoner budget in the mix's token ratio, rounded to 128)")
    p.add_argument("--longtail-budget", type=int, default=16384)
    p.add_argument("--ln-median", type=float, default=800.0)
    p.add_argument("--ln-sigma", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # oversize warnings are counted in the report

    start = time.perf_counter()
    lengths = shapes_lengths(args.records, args.seed)
    print(f"(a) shapes mix: {args.records} records of each kind preprocessed in {time.perf_counter() - start:.1f} s")
    common = dict(window=args.window, min_fill=args.min_fill, max_age=args.max_age)
    run("reasoner stream", epochs(lengths["reasoner"], args.stream, args.seed), (args.reasoner_budget,), **common)
    run("generator stream", epochs(lengths["generator"], args.stream, args.seed), (args.generator_budget,), **common)
    stage3 = epochs(lengths["stage3"], args.stream, args.seed)
    if args.stage3_budgets:
        budgets = tuple(args.stage3_budgets)
    else:
        share = sum(s.length[0] for s in stage3) / sum(s.length[1] for s in stage3)
        budgets = (max(128, round(8192 * share / 128) * 128), 8192)
    run("stage-3 mix (two rows)", stage3, budgets, **common)
    print(f"(b) long-tailed mix: log-normal lengths, median {args.ln_median:.0f}, sigma {args.ln_sigma}")
    run("long-tailed", lognormal(args.stream, args.ln_median, args.ln_sigma, args.seed), (args.longtail_budget,),
        **common)


if __name__ == "__main__":
    main()
