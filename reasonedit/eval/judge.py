"""An OpenAI-compatible vision judge: chat completions with images as base64 data URLs.

`Judge.ask(requests)` sends each `JudgeRequest` (a prompt and images, in order) to
`{base_url}/chat/completions`, at most `concurrency` at a time, through `reasonedit.clients.http`:
timeouts, transport errors and the statuses in RETRY_STATUS (408, 409, 425, 429, 500, 502-504) are retried
with exponential backoff (and the server's Retry-After, when it sends one: a wait is never shorter). Every reply
is appended to a persistent cache keyed by (model, system, prompt, images' SHA-256, temperature,
max_tokens), so a run killed at any point resumes without asking for a reply it already has. A
request that still fails after its retries comes back as a `JudgeReply` with `error` set (and is not
cached, so the next run asks again); the caller records it as a failed sample, never a guess.
A reply body is read as a stream and given up on past `max_reply_bytes` (a failed call, not retried:
the same question would get the same answer), so a runaway server never fills our memory.

Settings come from arguments, else the environment: REASONEDIT_JUDGE_BASE_URL / _API_KEY / _MODEL,
falling back to OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import httpx
import numpy as np

from reasonedit.clients.http import ClientOwner, HttpClient, Rejected, RetryPolicy, Retryable, ServiceError, retry_after
from reasonedit.clients.images import data_url, image_mime, png_bytes
from reasonedit.errors import RemoteServiceError

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
ENV_PREFIXES = ("REASONEDIT_JUDGE_", "OPENAI_")


class JudgeError(RemoteServiceError):
    """A judge request that failed for good (after retries, or at once for a non-retryable status)."""


@dataclass
class JudgeSettings:
    """Where the judge is and how to talk to it."""

    base_url: str  # e.g. https://api.openai.com/v1 (the part before /chat/completions)
    model: str
    api_key: Optional[str] = None
    temperature: float = 0.0
    max_tokens: Optional[int] = 1024
    timeout: float = 120.0  # seconds per request
    retries: int = 4  # attempts after the first
    backoff: float = 1.0  # first wait in seconds; doubles each retry, plus up to as much jitter
    max_backoff: float = 60.0
    concurrency: int = 8
    max_reply_bytes: int = 1 << 20  # a chat completion of 1024 tokens is a few KB; past this: a failed call

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base URL {self.base_url!r} must start with http:// or https://")
        if self.concurrency < 1:
            raise ValueError(f"judge concurrency must be at least 1, got {self.concurrency}")
        if self.retries < 0:
            raise ValueError(f"judge retries must be 0 or more, got {self.retries}")
        if self.max_reply_bytes < 1:
            raise ValueError(f"judge max_reply_bytes must be at least 1, got {self.max_reply_bytes}")

    @property
    def retry_policy(self) -> RetryPolicy:
        """The waits between attempts: jitter only adds (up to as much again) and Retry-After is a floor."""
        return RetryPolicy(attempts=self.retries + 1, backoff=self.backoff, max_backoff=self.max_backoff,
                           jitter=1.0, never_shorter=True)

    @property
    def judge_id(self) -> str:
        """The id recorded with every score: the model and the endpoint that served it."""
        return f"{self.model}@{self.base_url.rstrip('/')}"

    @classmethod
    def resolve(cls, base_url: Optional[str] = None, model: Optional[str] = None, api_key: Optional[str] = None,
                env: Optional[dict] = None, **kwargs) -> "JudgeSettings":
        """Fill base URL, model and key from the arguments, else REASONEDIT_JUDGE_*, else OPENAI_*."""
        env = os.environ if env is None else env

        def pick(value, name):
            if value:
                return value
            for prefix in ENV_PREFIXES:
                if env.get(prefix + name):
                    return env[prefix + name]
            return None

        base_url, model, api_key = pick(base_url, "BASE_URL"), pick(model, "MODEL"), pick(api_key, "API_KEY")
        if not base_url:
            raise ValueError("no judge base URL: pass --judge-url or set REASONEDIT_JUDGE_BASE_URL (or OPENAI_BASE_URL)")
        if not model:
            raise ValueError("no judge model: pass --judge-model or set REASONEDIT_JUDGE_MODEL (or OPENAI_MODEL)")
        return cls(base_url=base_url, model=model, api_key=api_key, **kwargs)


@dataclass
class JudgeRequest:
    """One question to the judge: a prompt and its images, in the order the prompt refers to them."""

    prompt: str
    images: Sequence[ImageInput] = ()
    system: Optional[str] = None


@dataclass
class JudgeReply:
    """The judge's answer to one request: `text`, or `error` when none came back."""

    text: Optional[str]
    judge: str  # JudgeSettings.judge_id
    temperature: float
    error: Optional[str] = None
    error_kind: Optional[str] = None  # with error: "bad_image" (never sent), "timeout", "http_503", "reply_too_large"
    cached: bool = False
    attempts: int = 0  # HTTP requests this reply cost in this run (0 when it came from the cache)
    seconds: float = 0.0
    served_model: Optional[str] = None  # the `model` field of the server's reply

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class JudgeStats:
    """What a judge did in this process: the figures a report prints beside its scores."""

    requests: int = 0  # HTTP requests sent, retries included
    replies: int = 0  # replies received and cached
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0  # requests given up on
    by_error: dict[str, int] = field(default_factory=dict)


