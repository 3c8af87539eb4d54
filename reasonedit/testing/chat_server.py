"""A scripted OpenAI-compatible chat-completions server on loopback: the stand-in for a paid judge or
thinker model in tests and benches.

It is a real HTTP server (stdlib `ThreadingHTTPServer` in a daemon thread, port 0 by default) that
speaks the subset of the OpenAI API our clients use:

- `POST /v1/chat/completions`: the reply's content is `respond(request)`, a function you supply of the
  parsed `ChatRequest` (messages with their image data URLs decoded on demand, model, temperature...).
  It may return a string (the content) or a `Reply` (content plus a status, a delay, a raw body).
- `GET /v1/models`: the one model it serves.

Scripted failures: `server.script(Reply(...), ...)` queues replies that the next requests get, in order,
before `respond` is asked again: `Reply.error(503)`, `Reply(delay=2.0)` (to trip a client timeout),
`Reply.malformed()` (a body that is not a chat completion). `api_key=` makes it demand
`Authorization: Bearer <key>` (401 otherwise). Every request that passes the key check is logged
(`server.log`, `server.requests`); every answer is counted (`served`: chat completions, `failed`:
errors, 401s and scripted bodies, `by_status`, `max_in_flight`).

    with ScriptedChatServer(lambda req: "score: 7\\nreason: fine") as server:
        client = OpenAIThinker(base_url=server.base_url, model=server.model)   # base_url ends in /v1
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """One scripted answer. `content` None means: ask `respond` for it (so a delay can precede a normal reply)."""

    content: Optional[str] = None
    status: int = 200
    delay: float = 0.0  # seconds to wait before answering
    body: Optional[bytes] = None  # sent as is instead of a chat completion (malformed bodies)
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str = "stop"

    @classmethod
    def error(cls, status: int, message: str = "scripted failure") -> "Reply":
        """An OpenAI-style error body with this HTTP status (429, 500, 503...)."""
        body = json.dumps({"error": {"message": message, "type": "server_error", "code": status}}).encode()
        return cls(status=status, body=body)

    @classmethod
    def malformed(cls, body: bytes = b'{"choices": [{"message": ') -> "Reply":
        """A 200 answer whose body is not a chat completion (truncated JSON by default)."""
        return cls(body=body)


@dataclass
class ChatRequest:
    """A parsed chat-completions request, as `respond` sees it."""

    messages: list[dict]
    model: str
    temperature: Optional[float]
    body: dict  # the whole JSON body
    headers: dict[str, str]
    path: str = "/v1/chat/completions"
    status: Optional[int] = None  # filled in once answered (for the log)

    @property
    def system(self) -> str:
        """The system prompt's text ('' if none)."""
        return "\n".join(_texts(m) for m in self.messages if m.get("role") == "system")

    @property
    def text(self) -> str:
        """The text parts of the last user message, joined by newlines."""
        users = [m for m in self.messages if m.get("role") == "user"]
        return _texts(users[-1]) if users else ""

    @property
    def image_urls(self) -> list[str]:
        """Every image URL (usually `data:image/png;base64,...`) in the messages, in order."""
        urls = []
        for m in self.messages:
            if isinstance(m.get("content"), list):
                for part in m["content"]:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        url = part.get("image_url")
                        urls.append(url.get("url", "") if isinstance(url, dict) else str(url))
        return urls

    def images(self) -> list[np.ndarray]:
        """The data-URL images decoded to uint8 (H, W, 3) arrays."""
        from PIL import Image
        out = []
        for url in self.image_urls:
            if not url.startswith("data:") or "," not in url:
                raise ValueError(f"image_url is not a data URL: {url[:60]!r}")
            raw = base64.b64decode(url.split(",", 1)[1])
            out.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
        return out


