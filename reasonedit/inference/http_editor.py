"""`HttpEditor`: an editor behind an EditThinker-style editing service (`POST /edit`, `GET /health`).

It goes through `reasonedit.clients.http.HttpClient`: what can pass (connection errors, timeouts, 429 and 5xx,
bodies that are not what the API returns) is retried with exponential backoff and jitter, and a `ServiceError`
names the URL and says what each attempt got. A 4xx other than 429 is the request's fault: no retry. See
docs/serve.md.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import httpx
import numpy as np

from reasonedit.clients.http import ClientOwner, HttpClient, RetryPolicy, Retryable, check_status
from reasonedit.clients.images import decode_base64_image, png_base64
from reasonedit.inference.types import EditRequest

log = logging.getLogger(__name__)



class HttpEditor(ClientOwner):
    """An `Editor` over EditThinker-style editing services: `POST {url}/edit` with JSON
    `{image: base64 PNG, prompt, seed, guidance_scale, num_inference_steps, negative_prompt, **extra}`,
    answered `{success, edited_image, ...}`.

    endpoints: one URL, a comma-separated list, or a list: requests go round robin, a failing endpoint
        sits out `cooldown` seconds. A batch is sent as up to `concurrency` requests at once.
    extra: fields added to every request (e.g. `{"enhance_prompt": False}` for EditThinker's servers).
    """

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = 600.0, retry: Optional[RetryPolicy] = None,
                 concurrency: int = 8, cooldown: float = 30.0, token: Optional[str] = None,
                 extra: Optional[dict[str, Any]] = None, name: Optional[str] = None):
        urls = [u.strip() for u in endpoints.split(",")] if isinstance(endpoints, str) else list(endpoints)
        urls = [u for u in urls if u]
        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
        self._client = HttpClient(urls, timeout=timeout, retry=retry, cooldown=cooldown, token=token,
                                  max_connections=concurrency * max(len(urls), 1))
        self.pool, self.retry = self._client.pool, self._client.retry
        self.timeout, self.concurrency = timeout, concurrency
        self.extra = dict(extra or {})
        self.name = name or "http:" + ",".join(self.pool.urls)

    def health(self) -> dict[str, bool]:
        """Each endpoint: does `GET /health` answer 200 (one try, short timeout)."""
        out = {}
        for url in self.pool.urls:
            try:
                out[url] = self._client.get(url + "/health", timeout=min(self.timeout, 5.0)).status_code == 200
            except httpx.HTTPError:
                out[url] = False
        return out

    def edit(self, requests: Sequence[EditRequest]) -> list[np.ndarray]:
        requests = list(requests)
        for i, r in enumerate(requests):
            if getattr(r, "extra_images", ()):
                raise ValueError(f"request {i}: {len(r.extra_images)} extra images, but an editing service takes one "
                                 "image per request (EditThinker's protocol); use the built-in generator of a model "
                                 "that takes several")
        if len(requests) <= 1 or self.concurrency == 1:
            return [self._edit_one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="http-edit") as ex:
            return list(ex.map(self._edit_one, requests))

    def _body(self, request: EditRequest) -> dict[str, Any]:
        return {"image": png_base64(request.image), "prompt": request.prompt, "seed": int(request.seed),
                "guidance_scale": float(request.guidance_scale),
                "num_inference_steps": int(request.num_inference_steps),
                "negative_prompt": request.negative_prompt, **self.extra}

    def _edit_one(self, request: EditRequest) -> np.ndarray:
        body = self._body(request)

        def attempt(url: str) -> np.ndarray:
            response = self._client.post(url + "/edit", json=body)
            check_status(response, url + "/edit")
            try:
                answer = response.json()
            except ValueError:
                raise Retryable(f"answer is not JSON: {response.text[:80]!r}") from None
            if not isinstance(answer, dict) or not answer.get("success"):
                error = answer.get("error") if isinstance(answer, dict) else None
                raise Retryable(f"success is not true ({error or 'no error given'})")
            if not isinstance(answer.get("edited_image"), str):
                raise Retryable("answer has no edited_image")
            try:
                return decode_base64_image(answer["edited_image"], "edited_image")
            except ValueError as e:
                raise Retryable(str(e)) from None

        return self._client.call(attempt, f"edit {request.prompt[:40]!r}")


__all__ = ["HttpEditor"]
