"""Edit one image: optionally think first (make the instruction concrete), then edit, then reflect (describe the
expected target, score the edit alone, decide Success / Reflection / Failed) for up to --rounds rounds. The
editor is the model's generator or an HTTP editing service (--editor URL); the thinker is the model's reasoner
or an OpenAI-compatible chat endpoint (--thinker URL). Writes OUT/final.png, OUT/round_<k>.png,
OUT/trace.json, OUT/index.html and OUT/contact_sheet.png."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from reasonedit.config.model import RUN_DTYPES

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="a model folder (ReasonEditModel.save_pretrained); needed unless "
                   "--editor and --thinker replace both of its parts")
    p.add_argument("--image", required=True, type=Path, help="the source image (PNG, JPEG, ...)")
    p.add_argument("--extra-image", action="append", type=Path, default=[], metavar="PATH",
                   help="a further source image (Picture 2, 3, ...), for a model that takes several "
                        "(Qwen-Image-Edit-2509 / 2511); repeat for more; the built-in generator only")
    p.add_argument("--instruction", required=True, help="the editing request")
    p.add_argument("--think", action="store_true", help="rewrite the request as concrete steps first")
    p.add_argument("--reflect", action="store_true", help="check each edit and correct or restart")
    p.add_argument("--rounds", type=int, default=3, help="most edit rounds with --reflect (default 3)")
    p.add_argument("--editor", action="append", metavar="URL",
                   help="an EditThinker-style editing service; repeat or comma-separate for round robin")
    p.add_argument("--thinker", metavar="URL", help="an OpenAI-compatible chat endpoint, e.g. http://host:8000/v1")
    p.add_argument("--thinker-model", help="the model name at --thinker (default: $OPENAI_MODEL)")
    p.add_argument("--thinker-contract", default="reasonedit", choices=("reasonedit", "editthinker"),
                   help="the reply format the --thinker model speaks (default reasonedit)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of round 1; round r uses seed + r - 1")
    p.add_argument("--steps", type=int, default=28, help="sampling steps per edit (default 28)")
    p.add_argument("--guidance", type=float, default=4.0, help="true CFG scale; 1 turns guidance off (default 4)")
    p.add_argument("--negative-prompt", default=" ", help="the negative prompt of true CFG (default ' ')")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the reasoner's longest reply (default 128)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=RUN_DTYPES,
                   help="the dtype the model runs in (default auto: bfloat16 on CUDA, as saved on a CPU)")
    p.add_argument("--out", required=True, type=Path, help="the trace folder to write (replaced when it exists)")


def load_image(path: Path, option: str = "--image") -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3) RGB; a clear error when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{option} {path}: not a readable image ({e})") from None


def _check(args: argparse.Namespace) -> None:
    if args.rounds < 1:
        raise ValueError(f"--rounds: must be at least 1, got {args.rounds}")
    if args.steps < 1:
        raise ValueError(f"--steps: must be at least 1, got {args.steps}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    needs_reasoner = (args.think or args.reflect) and not args.thinker
    if args.model is None and (not args.editor or needs_reasoner):
        raise ValueError("--model: needed for the built-in generator (no --editor) or reasoner "
                         "(--think/--reflect without --thinker)")
    if args.extra_image and args.editor:
        raise ValueError("--extra-image: an editing service (--editor) takes one image per request; extra images "
                         "need the built-in generator of a model that takes several")
    if args.thinker and not (args.think or args.reflect):
        raise ValueError("--thinker: given, but neither --think nor --reflect asks for a thinker")


def _pipeline(args: argparse.Namespace):
    """The model folder on --device, with only the parts this edit uses (no generator under --editor)."""
    from reasonedit.inference.pipeline import Pipeline
    components = ["reasoner"] if args.editor else ["reasoner", "generator", "vae"]
    return Pipeline.load(args.model, components=components, device=args.device, dtype=args.dtype)


def _step_progress(done: int, total: int) -> None:
    """Sampling steps, at every quarter (a real model takes seconds per step)."""
    if done == total or done * 4 // total != (done - 1) * 4 // total:
        print(f"    step {done}/{total}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from reasonedit.errors import RemoteServiceError
    from reasonedit.inference.loop import edit_with_reasoning
    from reasonedit.inference.pipeline import build_editor, build_thinker
    from reasonedit.inference.report import write_trace

    _check(args)
    image = load_image(args.image)
    extra = [load_image(path, "--extra-image") for path in args.extra_image]
    started = time.perf_counter()
    needs_model = args.model is not None and (not args.editor or not args.thinker)
    pipeline = _pipeline(args) if needs_model else None
    editor = build_editor(args.editor, pipeline=pipeline, progress=_step_progress)
    thinker = None
    if args.think or args.reflect:
        thinker = build_thinker(args.thinker, pipeline=pipeline, model_name=args.thinker_model,
                                contract=args.thinker_contract, max_new_tokens=args.max_new_tokens)
    print(f"editor {editor.name}" + (f", thinker {thinker.name}" if thinker else "") +
          f" (ready in {time.perf_counter() - started:.1f}s)", file=sys.stderr)

    def progress(phase: str, round_: int, live: int) -> None:
        where = "" if phase == "think" else f"round {round_}: "
        print(f"  {where}{phase} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)

    try:
        (trace,) = edit_with_reasoning(editor, thinker, [image], [args.instruction], think=args.think,
                                       reflect=args.reflect, rounds=args.rounds, seed=args.seed,
                                       guidance_scale=args.guidance, num_inference_steps=args.steps,
                                       negative_prompt=args.negative_prompt, progress=progress,
                                       extra_images=[extra])
    except RemoteServiceError as e:  # a service that stayed down through its retries: say so, no traceback
        print(f"reasonedit: error: {e}", file=sys.stderr)
        return 1
    out = write_trace(trace, args.out)
    if trace.thought is not None:
        print(f"think: {trace.thought}")
    for r in trace.rounds:
        verdict = ""
        if r.reflection is not None:
            score = "-" if r.score is None else f"{r.score:g}"
            verdict = f"  score {score}  {r.decision}" + (" (parse error)" if r.reflection.parse_error else "")
        print(f"round {r.index}: {r.instruction!r}{verdict}")
    print(f"best round {trace.rounds[trace.best].index} ({trace.stopped}); wrote {out / 'final.png'}, "
          f"{out / 'index.html'} in {time.perf_counter() - started:.1f}s")
    return 0
