"""One HTTP client with retries, for every service we call: editing services, chat models, judges.

`HttpClient.call(attempt, what)` runs `attempt(url)` over an `EndpointPool` until it returns. It retries
connection errors, timeouts and the `Retryable` failures an attempt raises (429 and 5xx by
`check_status`, answers that are not what the API returns), waiting as its `RetryPolicy` says
(exponential backoff with jitter, the server's Retry-After within the bound). A `Rejected` failure (a
4xx other than 429: the request's fault) fails at once. When no attempt succeeds it raises
`ServiceError`, naming each URL and what it got, with the failures as records.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import httpx

from reasonedit.errors import RemoteServiceError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Failure:
    """One failed attempt: where, what it got, and its kind ("timeout", "transport", "http_503", ...)."""

    url: str
    message: str
    kind: str

    def __str__(self) -> str:
        return f"{self.url}: {self.message}"


class ServiceError(RemoteServiceError):
    """A remote service could not answer after every retry; the message names the URL(s) and each failure."""

    def __init__(self, message: str, failures: Sequence[Failure] = ()):
        super().__init__(message)
        self.failures = list(failures)


class Retryable(Exception):
    """One attempt failed in a way a later attempt may not."""

    def __init__(self, message: str, retry_after: Optional[float] = None, kind: str = "bad_answer"):
        super().__init__(message)
        self.retry_after, self.kind = retry_after, kind


class Rejected(Exception):
    """The service refused the request itself (a 4xx other than 429): another try will not fix it."""

    def __init__(self, message: str, kind: str = "rejected"):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------------
# How long to wait, and where to send


@dataclass
class RetryPolicy:
    """attempts in all (1 = no retry); the wait before retry k is min(max_backoff, backoff * 2**k), times a
    random factor in [1 - jitter, 1 + jitter] so clients that failed together do not retry together. The
    server's Retry-After raises that base, within max_backoff.

    never_shorter: the factor is drawn from [1, 1 + jitter] instead, and the wait is at least the server's
    Retry-After (within max_backoff) after the jitter: a wait is never shorter than asked for.
    """

    attempts: int = 4
    backoff: float = 0.5
    max_backoff: float = 10.0
    jitter: float = 0.25
    never_shorter: bool = False

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retries: attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("retries: backoff and max_backoff must be >= 0 and jitter in [0, 1]")

    def wait(self, retry: int, retry_after: Optional[float] = None) -> float:
        base = min(self.max_backoff, self.backoff * 2 ** retry)
        if self.never_shorter:
            delay = base * random.uniform(1, 1 + self.jitter)
            return delay if retry_after is None else max(delay, min(retry_after, self.max_backoff))
        if retry_after is not None:  # the server said when; still within our bound
            base = min(self.max_backoff, max(base, retry_after))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


class EndpointPool:
    """Round robin over base URLs. An endpoint that fails sits out `cooldown` seconds, then is tried again;
    when every endpoint sits out, the one back soonest is used rather than waiting."""

    def __init__(self, urls: Sequence[str], cooldown: float = 30.0):
        self.urls = [u.rstrip("/") for u in urls]
        if not self.urls:
            raise ValueError("endpoints: give at least one URL")
        for u in self.urls:
            if not re.match(r"^https?://[^/\s]+", u):
                raise ValueError(f"endpoint {u!r}: not an http(s) URL (e.g. http://127.0.0.1:8000)")
        self.cooldown = cooldown
        self._down_until = {u: 0.0 for u in self.urls}
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            now = time.monotonic()
            n = len(self.urls)
            for i in range(n):
                url = self.urls[(self._next + i) % n]
                if self._down_until[url] <= now:
                    self._next = (self._next + i + 1) % n
                    return url
            url = min(self.urls, key=self._down_until.__getitem__)
            self._next = (self.urls.index(url) + 1) % n
            return url

    def failed(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = time.monotonic() + self.cooldown

    def succeeded(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = 0.0

    def is_down(self, url: str) -> bool:
        with self._lock:
            return self._down_until[url] > time.monotonic()


# ---------------------------------------------------------------------------------------------------
# Reading a response


def retry_after(response: httpx.Response) -> Optional[float]:
    """The server's Retry-After in seconds; None when absent or an HTTP date (our own backoff will do)."""
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def error_text(response: httpx.Response) -> str:
    """The server's own words for a failure, short."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if key in body:
                value = body[key]
                if isinstance(value, dict):
                    value = value.get("message", value)
                return str(value)[:300]
    return str(body)[:200]


def check_status(response: httpx.Response, where: str) -> None:
    """Raise `Retryable` for 429 and 5xx (with the server's Retry-After), `Rejected` naming `where` for
    another 4xx."""
    code = response.status_code
    if code == 429 or code >= 500:
        raise Retryable(f"HTTP {code}: {error_text(response)}", retry_after(response), kind=f"http_{code}")
    if code >= 400:  # our request is wrong; another try will not fix it
        raise Rejected(f"{where} rejected the request: HTTP {code}: {error_text(response)}", kind=f"http_{code}")


# ---------------------------------------------------------------------------------------------------
# The client


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One verified TLS context for every client: building one per client costs ~40 ms of CPU."""
    import certifi
    return ssl.create_default_context(cafile=certifi.where())


def auth_headers(token: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class HttpClient:
    """An httpx client over an `EndpointPool`, retrying as a `RetryPolicy` says.

    timeout: seconds per request. max_connections: open at once (kept alive as many). sleep: how a wait is
    spent (tests pass a recorder; the judge counts its retries there).
    """

    def __init__(self, endpoints: Sequence[str], *, timeout: float, retry: Optional[RetryPolicy] = None,
                 cooldown: float = 30.0, token: Optional[str] = None, max_connections: int = 8,
                 sleep: Callable[[float], None] = time.sleep):
        self.pool = EndpointPool(endpoints, cooldown)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._sleep = sleep
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.Client(timeout=timeout, headers=auth_headers(token), verify=tls_context(), limits=limits)

    def close(self) -> None:
        self._http.close()

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self._http.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self._http.post(url, **kwargs)

    def call(self, attempt: Callable[[str], T], what: str) -> T:
        """Run `attempt(url)` over the pool until it returns; ServiceError (with `failures`) when none does."""
        policy, failures = self.retry, []
        for k in range(policy.attempts):
            url = self.pool.pick()
            wait_hint = None
            try:
                result = attempt(url)
            except Retryable as e:
                failure, wait_hint = Failure(url, str(e), e.kind), e.retry_after
            except Rejected as e:  # not the endpoint's fault: it does not sit out
                failures.append(Failure(url, str(e), e.kind))
                raise ServiceError(str(e), failures) from None
            except httpx.TimeoutException as e:
                failure = Failure(url, f"timed out after {self.timeout:g}s ({type(e).__name__})", "timeout")
            except httpx.TransportError as e:
                failure = Failure(url, f"{type(e).__name__}: {e}", "transport")
            else:
                self.pool.succeeded(url)
                return result
            failures.append(failure)
            self.pool.failed(url)
            if k + 1 < policy.attempts:
                delay = policy.wait(k, wait_hint)
                log.warning("%s failed (%s); retry %d/%d in %.2fs", what, failure, k + 1, policy.attempts - 1, delay)
                self._sleep(delay)
        raise ServiceError(f"{what} failed after {policy.attempts} attempt(s): " + "; ".join(map(str, failures)),
                           failures)


class ClientOwner:
    """For a service client built on an `HttpClient` kept as `self._client`: `close()` and a with-block."""

    _client: HttpClient

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ClientOwner", "EndpointPool", "Failure", "HttpClient", "Rejected", "RetryPolicy", "Retryable", "ServiceError",
           "auth_headers", "check_status", "error_text", "retry_after", "tls_context"]
