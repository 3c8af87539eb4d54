"""Serve a model's generator, and the think -> edit -> reflect loop, over HTTP with the API EditThinker's
editing services speak: POST /edit (JSON with a base64 PNG, or a multipart upload), GET /health,
GET /status. Concurrent requests are batched; a full queue answers 503, a slow one 504. Requests exactly as
EditThinker's client sends them are accepted (--compat strict takes our own fields only).
--editor shapes serves the exact shapes-world editor instead of a model (the world from --config and
world.key=value overrides; --error-rate P makes errors on purpose). A bearer token (--token-file PATH,
$REASONEDIT_SERVE_TOKEN or --token T) is required unless --no-auth says otherwise. See docs/serve.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

from reasonedit.config import LOOPS
from reasonedit.config.model import RUN_DTYPES
from reasonedit.inference.cli import (LOOP_HELP, MAX_NEW_TOKENS_HELP, THINKER_PROMPT_HELP, max_new_tokens_arg,
                                      read_thinker_prompt)
from reasonedit.inference.types import SHAPES_EDITOR
from reasonedit.serve.schema import COMPAT_MODES, DEFAULT_COMPAT

log = logging.getLogger(__name__)

TOKEN_VARIABLE = "REASONEDIT_SERVE_TOKEN"
_TOKEN_FILE_MOST = 4096  # bytes: a token file holds one token, not a disk image


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="model folder (save_pretrained output)")
    what.add_argument("--editor", choices=[SHAPES_EDITOR], help="serve the exact shapes-world editor instead of a model: "
                      "it reads the scene from the image, executes the concrete instruction and returns the source "
                      "unchanged when it cannot parse it")
    p.add_argument("--config", type=Path, help="--editor shapes: an experiment YAML whose world section is the "
                   "world to edit in (default: the default world)")
    p.add_argument("--error-rate", type=float, default=0.0, metavar="P", help="--editor shapes: the share of edits "
                   "made wrong on purpose with one of the reflection error types (default 0: exact)")
    p.add_argument("--error-seed", type=int, default=0, help="--editor shapes: the seed of the error draws, which "
                   "also depend on each request's seed, prompt and image, so a request resent gets the same answer")
    p.add_argument("overrides", nargs="*", metavar="world.key=value",
                   help="--editor shapes: world settings over --config's, e.g. world.grid=5 world.image_size=160")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every route but "
                   f"/health (default: ${TOKEN_VARIABLE}); other users see it in ps: prefer --token-file")
    p.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                   help="read the token from this file (surrounding whitespace and the newline are dropped)")
    p.add_argument("--no-auth", action="store_true", help="serve without authentication; without it a token is "
                   "required, so an empty --token or an unset variable is an error, never an open server")
    p.add_argument("--max-queue", type=int, default=128, help="plain edits that may wait (default 128, as many as "
                   "EditThinker's client runs workers); more are answered 503 with Retry-After")
    p.add_argument("--max-batch", type=int, default=8, help="edits run together in one generator call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for company")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take from its arrival: body, "
                   "validation, queue and work (504; the work is stopped)")
    p.add_argument("--max-loops", type=int, default=None, help="think/reflect requests running at once (default: two "
                   "per CPU core, at most 8; each on its own "
                   "thread; their edits wait in their own lane, so they cannot starve plain edits)")
    p.add_argument("--max-loop-queue", type=int, default=32,
                   help="think/reflect requests waiting for a loop slot; more are answered 503")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a request body may take to arrive (408)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers (408, then closed)")
    p.add_argument("--grace", type=float, default=30.0, help="after SIGTERM, seconds in-flight requests get to "
                   "finish; then they are cancelled and the server exits (within about 5 s more)")
    p.add_argument("--compat", choices=COMPAT_MODES, default=DEFAULT_COMPAT,
                   help="editthinker (default): also take EditThinker's fields (num_inference_step, enhance_prompt, "
                        "width, ...), mapping what has a meaning and logging each ignored one once; strict: our "
                        "fields only. Any other unknown field is 422 either way")
    p.add_argument("--steps", type=int, default=28, help="num_inference_steps when a request gives none")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--max-side", type=int, default=2048, help="largest image side accepted, in pixels")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, help="largest image area accepted, in pixels")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=RUN_DTYPES,
                   help="the dtype the model runs in (default auto: bfloat16 on CUDA, as saved on a CPU)")
    p.add_argument("--no-thinker", action="store_true", help="serve plain edits only (no think/reflect)")
    p.add_argument("--thinker", default=None, metavar="URL",
                   help="use an OpenAI-compatible chat endpoint (base URL ending in /v1) as the loop's thinker "
                        "instead of the model's reasoner (with --editor shapes, the only thinker: without it the "
                        "service serves plain edits); key from $OPENAI_API_KEY")
    p.add_argument("--thinker-model", default=None, help="the chat model's name (default: $OPENAI_MODEL)")
    p.add_argument("--thinker-contract", choices=["reasonedit", "editthinker"], default="reasonedit",
                   help="how the chat model replies: our role prompts, or EditThinker's think/score/answer")
    p.add_argument("--thinker-prompt", type=Path, metavar="FILE", help=THINKER_PROMPT_HELP)
    p.add_argument("--loop", default="reasonedit", choices=LOOPS, help="think/reflect requests: " + LOOP_HELP)
    p.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=128,
                   help="the model's reasoner as the thinker: " + MAX_NEW_TOKENS_HELP)


def resolve_token(token: Optional[str], token_file: Optional[Path], no_auth: bool,
                  environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The bearer token from --token-file, --token or $REASONEDIT_SERVE_TOKEN (in that order); None only with
    --no-auth. An empty or unusable token is an error naming where it came from."""
    from reasonedit.serve.app import TOKEN_PATTERN

    if token is not None and token_file is not None:
        raise ValueError("--token-file: give the token once, with --token-file or --token, not both")
    if no_auth:
        if token is not None or token_file is not None:
            raise ValueError(f"--no-auth: contradicts {'--token' if token is not None else '--token-file'}; drop one")
        if TOKEN_VARIABLE in environ:
            raise ValueError(f"--no-auth: but ${TOKEN_VARIABLE} is set; unset it to serve without authentication")
        return None
    if token_file is not None:
        source = f"--token-file {token_file}"
        try:
            with open(token_file, "rb") as f:
                raw = f.read(_TOKEN_FILE_MOST + 1)
        except OSError as e:
            raise ValueError(f"{source}: cannot read it ({e.strerror or e})") from None
        if len(raw) > _TOKEN_FILE_MOST:
            raise ValueError(f"{source}: longer than {_TOKEN_FILE_MOST} bytes; it should hold the token alone")
        value = raw.decode("utf-8", "replace").strip()
    elif token is not None:
        source, value = "--token", token
    elif TOKEN_VARIABLE in environ:
        source, value = f"${TOKEN_VARIABLE}", environ[TOKEN_VARIABLE]
    else:
        raise ValueError(f"no token given: pass --token-file PATH or set ${TOKEN_VARIABLE} (or --token T, which ps "
                         "shows), or --no-auth to serve without authentication")
    if not value:
        raise ValueError(f"{source}: the token is empty (an unset variable?); give one, or --no-auth to serve "
                         "without authentication")
    if not TOKEN_PATTERN.fullmatch(value):
        raise ValueError(f"{source}: the token must be visible ASCII without spaces (it travels in an HTTP header)")
    return value


