"""Time per phase of think -> edit -> reflect, its overhead over a plain edit, and the reasoner caches' gain.

    python bench/infer.py [--samples 4 --rounds 3 --steps 12 --image-size 224 --max-new-tokens 64 --device cpu]
                          [--editor-cache prefix|none]
                          [--vision-depth 2 --vision-hidden 32 --hidden 64 --layers 2]
    # a bigger language model and image, so the image prefix dominates as with real models (where the
    # language model is ten times the vision tower); about 2 minutes on one CPU thread:
    python bench/infer.py --hidden 512 --layers 8 --vision-depth 2 --vision-hidden 64 --image-size 672 \
                          --max-new-tokens 8 --samples 2 --rounds 3 --steps 2

On a random model of the given sizes (the tiny preset by default), in one process:
  plain: the generator alone edits every sample (one packed batch), as `reasonedit edit` without flags;
  round: one round, think + edit + reflect (describe, score, decide), over the plain edit: the loop's cost
         (the issue's goal: at most 1.5x, 1.25x ideal, at the demo's 12 sampling steps);
  loop:  think, then `--rounds` rounds of edit, describe, score, decide, with the default prefix KV cache;
         the target is described once per sample, not once per round (counted);
  from source: the same rounds under EditThinker's rules, every round editing the source, with the editor's
         condition prefix cache and without: each source's condition prefix (system turn + image, the part of
         the generator's text stream every instruction about it shares) is computed once, not once per round
         and prompt (counted: prefixes computed vs rounds and condition prompts), and the edit time of each;
  cache: the reasoner's part of the loop (think, then `--rounds` x describe, score, decide) with each of
         ReasonerThinker's caches, interleaved: none (plain `Reasoner.generate`: every prompt re-reads the
         image), vision (the vision tower's embeddings reused), prefix (the prefix KV cache over the source:
         the language model reads system prompt + source image once per source; the default).
A random reasoner's text would not parse, which ends a round before decide; so the bench lets the model
generate its full reply (all the compute) and then reads a fixed, well-formed reply in its place
(score 5, Reflection), so every phase runs in every round, the worst case of `--rounds` rounds.
Figures are wall seconds summed over the samples (each sample's share of a batched call); one warm-up
edit runs first. The editor keeps its condition prefixes across calls (`--editor-cache prefix`, the default;
`none` is the editor without it): the cache is emptied before each timed part, so each starts as a new process
would. Within one edit the prompt and the negative prompt share their source's prefix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from reasonedit.inference.builtin import CACHES, EDITOR_CACHES, GeneratorEditor, ReasonerThinker
from reasonedit.inference.cli import max_new_tokens_arg
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.inference.trace import PHASES
from reasonedit.inference.types import EditRequest
from reasonedit.models import prompts
from reasonedit.config.model import ModelConfig
from reasonedit.models.model import ReasonEditModel
from reasonedit.models.processor import build_image_processor

WELL_FORMED = {"think": "make the red circle blue", "describe": "a blue circle on a white background",
               "score": "score: 5\nreason: the circle is still red",
               "decide": "<#Think> the colour is wrong <#Reflection> make the circle blue"}


def full_length_thinker(model: ReasonEditModel, cache: str, max_new_tokens) -> ReasonerThinker:
    """The built-in thinker with `cache`: its generation runs for real, then the role's well-formed reply
    stands in (see the module docstring)."""
    thinker = ReasonerThinker(model, max_new_tokens=max_new_tokens, cache=cache)
    real = thinker.generate

    def generate(batch):
        real(batch)
        return [WELL_FORMED[prompts.role_of(c)] for c in batch]
    thinker.generate = generate
    return thinker


def phase_totals(traces) -> dict[str, float]:
    totals = {p: 0.0 for p in PHASES}
    for t in traces:
        for p, s in t.phase_seconds().items():
            totals[p] += s
    return totals


def fresh(editor: GeneratorEditor) -> None:
    """Empty the editor's condition prefix cache and its counters, as in a new process."""
    if editor.prefix_cache is not None:
        editor.prefix_cache.reset()


