"""The edit service as a FastAPI app around any `Editor` (and, for the loop, a `Thinker`).

Routes: `POST /edit` (JSON or multipart; `/edit-upload` is the same route under EditThinker's name for
uploads), `GET /health` (no token needed), `GET /status`, and the API docs (`/docs`, `/redoc`,
`/openapi.json`: with a token set they need it too). A request's body is read within bounds
(`body.limit_body`, `body.parse_json_object`; 408 when it trickles in slower than `read_timeout`),
validated (`schema.parse_edit`), queued (503 when its lane is full), batched with its neighbours by the
`EditBatcher`, and answered within `timeout` seconds of its arrival (504 otherwise, and the work is stopped
at its next cancellation check). Think/reflect requests run on their own threads, at most `max_loops` at once
(`max_loop_queue` more wait), and their edits go through their own lane, so loops cannot starve plain edits
nor plain edits loops. `/health` answers 503 while a kind of request would be refused. A remote editor or
thinker that fails is 502 or 503. Every error, a crash included, answers `{"success": false, "error": ...,
"field": ...}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from reasonedit.clients.images import png_base64
from reasonedit.errors import RemoteServiceError
from reasonedit.inference import cancel
from reasonedit.inference.types import Editor, Thinker
from reasonedit.serve.batcher import EditBatcher, LockedThinker, QueueFull, ShuttingDown
from reasonedit.serve.body import limit_body, parse_json_object
from reasonedit.serve.schema import (
    COMPAT_MODES,
    DEFAULT_COMPAT,
    UPLOAD_FILE_FIELDS,
    IgnoredFieldLog,
    Limits,
    ParsedEdit,
    RequestError,
    accepted_shapes,
    parse_edit,
)

log = logging.getLogger(__name__)

TOKEN_PATTERN = re.compile(r"[!-~]+")  # what a bearer token may be: visible ASCII, one word
# failure kinds (clients.http.Failure) after which a later try may work: the upstream was away or busy
_UPSTREAM_AWAY = {"transport", "timeout", "http_429", "http_503"}
STOP_WAIT = 5.0  # seconds the shutdown waits for the edit worker once the grace period is over


def default_max_loops() -> int:
    """Loop slots for this machine: two per usable CPU core, at most 8. A loop's own CPU (images encoded for the
    thinker, replies, traces) competes with plain edits; measured on 2 cores (bench/serve_load.py), 8 slots let
    64 loop requests in flight slow a plain edit 1.3-2.2x, 4 slots 1.1-1.2x."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, 2 * cores))