def image_bytes(image: ImageInput) -> bytes:
    """The bytes sent for an image: a file's bytes as they are, an array encoded as PNG."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"judge images must be uint8 (H, W, 3|4) arrays, got {image.dtype} {image.shape}")
        return png_bytes(image)
    if isinstance(image, bytes):
        return _sendable(image, "judge image bytes")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"judge image {path} does not exist")
    return _sendable(path.read_bytes(), str(path))


def _sendable(data: bytes, what: str) -> bytes:
    """PNG, JPEG, WebP and GIF go as they are; any other image PIL reads (BMP, TIFF...) is re-encoded as PNG."""
    try:
        image_mime(data)
        return data
    except ValueError:
        pass
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{what} is not an image file") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what}: {e}") from None
    return buf.getvalue()


def cache_key(settings: JudgeSettings, request: JudgeRequest, images: Sequence[bytes]) -> str:
    """SHA-256 over everything that changes the judge's answer (never the key or the URL)."""
    doc = {"model": settings.model, "system": request.system, "prompt": request.prompt,
           "images": [hashlib.sha256(b).hexdigest() for b in images],
           "temperature": settings.temperature, "max_tokens": settings.max_tokens}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ReplyCache:
    """An append-only JSONL file of judge replies, one line per reply, keyed by `cache_key`.

    Each line goes out in one unbuffered O_APPEND write, so a process killed mid-run leaves whole lines
    plus at most one torn last line, which the next load skips (and reports). Several processes
    (shards) may append to the same file.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replies: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.torn_lines = 0
        if self.path.exists():
            self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.torn_lines:
            os.write(self._fd, b"\n")  # end the torn line so the next record starts on its own line

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self._replies[record["key"]] = record
                except (ValueError, KeyError, TypeError):
                    self.torn_lines += 1
                    log.warning("judge cache %s line %d is not a whole record (a killed run?); it is ignored",
                                self.path, number)

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> Optional[dict]:
        return self._replies.get(key)

    def put(self, key: str, record: dict) -> None:
        record = {"key": key, **record}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            self._replies[key] = record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ReplyTooLarge(Rejected):
    """A reply body past the bound: given up on without reading the rest."""

    def __init__(self, message: str):
        super().__init__(message, kind="reply_too_large")


class _StreamingClient(HttpClient):
    """The shared HTTP client, plus a POST whose body is read as a stream (HttpClient reads it whole)."""

    def post_bounded(self, url: str, limit: int, deadline: float, **kwargs) -> tuple[httpx.Response, bytes]:
        """(response, body) with the body read chunk by chunk: ReplyTooLarge as soon as it passes `limit` bytes,
        httpx.ReadTimeout once `deadline` (time.monotonic) passes."""
        headers = {"Accept-Encoding": "identity", **kwargs.pop("headers", {})}  # count the bytes as they come
        with self._http.stream("POST", url, headers=headers, **kwargs) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ReplyTooLarge(f"HTTP {response.status_code} reply of {int(declared):,} bytes (Content-Length) "
                                    f"is over the bound of {limit:,} bytes (max_reply_bytes); not read")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ReplyTooLarge(f"HTTP {response.status_code} reply passed the bound of {limit:,} bytes "
                                        "(max_reply_bytes); the rest was not read")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"the reply was still arriving after {self.timeout:g}s")
        return response, bytes(body)


class Judge(ClientOwner):
    """A vision judge behind an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, settings: JudgeSettings, cache: Union[ReplyCache, str, os.PathLike, None] = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.cache = ReplyCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = JudgeStats()
        self._sleep = sleep
        self._stats_lock = threading.Lock()
        self._client = _StreamingClient([settings.base_url], timeout=settings.timeout, retry=settings.retry_policy,
                                        cooldown=0.0, token=settings.api_key, max_connections=settings.concurrency,
                                        sleep=self._backoff)
        self.url = self._client.pool.urls[0] + "/chat/completions"

    def close(self) -> None:
        super().close()
        if self.cache is not None:
            self.cache.close()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, n in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def _count_error(self, kind: str) -> None:
        with self._stats_lock:
            self.stats.by_error[kind] = self.stats.by_error.get(kind, 0) + 1

    def ask(self, requests: Sequence[JudgeRequest],
            on_reply: Optional[Callable[[int, JudgeReply], None]] = None) -> list[JudgeReply]:
        """One reply per request, in order; `on_reply(index, reply)` is called as each one lands."""
        s = self.settings
        replies: list[Optional[JudgeReply]] = [None] * len(requests)
        pending: dict[str, list[int]] = {}  # identical requests in one call are sent once
        for i, request in enumerate(requests):
            try:
                key = cache_key(s, request, [image_bytes(im) for im in request.images])
            except (OSError, ValueError) as e:  # an unreadable image fails its request, not the whole call
                self._count(failures=1)
                self._count_error("bad_image")
                replies[i] = JudgeReply(text=None, judge=s.judge_id, temperature=s.temperature, error=str(e),
                                        error_kind="bad_image")
                if on_reply:
                    on_reply(i, replies[i])
                continue
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                self._count(cache_hits=1)
                replies[i] = JudgeReply(text=hit["text"], judge=s.judge_id, temperature=s.temperature, cached=True,
                                        served_model=hit.get("served_model"))
                if on_reply:
                    on_reply(i, replies[i])
                continue
            pending.setdefault(key, []).append(i)

        def work(key: str) -> None:
            # the body (base64 images) is built here, not above, so only `concurrency` of them live at once
            request = requests[pending[key][0]]
            reply = self._send(self._body(request, [image_bytes(im) for im in request.images]))
            if reply.ok and self.cache is not None:
                self.cache.put(key, {"text": reply.text, "model": s.model, "temperature": s.temperature,
                                     "served_model": reply.served_model, "time": time.time()})
            for i in pending[key]:
                replies[i] = reply
                if on_reply:
                    on_reply(i, reply)

        if pending:
            with ThreadPoolExecutor(max_workers=min(s.concurrency, len(pending)),
                                    thread_name_prefix="judge") as pool:
                for future in [pool.submit(work, key) for key in list(pending)]:
                    future.result()
        return replies  # type: ignore[return-value]

    def _body(self, request: JudgeRequest, images: Sequence[bytes]) -> dict:
        content = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
        content.append({"type": "text", "text": request.prompt})
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages.append({"role": "user", "content": content})
        body = {"model": self.settings.model, "messages": messages, "temperature": self.settings.temperature}
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        return body

    def _backoff(self, delay: float) -> None:
        self._count(retries=1)
        self._sleep(delay)

    def _send(self, body: dict) -> JudgeReply:
        s = self.settings
        started = time.perf_counter()
        tries = 0

        def attempt(url: str) -> tuple[str, dict]:
            nonlocal tries
            tries += 1
            self._count(requests=1)
            response, raw = self._client.post_bounded(url + "/chat/completions", s.max_reply_bytes,
                                                      time.monotonic() + s.timeout, json=body)
            shown = raw[:200].decode("utf-8", "replace")
            if response.status_code != 200:
                error, kind = f"HTTP {response.status_code}: {shown}", f"http_{response.status_code}"
                if response.status_code in RETRY_STATUS:
                    raise Retryable(error, retry_after(response), kind)
                if response.status_code in (401, 403):
                    error += " (check --judge-key / REASONEDIT_JUDGE_API_KEY)"
                raise Rejected(error, kind)  # a request the server will never accept: retrying cannot help
            try:
                doc = json.loads(raw)
                text = doc["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise Retryable(f"malformed response body: {shown!r}", kind="malformed_body") from None
            if not isinstance(text, str):
                raise Retryable(f"reply has no text content: {str(doc)[:200]}", kind="no_content")
            return text, doc

        try:
            text, doc = self._client.call(attempt, f"judge request ({s.model})")
        except ServiceError as e:
            last = e.failures[-1]
            self._count(failures=1)
            self._count_error(last.kind)
            log.warning("judge request to %s failed: %s", self.url, last.message)
            return JudgeReply(text=None, judge=s.judge_id, temperature=s.temperature,
                              error=f"{self.url}: {last.message}", error_kind=last.kind, attempts=tries,
                              seconds=time.perf_counter() - started)
        self._count(replies=1)
        return JudgeReply(text=text, judge=s.judge_id, temperature=s.temperature, attempts=tries,
                          seconds=time.perf_counter() - started, served_model=doc.get("model"))


def settings_dict(settings: JudgeSettings) -> dict:
    """The settings a report records (never the key)."""
    d = asdict(settings)
    d.pop("api_key")
    d["judge"] = settings.judge_id
    return d