def prefix_counts(editor: GeneratorEditor) -> str:
    cache = editor.prefix_cache
    if cache is None:
        return "condition prefixes: no cache (each condition prompt runs whole)"
    return (f"condition prefixes computed: {cache.computed} for {cache.prompts + cache.uncached} condition prompts "
            f"({cache.hits} read back)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="sampling steps (default 12: the demo's edit and eval)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=64,
                    help="N, or per role: think=128,describe=96,score=32,decide=96")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vision-hidden", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the cache comparison")
    ap.add_argument("--editor-cache", choices=EDITOR_CACHES, default="prefix",
                    help="the editor's condition prefix cache (default prefix; none: the whole condition prompt "
                         "every time)")
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
    editor = GeneratorEditor(model, cache=args.editor_cache)
    options = dict(guidance_scale=args.guidance, num_inference_steps=args.steps)

    editor.edit([EditRequest(image=sources[0], prompt=instructions[0], num_inference_steps=2)])  # warm-up
    fresh(editor)
    t0 = time.perf_counter()
    editor.edit([EditRequest(image=s, prompt=i, **options) for s, i in zip(sources, instructions)])
    plain = time.perf_counter() - t0

    print(f"device {args.device}; {args.samples} samples of {size}x{size}, {args.steps} steps, guidance "
          f"{args.guidance}; replies of at most {args.max_new_tokens} tokens; editor cache {args.editor_cache}")
    print(f"plain edit: {prefix_counts(editor)}")

    # one round: think + edit + reflect, against the plain edit of the same samples
    thinker = full_length_thinker(model, "prefix", args.max_new_tokens)
    fresh(editor)
    t0 = time.perf_counter()
    traces = edit_with_reasoning(editor, thinker, sources, instructions, rounds=1, **options)
    one, phases = time.perf_counter() - t0, phase_totals(traces)
    print(f"one round (think + edit + reflect), {args.samples} samples:")
    print(f"  {'phase':<10} {'seconds':>9} {'share':>7}")
    for p in PHASES:
        print(f"  {p:<10} {phases[p]:9.3f} {phases[p] / one:7.1%}")
    print(f"plain edit: {plain:.3f}s; one round: {one:.3f}s; round cost (round / plain edit) = {one / plain:.2f}x "
          f"(goal <= 1.5x, 1.25x ideal)")

    thinker = full_length_thinker(model, "prefix", args.max_new_tokens)
    fresh(editor)
    t0 = time.perf_counter()
    traces = edit_with_reasoning(editor, thinker, sources, instructions, rounds=args.rounds, **options)
    total, phases = time.perf_counter() - t0, phase_totals(traces)
    print(f"{args.rounds} rounds ({sum(len(t.rounds) for t in traces)} edits): {total:.3f}s = {total / plain:.2f}x "
          f"the plain edit; " + ", ".join(f"{p} {phases[p]:.3f}s" for p in PHASES))
    print("prompts per role: " + ", ".join(f"{r} {n}" for r, n in thinker.calls.items())
          + f" (describe: once per sample, {args.samples}, whatever the rounds)")
    print(f"  {prefix_counts(editor)} (a Reflection round edits the round before's output: a new prefix)")

    # EditThinker's rules: every round edits the source, so every round after the first reads its prefix back
    edit_seconds = {}
    for cache in (args.editor_cache, *(c for c in EDITOR_CACHES if c != args.editor_cache)):
        other = editor if cache == args.editor_cache else GeneratorEditor(model, cache=cache)
        fresh(other)
        t0 = time.perf_counter()
        traces = edit_with_reasoning(other, full_length_thinker(model, "prefix", args.max_new_tokens), sources,
                                     instructions, rounds=args.rounds, loop="editthinker", **options)
        total, edit_seconds[cache] = time.perf_counter() - t0, phase_totals(traces)["edit"]
        print(f"{args.rounds} rounds from the source (EditThinker's rules, {sum(len(t.rounds) for t in traces)} "
              f"edits), editor cache {cache}: {total:.3f}s = {total / plain:.2f}x the plain edit, edit "
              f"{edit_seconds[cache]:.3f}s; {prefix_counts(other)}")
    print(f"condition prefix cache, edit phase of those rounds: {edit_seconds['none'] / edit_seconds['prefix']:.2f}x "
          f"faster than without")

    # the reasoner's part of the loop (think, then rounds x describe + score + decide) per cache, interleaved;
    # a fresh thinker each time, so its cache starts empty as in a new loop
    edited = [t.rounds[0].image for t in traces]
    timings: dict[str, list[float]] = {c: [] for c in CACHES}
    for _ in range(args.repeats):
        for cache in CACHES:
            thinker = full_length_thinker(model, cache, args.max_new_tokens)
            t0 = time.perf_counter()
            thinker.think(sources, instructions)
            for _ in range(args.rounds):
                thinker.reflect(sources, edited, instructions, instructions)
            timings[cache].append(time.perf_counter() - t0)
    median = {c: statistics.median(t) for c, t in timings.items()}
    print(f"reasoner, think + {args.rounds} x reflect (median of {args.repeats}): "
          + ", ".join(f"cache={c} {median[c]:.3f}s" for c in CACHES))
    print(f"prefix KV cache speed-up: {median['none'] / median['prefix']:.2f}x over no cache, "
          f"{median['vision'] / median['prefix']:.2f}x over the vision cache")


if __name__ == "__main__":
    main()