@dataclass
class ServeConfig:
    """How the service takes requests. `token` None: no authentication (the CLI's --no-auth)."""

    token: Optional[str] = None
    max_queue: int = 128  # plain edits waiting: EditThinker's client runs 128 workers, one request each
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    timeout: float = 300.0  # seconds a request may take from its arrival: body, validation, queue and work
    # think/reflect requests running at once (each holds a thread, and spends CPU on images and replies, while it runs)
    max_loops: int = field(default_factory=lambda: default_max_loops())
    max_loop_queue: int = 32  # think/reflect requests waiting for one of those slots; more are answered 503
    read_timeout: float = 30.0  # seconds the body may take to arrive (a slow client is answered 408)
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers (then it is closed)
    grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    compat: Optional[str] = DEFAULT_COMPAT  # "editthinker": EditThinker's fields too | "strict" (or None): ours only
    max_body_bytes: int = 64 * 2 ** 20
    limits: Limits = field(default_factory=Limits)

    def validate(self) -> None:
        if self.compat is not None and self.compat not in COMPAT_MODES:
            raise ValueError(f"--compat {self.compat!r}: expected one of {', '.join(COMPAT_MODES)}")
        for name in ("max_queue", "max_batch", "max_loops", "max_loop_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.timeout <= 0:
            raise ValueError(f"--batch-wait-ms must be >= 0 and --timeout > 0 (got {self.batch_wait_ms}, {self.timeout})")
        for name in ("read_timeout", "header_timeout", "grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if self.token is not None and not TOKEN_PATTERN.fullmatch(self.token):
            raise ValueError("token: " + ("is empty" if not self.token else "must be visible ASCII without spaces "
                                          "(it travels in an HTTP header)") + "; None serves without authentication")


@dataclass
class _Counters:
    requests: int = 0
    bad_requests: int = 0
    unauthorized: int = 0
    timed_out: int = 0
    slow_bodies: int = 0
    loops: int = 0
    loops_running: int = 0
    loops_waiting: int = 0
    loops_stopped: int = 0  # loops given up (timed out, shut down) that stopped at their next check


class AsciiJSONResponse(JSONResponse):
    """JSON in ASCII: text from a thinker may hold what UTF-8 cannot carry (an unpaired surrogate)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return AsciiJSONResponse({"success": False, "error": message, "field": field}, status_code=status, headers=headers)


def upstream_status(error: RemoteServiceError) -> int:
    """503 when every attempt found the remote service away or busy (a later try may work), else 502."""
    kinds = {f.kind for f in getattr(error, "failures", ())}
    return 503 if kinds and kinds <= _UPSTREAM_AWAY else 502


def create_app(editor: Editor, config: Optional[ServeConfig] = None, thinker: Optional[Thinker] = None,
               model_name: str = "", thinker_shares_model: bool = True) -> FastAPI:
    """The service app. The batcher's worker starts and stops with the app (its lifespan).

    thinker_shares_model: the thinker runs on the editor's model (the built-in reasoner), so it takes
    the same lock as the editor; False for a remote thinker, which may run alongside edits.
    """
    config = config or ServeConfig()
    config.validate()
    lock = threading.Lock()
    # a running loop has at most one edit outstanding: the loop lane holds one per loop slot
    batcher = EditBatcher(editor, max_queue=config.max_queue, max_batch=config.max_batch,
                          batch_wait=config.batch_wait_ms / 1000.0, model_lock=lock, max_loop_queue=config.max_loops)
    loop_thinker = LockedThinker(thinker, lock) if thinker is not None and thinker_shares_model else thinker
    counters, ignored_log = _Counters(), IgnoredFieldLog()
    counters_lock = threading.Lock()
    started = time.time()
    editor_name = getattr(editor, "name", type(editor).__name__)
    loop_slots = asyncio.Semaphore(config.max_loops)
    live_loops: set[threading.Event] = set()  # the stop events of running loops, set at shutdown

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("edit service ready: editor %s, queue %d, batch %d", editor_name, config.max_queue, config.max_batch)
        try:
            yield
        finally:  # after uvicorn's grace period: what still runs is told to stop at its next check
            for stop in list(live_loops):
                stop.set()
            batcher.stop(timeout=STOP_WAIT)

    # the docs routes are ours, below, so they take the token as every other route does
    # no trailing-slash redirects: "/edit/" is a JSON 404 like any other unknown path, not an empty 307
    app = FastAPI(title="ReasonEdit edit service", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False,
                  default_response_class=AsciiJSONResponse,
                  description="EditThinker-style editing API over a ReasonEdit generator (docs/serve.md).")
    app.state.batcher, app.state.config, app.state.counters = batcher, config, counters

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # no such route or method
        return _error(e.status_code, str(e.detail), {404: "path", 405: "method"}.get(e.status_code), e.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return _error(500, f"internal error ({type(e).__name__}); see the server's log", None)

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

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return AsciiJSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    def overloaded() -> list[str]:
        """What is full: a new request of that kind would be answered 503."""
        full = []
        if batcher.depth >= config.max_queue:
            full.append("edit queue")
        if counters.loops_running >= config.max_loops and counters.loops_waiting >= config.max_loop_queue:
            full.append("loop slots")
        return full

    @app.get("/health")
    async def health():
        full = overloaded()
        answer = {"status": "overloaded" if full else "ok", "ready": not full, "overloaded": full,
                  "model": model_name, "editor": editor_name, "queue_depth": batcher.depth,
                  "max_queue": config.max_queue, "loops_running": counters.loops_running,
                  "loops_waiting": counters.loops_waiting, "max_loops": config.max_loops,
                  "max_loop_queue": config.max_loop_queue, "accepts": accepted_shapes(config.compat),
                  "timestamp": time.time()}
        return AsciiJSONResponse(answer, status_code=503 if full else 200,
                                 headers={"Retry-After": "1"} if full else None)

    @app.get("/status")
    async def status(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        s = batcher.stats
        return {"model": model_name, "editor": editor_name,
                "thinker": getattr(thinker, "name", None) if thinker is not None else None,
                "compat": config.compat, "queue_depth": batcher.depth, "max_queue": config.max_queue,
                "loop_queue_depth": batcher.loop_depth, "loops_running": counters.loops_running,
                "loops_waiting": counters.loops_waiting, "max_loops": config.max_loops,
                "max_loop_queue": config.max_loop_queue, "overloaded": overloaded(),
                "in_flight": batcher.in_flight, "requests": counters.requests, "served": s.served, "failed": s.failed,
                "rejected": s.rejected, "timed_out": counters.timed_out, "cancelled": s.cancelled, "stopped": s.stopped,
                "slow_bodies": counters.slow_bodies, "bad_requests": counters.bad_requests,
                "unauthorized": counters.unauthorized, "loops": counters.loops, "loops_stopped": counters.loops_stopped,
                "loop_edits": s.loop_edits,
                "batches": s.batches, "mean_batch_size": round(s.mean_batch_size, 3),
                "max_batch_size": s.max_batch_size, "max_batch": config.max_batch,
                "edit_seconds": round(s.edit_seconds, 3), "uptime_s": round(time.time() - started, 1)}

    async def read_fields(request: Request) -> tuple[dict[str, Any], Optional[bytes], bool]:
        """(fields, uploaded image bytes, from a form)."""
        request = limit_body(request, config.max_body_bytes)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            if ctype == "multipart/form-data" or ctype == "application/x-www-form-urlencoded":
                return await read_form(request)
            if ctype != "application/json":
                raise RequestError("content-type", f"{ctype!r} is not supported: send application/json or "
                                                   "multipart/form-data", 415)
            raw = await request.body()
            return await run_in_threadpool(parse_json_object, raw, config.limits), None, False
        except ClientDisconnect:
            raise RequestError("body", "the client went away before its body was in", 400) from None

    async def read_form(request: Request) -> tuple[dict[str, Any], Optional[bytes], bool]:
        try:
            async with request.form(max_files=2, max_fields=config.limits.max_fields,
                                    max_part_size=config.max_body_bytes) as form:  # closes the files' spools
                fields: dict[str, Any] = {}
                upload: Optional[bytes] = None
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if key not in UPLOAD_FILE_FIELDS:
                            raise RequestError(key, f"unexpected file field; upload the image as "
                                                    f"'{UPLOAD_FILE_FIELDS[0]}' (or '{UPLOAD_FILE_FIELDS[1]}')")
                        if upload is not None:
                            raise RequestError(key, "a second image file; upload one")
                        upload = await value.read()
                    elif key in fields:
                        raise RequestError(key, "given more than once")
                    else:
                        fields[key] = value
        except HTTPException as e:  # starlette's word on a broken multipart body, in our error format
            raise RequestError("body", f"malformed form data ({e.detail})", 400) from None
        if upload is not None and "image" in fields:
            raise RequestError("image", "given both as a file and as a field; send one")
        return fields, upload, True

    async def read_within(request: Request, seconds: float) -> tuple[dict[str, Any], Optional[bytes], bool]:
        """read_fields, or a 408 when the body has not arrived within `seconds` (a slow client)."""
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                return await read_fields(request)
        except TimeoutError:
            count("slow_bodies")
            raise RequestError("body", f"the body did not arrive within {max(seconds, 0.0):g}s", 408) from None

    async def edit(request: Request):
        count("requests")
        if (denied := unauthorized(request)) is not None:
            denied.headers["connection"] = "close"  # its body is not read: do not wait for it on this connection
            return denied
        t0 = time.perf_counter()
        deadline = time.monotonic() + config.timeout  # body, validation, queue and work all count against it

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        try:
            try:
                fields, upload, from_form = await read_within(request, min(config.read_timeout, left()))
                async with asyncio.timeout(left()):
                    parsed: ParsedEdit = await run_in_threadpool(
                        parse_edit, fields, config.limits, compat=config.compat, image_bytes=upload,
                        from_form=from_form, ignored_log=ignored_log)
                if parsed.loop and thinker is None:
                    raise RequestError("think" if parsed.think else "reflect", "this server has no thinker; "
                                       "send think=false and reflect=false for a plain edit")
            except RequestError as e:
                count("bad_requests")
                log.info("rejected a request: %s", e)
                # a body cut off at the limit (or still trickling in) is not read to its end: close rather than read on
                return _error(e.status, str(e), e.field, {"connection": "close"} if e.status in (408, 413) else None)
            if parsed.loop:
                answer = await run_loop_request(parsed, left)
            else:
                ticket = batcher.submit(parsed.request, "edit")
                try:
                    async with asyncio.timeout(left()):
                        image = await asyncio.wrap_future(ticket.future)
                except BaseException:  # timed out, or the server gives up on this request: the edit stops too
                    ticket.abandon()
                    raise
                answer = {"edited_image": await run_in_threadpool(png_base64, image)}
        except (QueueFull, ShuttingDown) as e:  # no room now, or no longer: another try (elsewhere) may work
            return _error(503, str(e), None, {"Retry-After": "1"})
        except TimeoutError:
            count("timed_out")
            return _error(504, f"no answer within the server's {config.timeout:g}s timeout; the work was stopped", None)
        except RemoteServiceError as e:  # the remote editor or thinker behind this server
            status = upstream_status(e)
            log.warning("an upstream service failed (%d): %s", status, e)
            return _error(status, f"an upstream service failed: {e}", None,
                          {"Retry-After": "1"} if status == 503 else None)
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

    async def run_loop_request(parsed: ParsedEdit, left) -> dict[str, Any]:
        """Run one think/reflect loop on its own thread once a loop slot is free (waiting counts against the
        deadline; with every slot taken and `max_loop_queue` waiting, QueueFull). The slot is held until the
        thread ends, so given-up loops still count until they stop, and loop threads never exceed max_loops."""
        if loop_slots.locked() and counters.loops_waiting >= config.max_loop_queue:
            raise QueueFull(f"every loop slot is taken ({config.max_loops} running, {config.max_loop_queue} "
                            "waiting); try again later")
        counters.loops_waiting += 1
        try:
            async with asyncio.timeout(left()):
                await loop_slots.acquire()
        finally:
            counters.loops_waiting -= 1
        counters.loops_running += 1
        stop, done = threading.Event(), Future()
        live_loops.add(stop)
        event_loop = asyncio.get_running_loop()

        def release() -> None:
            counters.loops_running -= 1
            loop_slots.release()

        def work() -> None:
            try:
                with cancel.cancel_scope(stop.is_set):
                    done.set_result(run_loop(parsed))
            except cancel.Cancelled as e:
                count("loops_stopped")
                done.set_exception(e)
            except BaseException as e:
                done.set_exception(e)
            finally:
                live_loops.discard(stop)
                try:
                    event_loop.call_soon_threadsafe(release)
                except RuntimeError:  # the event loop is gone: the server has stopped
                    pass

        threading.Thread(target=work, name="edit-loop", daemon=True).start()
        try:
            answer = asyncio.wrap_future(done)
            # a loop given up still ends (Cancelled, or its own error) after nobody awaits it: read its outcome then
            answer.add_done_callback(lambda f: f.cancelled() or f.exception())
            async with asyncio.timeout(left()):
                return await asyncio.shield(answer)
        except BaseException:  # timed out or cancelled: the loop stops at its next check
            stop.set()
            raise
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


__all__ = ["AsciiJSONResponse", "ServeConfig", "create_app", "upstream_status"]
