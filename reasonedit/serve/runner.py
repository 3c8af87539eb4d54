"""Run an ASGI app on a real uvicorn server in a background thread: for tests, benches and notebooks."""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import uvicorn


class ServerThread:
    """`with ServerThread(app) as server: httpx.get(server.url + "/health")`; port 0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0):
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                     timeout_graceful_shutdown=5)
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


__all__ = ["ServerThread"]