def serve_config(args: argparse.Namespace):
    """The `ServeConfig` the flags describe; ValueError naming the flag that is wrong."""
    from reasonedit.serve.app import ServeConfig
    from reasonedit.serve.schema import Limits

    for flag in ("port", "steps", "max_steps", "max_side", "max_pixels"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise ValueError(f"--{flag.replace('_', '-')}: must be positive, got {getattr(args, flag)}")
    config = ServeConfig(max_queue=args.max_queue, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         timeout=args.timeout, compat=args.compat,
                         **({} if args.max_loops is None else {"max_loops": args.max_loops}),
                         max_loop_queue=args.max_loop_queue, read_timeout=args.read_timeout,
                         header_timeout=args.header_timeout, grace=args.grace,
                         limits=Limits(max_side=args.max_side, max_pixels=args.max_pixels, max_steps=args.max_steps,
                                       default_steps=args.steps))
    config.validate()
    config.token = resolve_token(args.token, args.token_file, args.no_auth)  # last: a wrong --max-queue is named first
    return config


def _shapes_world(args: argparse.Namespace):
    """The shapes world from --config and world.key=value overrides (the default world without either)."""
    from reasonedit.config import load_config

    other = [o for o in args.overrides if not o.startswith("world.")]
    if other:
        raise ValueError(f"{' '.join(other)}: the shapes editor takes world settings only (world.key=value, "
                         "e.g. world.grid=5)")
    if args.config is not None and not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config}: no such experiment YAML")
    _, cfg = load_config(args.config, args.overrides)
    return cfg.world


