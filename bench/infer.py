"""Time per phase of think -> edit -> reflect, its overhead over a plain edit, and the vision cache's gain.

    python bench/infer.py [--samples 4 --rounds 3 --steps 28 --image-size 224 --max-new-tokens 64 --device cpu]
                          [--vision-depth 2 --vision-hidden 32 --hidden 64 --layers 2]

On a random model of the given sizes (the tiny preset by default), in one process:
  plain: the generator alone edits every sample (one packed batch), as `reasonedit edit` without flags;
  loop:  think, then `--rounds` rounds of edit, describe, score, decide, with the vision cache;
  cache: the reasoner's part of one round (think, describe, score, decide) with and without the vision cache
         (without it, plain `Reasoner.generate`: the vision tower runs for every prompt), interleaved.
A random reasoner's text would not parse, which ends a round before decide; so the bench lets the model
generate its full reply (all the compute) and then reads a fixed, well-formed reply in its place
(score 5, Reflection), so every phase runs in every round, the worst case of `--rounds` rounds.
Figures are wall seconds summed over the samples (each sample's share of a batched call); one warm-up
edit runs first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.inference.trace import PHASES
from reasonedit.inference.types import EditRequest
from reasonedit.inference.vision_cache import VisionCache, cached_generate
from reasonedit.models import prompts
from reasonedit.models.config import ModelConfig
from reasonedit.models.model import ReasonEditModel
from reasonedit.models.processor import build_image_processor

WELL_FORMED = {prompts.THINK_SYSTEM_PROMPT: "make the red circle blue",
               prompts.DESCRIBE_SYSTEM_PROMPT: "a blue circle on a white background",
               prompts.SCORE_SYSTEM_PROMPT: "score: 5\nreason: the circle is still red",
               prompts.DECIDE_SYSTEM_PROMPT: "<#Think> the colour is wrong <#Reflection> make the circle blue"}


def full_length_generate(model: ReasonEditModel, cached: bool, max_new_tokens: int):
    """Run the reasoner for real, then answer with the role's well-formed reply (see the module docstring)."""
    cache = VisionCache()
    reasoner = model.reasoner

    def generate(batch):
        if cached:
            cached_generate(reasoner, batch, cache, max_new_tokens=max_new_tokens)
        else:
            reasoner.generate(batch, max_new_tokens=max_new_tokens)
        return [WELL_FORMED[c[0]["content"]] for c in batch]
    return generate


def phase_totals(traces) -> dict[str, float]:
    totals = {p: 0.0 for p in PHASES}
    for t in traces:
        for p, s in t.phase_seconds().items():
            totals[p] += s
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vision-hidden", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the vision-cache comparison")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    config = ModelConfig()
    r = config.reasoner
    r.hidden_size, r.num_layers, r.intermediate_size = args.hidden, args.layers, 2 * args.hidden
    r.vision_depth, r.vision_hidden_size, r.vision_intermediate_size = (args.vision_depth, args.vision_hidden,
                                                                        2 * args.vision_hidden)
    config.generator.joint_attention_dim = args.hidden
    model = ReasonEditModel.tiny(config, ["make the red circle blue"], seed=0).eval().to(args.device)
    # the tiny preset caps the reasoner's view at 224x224; let it see the whole image
    model.reasoner.processor.image_processor = build_image_processor(min_pixels=56 * 56,
                                                                     max_pixels=max(args.image_size ** 2, 56 * 56))
    rng = np.random.default_rng(0)
    size = args.image_size
    sources = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.samples)]
    instructions = ["make the red circle blue"] * args.samples
    editor = GeneratorEditor(model)
    options = dict(guidance_scale=args.guidance, num_inference_steps=args.steps)

    editor.edit([EditRequest(image=sources[0], prompt=instructions[0], num_inference_steps=2)])  # warm-up
    t0 = time.perf_counter()
    editor.edit([EditRequest(image=s, prompt=i, **options) for s, i in zip(sources, instructions)])
    plain = time.perf_counter() - t0

    thinker = ReasonerThinker(generate=full_length_generate(model, True, args.max_new_tokens))
    t0 = time.perf_counter()
    traces = edit_with_reasoning(editor, thinker, sources, instructions, rounds=args.rounds, **options)
    total, phases = time.perf_counter() - t0, phase_totals(traces)

    print(f"device {args.device}; {args.samples} samples of {size}x{size}, {args.steps} steps, guidance "
          f"{args.guidance}, {args.rounds} rounds ({sum(len(t.rounds) for t in traces)} edits), "
          f"replies of {args.max_new_tokens} tokens")
    print(f"{'phase':<10} {'seconds':>9} {'share':>7}")
    for p in PHASES:
        print(f"{p:<10} {phases[p]:9.3f} {phases[p] / total:7.1%}")
    print(f"plain edit: {plain:.3f}s; think+reflect loop: {total:.3f}s; "
          f"overhead ratio (loop / plain edit) = {total / plain:.2f}x")

    # the reasoner's part of one round (think + describe + score + decide), cache on and off, interleaved
    edited = [t.rounds[0].image for t in traces]
    timings: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for cached in (False, True):
            thinker = ReasonerThinker(generate=full_length_generate(model, cached, args.max_new_tokens))
            t0 = time.perf_counter()
            thinker.think(sources, instructions)
            thinker.reflect(sources, edited, instructions, instructions)
            timings[cached].append(time.perf_counter() - t0)
    off, on = statistics.median(timings[False]), statistics.median(timings[True])
    print(f"reasoner, one round (median of {args.repeats}): {off:.3f}s without the vision cache, {on:.3f}s with "
          f"it: speed-up {off / on:.2f}x")

if __name__ == "__main__":
    main()
