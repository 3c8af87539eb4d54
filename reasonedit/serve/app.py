"""The edit service as a FastAPI app around any `Editor` (and, for the loop, a `Thinker`).

Routes: `POST /edit` (JSON or multipart; `/edit-upload` is the same route under EditThinker's name for
uploads), `GET /health` (no token needed), `GET /status`. A request is validated (`schema.parse_edit`),
queued (503 when the queue is full), batched with its neighbours by the `EditBatcher`, and answered
within `timeout` seconds (504 otherwise). Errors answer `{"success": false, "error": ..., "field": ...}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from reasonedit.clients.images import png_base64
from reasonedit.inference.types import Editor, Thinker
from reasonedit.serve.batcher import EditBatcher, LockedThinker, QueueFull
from reasonedit.serve.schema import (
    COMPAT_MODES,
    UPLOAD_FILE_FIELDS,
    IgnoredFieldLog,
    Limits,
    ParsedEdit,
    RequestError,
    parse_edit,
)

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How the service takes requests. `token` None: no authentication."""

    token: Optional[str] = None
    max_queue: int = 64
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    timeout: float = 300.0  # seconds a request may wait for its answer, queue included
    compat: Optional[str] = None  # None (strict) | "editthinker"
    max_body_bytes: int = 64 * 2 ** 20
    limits: Limits = field(default_factory=Limits)

    def validate(self) -> None:
        if self.compat is not None and self.compat not in COMPAT_MODES:
            raise ValueError(f"--compat {self.compat!r}: expected one of {', '.join(COMPAT_MODES)}")
        for name in ("max_queue", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.timeout <= 0:
            raise ValueError(f"--batch-wait-ms must be >= 0 and --timeout > 0 (got {self.batch_wait_ms}, {self.timeout})")


@dataclass
class _Counters:
    requests: int = 0
    bad_requests: int = 0
    unauthorized: int = 0
    timed_out: int = 0
    loops: int = 0


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"success": False, "error": message, "field": field}, status_code=status, headers=headers)