def _run_shapes(args: argparse.Namespace) -> int:
    if not 0.0 <= args.error_rate <= 1.0:
        raise ValueError(f"--error-rate {args.error_rate}: must lie in [0, 1]")
    world = _shapes_world(args)
    config = serve_config(args)
    prompt = read_thinker_prompt(args)
    from reasonedit.inference.pipeline import build_editor, build_thinker
    from reasonedit.serve.app import create_app
    from reasonedit.serve.runner import serve

    editor = build_editor(SHAPES_EDITOR, world=world, error_rate=args.error_rate, seed=args.error_seed)
    thinker = None
    if args.thinker and not args.no_thinker:
        thinker = build_thinker(args.thinker, model_name=args.thinker_model, contract=args.thinker_contract,
                                prompt_template=prompt, loop=args.loop)  # its loop: the loop requests' rules
    name = f"shapes world {world.image_size}px, grid {world.grid}" + (f" ({args.config})" if args.config else "")
    app = create_app(editor, config, thinker, model_name=name, thinker_shares_model=False)
    auth = "bearer token required" if config.token else "no authentication: --no-auth"
    print(f"serving {editor.name} on {name} at http://{args.host}:{args.port} ({auth}; "
          f"{'thinker ' + thinker.name if thinker else 'plain edits only: no thinker'})", file=sys.stderr)
    return serve(app, args.host, args.port, log_level="info" if args.verbose else "warning")


def run(args: argparse.Namespace) -> int:
    if args.editor == SHAPES_EDITOR:
        return _run_shapes(args)
    given = [flag for flag, on in (("--config", args.config is not None), ("--error-rate", args.error_rate != 0.0),
                                   ("--error-seed", args.error_seed != 0), ("world.key=value", bool(args.overrides)))
             if on]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --editor shapes (a model folder carries its own settings)")
    from reasonedit.models.model import CONFIG_FILE
    if not (args.model / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--model {args.model}: not a model folder (no reasonedit.json)")
    config = serve_config(args)
    prompt = read_thinker_prompt(args)
    from reasonedit.inference.pipeline import Pipeline, build_thinker, resolve_device
    from reasonedit.serve.app import create_app
    from reasonedit.serve.runner import serve

    print(f"loading {args.model} on {resolve_device(args.device)}", file=sys.stderr)
    pipeline = Pipeline.load(args.model, device=args.device, dtype=args.dtype)
    thinker = None if args.no_thinker else build_thinker(args.thinker, pipeline=pipeline,
                                                         model_name=args.thinker_model, contract=args.thinker_contract,
                                                         prompt_template=prompt, loop=args.loop,
                                                         max_new_tokens=args.max_new_tokens)
    app = create_app(pipeline.editor(), config, thinker, model_name=str(args.model),
                     thinker_shares_model=not args.thinker)
    auth = "bearer token required" if config.token else "no authentication: --no-auth"
    print(f"serving {args.model} on http://{args.host}:{args.port} ({auth}; queue {config.max_queue}, "
          f"batch {config.max_batch}, compat {config.compat})", file=sys.stderr)
    return serve(app, args.host, args.port, log_level="info" if args.verbose else "warning")