def _texts(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


Responder = Callable[[ChatRequest], Union[str, Reply]]


class ScriptedChatServer:
    """See the module docstring. Start with `with` (or `start()` / `close()`)."""

    def __init__(self, respond: Responder = lambda req: "ok", *, model: str = "scripted-chat",
                 api_key: Optional[str] = None, host: str = "127.0.0.1", port: int = 0):
        self.respond, self.model, self.api_key = respond, model, api_key
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._script: list[Reply] = []
        self._closing = threading.Event()
        self.log: list[ChatRequest] = []
        self.by_status: Counter[int] = Counter()
        self.served = self.failed = 0
        self.in_flight = self.max_in_flight = 0
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle
    def start(self) -> "ScriptedChatServer":
        self._httpd = ThreadingHTTPServer((self._host, self._port), _handler_for(self))
        self._httpd.daemon_threads = True  # a handler sleeping through a scripted delay must not block close()
        # a short poll: shutdown() waits up to one poll interval (0.5 s by default) per server
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="scripted-chat", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()  # wakes handlers sleeping through a delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "ScriptedChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        """http://host:port (no path)."""
        if self._httpd is None:
            raise RuntimeError("the scripted chat server is not started; use it in a `with` block")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in /v1 (what OPENAI_BASE_URL holds)."""
        return self.url + "/v1"

    # -- scripting
    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order, ahead of `respond`."""
        with self._lock:
            self._script.extend(replies)

    @property
    def requests(self) -> int:
        return len(self.log)

    def _next_reply(self, request: ChatRequest) -> Reply:
        with self._lock:
            scripted = self._script.pop(0) if self._script else None
        if scripted is not None and (scripted.body is not None or scripted.content is not None):
            return scripted
        answer = self.respond(request)
        reply = answer if isinstance(answer, Reply) else Reply(content=str(answer))
        if scripted is not None:  # a scripted delay or status around respond's content
            reply = Reply(content=reply.content, status=scripted.status if scripted.status != 200 else reply.status,
                          delay=scripted.delay + reply.delay, body=reply.body,
                          headers={**reply.headers, **scripted.headers}, finish_reason=reply.finish_reason)
        return reply

    def _completion(self, request: ChatRequest, reply: Reply) -> bytes:
        prompt_tokens = sum(len(_texts(m).split()) for m in request.messages)
        content = reply.content or ""
        return json.dumps({
            "id": f"chatcmpl-{len(self.log)}", "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content.split()),
                      "total_tokens": prompt_tokens + len(content.split())},
        }).encode()


def _error(message: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


def _handler_for(server: ScriptedChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body go out in two writes; without this Nagle holds the body ~40 ms on keep-alive
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, fmt: str, *args: Any) -> None:  # stderr noise -> logging
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, headers: Optional[dict[str, str]] = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                log.debug("client went away before the answer")

        def _authorized(self) -> bool:
            if server.api_key is None:
                return True
            if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                return True
            with server._lock:
                server.by_status[401] += 1
                server.failed += 1
            self._send(401, _error("invalid or missing API key (Authorization: Bearer ...)", "authentication_error"))
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [
                    {"id": server.model, "object": "model", "created": 0, "owned_by": "reasonedit-testing"}]}).encode())
            else:
                self._send(404, _error(f"no route GET {self.path}"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, _error(f"no route POST {self.path}"))
                return
            try:
                body = json.loads(raw)
                messages, model = body["messages"], body["model"]
                if not isinstance(messages, list) or not messages or not isinstance(model, str):
                    raise ValueError("'messages' must be a non-empty list and 'model' a string")
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, _error(f"bad chat request: {e}"))
                return
            request = ChatRequest(messages=messages, model=model, temperature=body.get("temperature"), body=body,
                                  headers=dict(self.headers.items()))
            with server._lock:
                server.log.append(request)
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                try:
                    reply = server._next_reply(request)
                except Exception as e:  # a bug in the test's respond function: answer 500, say why
                    log.exception("respond() raised")
                    reply = Reply.error(500, f"respond() raised {type(e).__name__}: {e}")
                if reply.delay and server._closing.wait(reply.delay):
                    return
                body_out = reply.body if reply.body is not None else server._completion(request, reply)
                request.status = reply.status
                with server._lock:
                    server.by_status[reply.status] += 1
                    if reply.status == 200 and reply.body is None:
                        server.served += 1
                    else:
                        server.failed += 1
                self._send(reply.status, body_out, reply.headers)
            finally:
                with server._lock:
                    server.in_flight -= 1

    return Handler
