"""Edit one image: optionally think first (make the instruction concrete), then edit, then reflect (describe the
expected target, score the edit alone, decide Success / Reflection / Failed) for up to --rounds rounds. The
editor is the model's generator or an HTTP editing service (--editor URL); the thinker is the model's reasoner
or an OpenAI-compatible chat endpoint (--thinker URL), which may be EditThinker-8B with its own prompt file
(--thinker-contract editthinker --thinker-prompt FILE) and its client's loop (--loop editthinker). Writes
OUT/final.png, OUT/round_<k>.png, OUT/trace.json, OUT/index.html and OUT/contact_sheet.png."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from reasonedit.config import LOOPS
from reasonedit.config.model import RUN_DTYPES
from reasonedit.inference.editor_presets import add_preset_arguments, get_preset

log = logging.getLogger(__name__)


THINKER_PROMPT_HELP = ("--thinker-contract editthinker: the prompt file to send, e.g. EditThinker's "
                       "inference/prompt_template.txt (EditThinker-8B was trained on it), sent as its client sends "
                       "it; default our own wording")
LOOP_HELP = ("the loop's rules: reasonedit (the best-scored round; a reflect after every edit; seed + round - 1) or "
             "editthinker (as EditThinker's client: the last round; none after the last edit; one seed; every "
             "round edits the source; with --thinker-contract editthinker, replies read as its client reads "
             "them); default reasonedit")


MAX_NEW_TOKENS_HELP = ("the reasoner's longest reply: one number for every role, or per role, e.g. "
                       "think=128,describe=96,score=32,decide=96 (roles not named: 128); default 128")


def max_new_tokens_arg(text: str) -> int | dict[str, int]:
    """--max-new-tokens: N, or ROLE=N[,ROLE=N...] over think, describe, score, decide (checked here, so a bad value
    is one argparse error line)."""
    from reasonedit.inference.builtin import role_budgets
    try:
        if "=" not in text:
            value: int | dict[str, int] = int(text)
        else:
            value = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                role, sep, number = part.partition("=")
                if not sep or role.strip() in value:
                    raise ValueError(f"{part!r}: expected ROLE=N, each role once")
                value[role.strip()] = int(number)
        role_budgets(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return value


def read_thinker_prompt(args: argparse.Namespace) -> Optional[str]:
    """The text of --thinker-prompt FILE, checked; None without it. One error line naming the file when it cannot
    serve (missing, not UTF-8, empty, a placeholder missing) or the flag does not fit the thinker."""
    if args.thinker_prompt is None:
        return None
    if not args.thinker:
        raise ValueError("--thinker-prompt: a prompt file is for a chat thinker: give --thinker URL "
                         "--thinker-contract editthinker")
    if args.thinker_contract != "editthinker":
        raise ValueError("--thinker-prompt: needs --thinker-contract editthinker (the reasonedit contract asks with "
                         "our role prompts, not a prompt file)")
    from reasonedit.inference.editthinker import load_prompt_template
    return load_prompt_template(args.thinker_prompt, "--thinker-prompt")


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
    add_preset_arguments(p, "--editor")
    p.add_argument("--thinker", metavar="URL", help="an OpenAI-compatible chat endpoint, e.g. http://host:8000/v1")
    p.add_argument("--thinker-model", help="the model name at --thinker (default: $OPENAI_MODEL)")
    p.add_argument("--thinker-contract", default="reasonedit", choices=("reasonedit", "editthinker"),
                   help="the reply format the --thinker model speaks (default reasonedit)")
    p.add_argument("--thinker-prompt", type=Path, metavar="FILE", help=THINKER_PROMPT_HELP)
    p.add_argument("--loop", default="reasonedit", choices=LOOPS, help=LOOP_HELP)
    p.add_argument("--seed", type=int, default=0, help="noise seed of round 1; round r uses seed + r - 1 "
                   "(--loop editthinker: seed in every round)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per edit (default 28, or the "
                   "--editor-preset's)")
    p.add_argument("--guidance", type=float, default=None, help="true CFG scale; 1 turns guidance off (default 4, or "
                   "the --editor-preset's)")
    p.add_argument("--negative-prompt", default=None, help="the negative prompt of true CFG (default ' ', or the "
                   "--editor-preset's)")
    p.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=128, help=MAX_NEW_TOKENS_HELP)
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
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: must be at least 1, got {args.steps}")
    from reasonedit.inference.builtin import role_budgets
    try:
        role_budgets(args.max_new_tokens)
    except ValueError as e:
        raise ValueError(f"--max-new-tokens: {e}") from None
    needs_reasoner = (args.think or args.reflect) and not args.thinker
    if args.model is None and (not args.editor or needs_reasoner):
        raise ValueError("--model: needed for the built-in generator (no --editor) or reasoner "
                         "(--think/--reflect without --thinker)")
    if args.extra_image and args.editor:
        raise ValueError("--extra-image: an editing service (--editor) takes one image per request; extra images "
                         "need the built-in generator of a model that takes several")
    if args.editor_preset is not None and not args.editor:
        raise ValueError("--editor-preset: names the service behind --editor URL; give --editor too")
    if args.editor_resize_to_source is not None and not args.editor:
        raise ValueError("--editor-resize-to-source: only with --editor URL (an HTTP editing service)")
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
    prompt = read_thinker_prompt(args)
    image = load_image(args.image)
    extra = [load_image(path, "--extra-image") for path in args.extra_image]
    started = time.perf_counter()
    needs_model = args.model is not None and (not args.editor or not args.thinker)
    pipeline = _pipeline(args) if needs_model else None
    editor = build_editor(args.editor, pipeline=pipeline, progress=_step_progress, preset=args.editor_preset,
                          resize_to_source=args.editor_resize_to_source)
    # a flag given wins; else the editor service's own settings (the loop's defaults without a preset)
    steps, guidance, negative_prompt = get_preset(args.editor_preset).fill(args.steps, args.guidance,
                                                                           args.negative_prompt)
    thinker = None
    if args.think or args.reflect:
        thinker = build_thinker(args.thinker, pipeline=pipeline, model_name=args.thinker_model,
                                contract=args.thinker_contract, max_new_tokens=args.max_new_tokens,
                                prompt_template=prompt, loop=args.loop)
    print(f"editor {editor.name}" + (f", thinker {thinker.name}" if thinker else "") +
          f" (ready in {time.perf_counter() - started:.1f}s)", file=sys.stderr)

    def progress(phase: str, round_: int, live: int) -> None:
        where = "" if phase == "think" else f"round {round_}: "
        print(f"  {where}{phase} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)

    try:
        (trace,) = edit_with_reasoning(editor, thinker, [image], [args.instruction], think=args.think,
                                       reflect=args.reflect, rounds=args.rounds, seed=args.seed,
                                       guidance_scale=guidance, num_inference_steps=steps,
                                       negative_prompt=negative_prompt, progress=progress,
                                       extra_images=[extra], loop=args.loop)
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
    which = "best" if trace.loop == "reasonedit" else "last"
    print(f"{which} round {trace.rounds[trace.best].index} ({trace.stopped}); wrote {out / 'final.png'}, "
          f"{out / 'index.html'} in {time.perf_counter() - started:.1f}s")
    return 0