def create_app(editor: Editor, config: Optional[ServeConfig] = None, thinker: Optional[Thinker] = None,
               model_name: str = "", thinker_shares_model: bool = True) -> FastAPI:
    """The service app. The batcher's worker starts and stops with the app (its lifespan).

    thinker_shares_model: the thinker runs on the editor's model (the built-in reasoner), so it takes
    the same lock as the editor; False for a remote thinker, which may run alongside edits.
    """
    config = config or ServeConfig()
    config.validate()
    lock = threading.Lock()
    batcher = EditBatcher(editor, max_queue=config.max_queue, max_batch=config.max_batch,
                          batch_wait=config.batch_wait_ms / 1000.0, model_lock=lock)
    loop_thinker = LockedThinker(thinker, lock) if thinker is not None and thinker_shares_model else thinker
    counters, ignored_log = _Counters(), IgnoredFieldLog()
    counters_lock = threading.Lock()
    started = time.time()
    editor_name = getattr(editor, "name", type(editor).__name__)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("edit service ready: editor %s, queue %d, batch %d", editor_name, config.max_queue, config.max_batch)
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="ReasonEdit edit service", lifespan=lifespan,
                  description="EditThinker-style editing API over a ReasonEdit generator (docs/serve.md).")
    app.state.batcher, app.state.config, app.state.counters = batcher, config, counters

    def count(name: str) -> None:
        with counters_lock:
            setattr(counters, name, getattr(counters, name) + 1)

    def unauthorized(request: Request) -> Optional[JSONResponse]:
        if config.token is None:
            return None
        header = request.headers.get("authorization", "")
        if not header:
            count("unauthorized")
            return _error(401, "missing Authorization header: send 'Authorization: Bearer <token>'", "authorization",
                          {"WWW-Authenticate": "Bearer"})
        scheme, _, value = header.partition(" ")
        # constant-time comparison: response timing must not leak how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), config.token.encode()):
            count("unauthorized")
            return _error(403, "the bearer token is not valid for this server", "authorization")
        return None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "ready": True, "model": model_name, "editor": editor_name, "timestamp": time.time()}

    @app.get("/status")
    async def status(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        s = batcher.stats
        return {"model": model_name, "editor": editor_name,
                "thinker": getattr(thinker, "name", None) if thinker is not None else None,
                "compat": config.compat, "queue_depth": batcher.depth, "max_queue": config.max_queue,
                "in_flight": batcher.in_flight, "requests": counters.requests, "served": s.served, "failed": s.failed,
                "rejected": s.rejected, "timed_out": counters.timed_out, "cancelled": s.cancelled,
                "bad_requests": counters.bad_requests, "unauthorized": counters.unauthorized, "loops": counters.loops,
                "batches": s.batches, "mean_batch_size": round(s.mean_batch_size, 3),
                "max_batch_size": s.max_batch_size, "max_batch": config.max_batch,
                "edit_seconds": round(s.edit_seconds, 3), "uptime_s": round(time.time() - started, 1)}

    async def read_fields(request: Request) -> tuple[dict[str, Any], Optional[bytes], bool]:
        """(fields, uploaded image bytes, from a form)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise RequestError("body", f"{int(length)} bytes is over the {config.max_body_bytes}-byte limit", 413)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype == "multipart/form-data" or ctype == "application/x-www-form-urlencoded":
            try:
                form = await request.form(max_files=2, max_fields=64, max_part_size=config.max_body_bytes)
            except HTTPException as e:  # starlette's word on a broken multipart body, in our error format
                raise RequestError("body", f"malformed form data ({e.detail})", 400) from None
            fields: dict[str, Any] = {}
            upload: Optional[bytes] = None
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in UPLOAD_FILE_FIELDS:
                        raise RequestError(key, f"unexpected file field; upload the image as "
                                                f"'{UPLOAD_FILE_FIELDS[0]}' (or '{UPLOAD_FILE_FIELDS[1]}')")
                    upload = await value.read()
                elif key in fields:
                    raise RequestError(key, "given more than once")
                else:
                    fields[key] = value
            if upload is not None and "image" in fields:
                raise RequestError("image", "given both as a file and as a field; send one")
            return fields, upload, True
        if ctype != "application/json":
            raise RequestError("content-type", f"{ctype!r} is not supported: send application/json or "
                                               "multipart/form-data", 415)
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise RequestError("body", f"{len(raw)} bytes is over the {config.max_body_bytes}-byte limit", 413)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise RequestError("body", f"not valid JSON ({e})", 400) from None
        if not isinstance(body, dict):
            raise RequestError("body", f"expected a JSON object of fields, got {type(body).__name__}")
        return body, None, False

    async def edit(request: Request):
        count("requests")
        if (denied := unauthorized(request)) is not None:
            return denied
        t0 = time.perf_counter()
        try:
            fields, upload, from_form = await read_fields(request)
            parsed: ParsedEdit = await run_in_threadpool(
                parse_edit, fields, config.limits, compat=config.compat, image_bytes=upload, from_form=from_form,
                ignored_log=ignored_log)
            if parsed.loop and thinker is None:
                raise RequestError("think" if parsed.think else "reflect", "this server has no thinker; "
                                   "send think=false and reflect=false for a plain edit")
        except RequestError as e:
            count("bad_requests")
            log.info("rejected a request: %s", e)
            return _error(e.status, str(e), e.field)
        try:
            if parsed.loop:
                answer = await asyncio.wait_for(run_in_threadpool(run_loop, parsed), config.timeout)
            else:
                image = await asyncio.wait_for(asyncio.wrap_future(batcher.submit(parsed.request)), config.timeout)
                answer = {"edited_image": await run_in_threadpool(png_base64, image)}
        except QueueFull as e:
            return _error(503, str(e), None, {"Retry-After": "1"})
        except asyncio.TimeoutError:
            count("timed_out")
            return _error(504, f"no answer within the server's {config.timeout:g}s timeout", None)
        except ValueError as e:  # the editor's word on this request
            return _error(422, f"the editor refused the request: {e}", None)
        except Exception as e:
            log.exception("edit failed")
            return _error(500, f"edit failed: {type(e).__name__}: {e}", None)
        r = parsed.request
        answer.update(success=True, prompt=r.prompt, seed=r.seed, guidance_scale=r.guidance_scale,
                      num_inference_steps=r.num_inference_steps, processing_time=round(time.perf_counter() - t0, 4))
        if parsed.ignored or parsed.renamed:
            answer.update(ignored_fields=parsed.ignored, renamed_fields=parsed.renamed)
        return answer

    def run_loop(parsed: ParsedEdit) -> dict[str, Any]:
        from reasonedit.inference.loop import edit_with_reasoning

        count("loops")
        r = parsed.request
        trace = edit_with_reasoning(batcher.as_editor(editor_name), loop_thinker, [r.image], [r.prompt],
                                    think=parsed.think, reflect=parsed.reflect, rounds=parsed.rounds, seed=r.seed,
                                    guidance_scale=r.guidance_scale, num_inference_steps=r.num_inference_steps,
                                    negative_prompt=r.negative_prompt)[0]
        return {"edited_image": png_base64(np.asarray(trace.image)), "trace": trace.to_dict()}

    app.add_api_route("/edit", edit, methods=["POST"])
    app.add_api_route("/edit-upload", edit, methods=["POST"])
    return app


__all__ = ["ServeConfig", "create_app"]
