"""Run the service on uvicorn: `serve` for the CLI (SIGTERM drains), `ServerThread` in a background thread for
tests, benches and notebooks. Both use `uvicorn_config`, which takes the app's `ServeConfig` for the grace
period after SIGTERM and for `GuardedH11Protocol`'s header timeout."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from typing import Any, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)



class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's headers: a connection that has not sent a
    whole request head within `header_timeout` seconds of its first byte (or of connecting) is answered 408
    and closed, so slow clients cannot hold connections open by trickling headers. Idle keep-alive
    connections are closed by uvicorn's `timeout_keep_alive`; a body that trickles in is the app's
    `read_timeout`."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._arm()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # the next request's head has to arrive in time, from its first byte on
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # a whole head arrived: the app runs the request, under its own deadlines

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle wait
        self._disarm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to HTTP it cannot parse (a Content-Length that is not a number, a header line too long),
        in the service's JSON error format instead of plain text."""
        self._answer_and_close("400 Bad Request", f"malformed HTTP request ({msg})", "http")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._between_requests():
            return
        self._answer_and_close("408 Request Timeout", f"the request headers did not arrive within "
                                                      f"{self.header_timeout:g}s", "headers")

    def _answer_and_close(self, status: str, error: str, field: str) -> None:
        """Write one error answer in the service's JSON format past h11 (the request never parsed) and close."""
        body = json.dumps({"success": False, "error": error, "field": field}, separators=(",", ":")).encode()
        head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {len(body)}"
        self.transport.write(head.encode() + b"\r\n\r\n" + body)
        self.transport.close()


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's config for `app`: the header deadline and the SIGTERM grace period from the app's `ServeConfig`
    (`app.state.config`) when it has one."""
    serve = getattr(getattr(app, "state", None), "config", None)
    header_timeout = getattr(serve, "header_timeout", GuardedH11Protocol.header_timeout)
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                          timeout_graceful_shutdown=getattr(serve, "grace", 5.0))


def serve(app: Any, host: str, port: int, log_level: str = "warning") -> int:
    """Serve until SIGTERM or SIGINT. On either, stop accepting, give in-flight requests the grace period
    (`ServeConfig.grace`) to finish, cancel what is left (its work stops at its next check), and return 0."""
    config = uvicorn_config(app, host, port, log_level)
    stopped: list[int] = []

    def note(sig: int, frame: Any) -> None:  # uvicorn re-raises the signal it drained on: it ends here
        stopped.append(sig)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        log.warning("stopped on %s after draining (grace %gs)", signal.Signals(stopped[0]).name,
                    config.timeout_graceful_shutdown)
    return 0


class ServerThread:
    """`with ServerThread(app) as server: httpx.get(server.url + "/health")`; port 0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0):
        self.config = uvicorn_config(app, host, port, log_level)
        self.config.timeout_graceful_shutdown = min(self.config.timeout_graceful_shutdown or 5.0, 5.0)
        self.server = uvicorn.Server(self.config)
        self.start_timeout = start_timeout
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _serve(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # surfaced by start(): a server that never started says why
            self._error = e

    def start(self) -> "ServerThread":
        self._thread = threading.Thread(target=self._serve, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.config.host}:{self.config.port} did not start"
                                   + (f": {self._error!r}" if self._error else ""))
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["GuardedH11Protocol", "ServerThread", "serve", "uvicorn_config"]
