"""`HttpEditor`: an editor behind an EditThinker-style editing service (`POST /edit`, `GET /health`).

It goes through `reasonedit.clients.http.HttpClient`: what can pass (connection errors, timeouts, 429 and 5xx,
bodies that are not what the API returns) is retried with exponential backoff and jitter, and a `ServiceError`
names the URL and says what each attempt got. A 4xx other than 429 is the request's fault: no retry. A preset
(`editor_presets`) says how the service behind the URL is spoken to. See docs/serve.md.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import httpx
import numpy as np

from reasonedit.clients.http import ClientOwner, HttpClient, RetryPolicy, Retryable, check_status
from reasonedit.clients.images import decode_base64_image, png_base64
from reasonedit.inference.editor_presets import DEFAULT_PRESET, EditorPreset, get_preset
from reasonedit.inference.types import EditRequest

log = logging.getLogger(__name__)


class HttpEditor(ClientOwner):
    """An `Editor` over EditThinker-style editing services: `POST {url}/edit` with JSON
    `{image: base64 PNG, prompt, seed, <steps>, <guidance>, [negative_prompt], **preset.fixed, **extra}`,
    answered `{success, edited_image, ...}`.

    endpoints: one URL, a comma-separated list, or a list: requests go round robin, a failing endpoint
        sits out `cooldown` seconds. A batch is sent as up to `concurrency` requests at once.
    preset: the service behind the URLs (`editor_presets.PRESET_NAMES`; None: our own `reasonedit serve`): its
        field names and the fields sent with every request (`enhance_prompt: false`). A request's own steps,
        guidance and negative prompt are sent as they are; `preset.defaults()` are the service's own.
    resize_to_source: resize each result to its source's size (None: the preset's choice, on for the
        EditThinker services, which answer at their own resolution).
    extra: fields added to every request, over the preset's.
    """

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = 600.0, retry: Optional[RetryPolicy] = None,
                 concurrency: int = 8, cooldown: float = 30.0, token: Optional[str] = None,
                 extra: Optional[dict[str, Any]] = None, name: Optional[str] = None,
                 preset: str | EditorPreset | None = None, resize_to_source: Optional[bool] = None):
        urls = [u.strip() for u in endpoints.split(",")] if isinstance(endpoints, str) else list(endpoints)
        urls = [u for u in urls if u]
        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
        self._client = HttpClient(urls, timeout=timeout, retry=retry, cooldown=cooldown, token=token,
                                  max_connections=concurrency * max(len(urls), 1))
        self.pool, self.retry = self._client.pool, self._client.retry
        self.timeout, self.concurrency = timeout, concurrency
        self.preset = get_preset(preset)
        self.resize_to_source = self.preset.resize_to_source if resize_to_source is None else bool(resize_to_source)
        self.extra = {**self.preset.fixed, **(extra or {})}
        self._unsent_negative = False  # warned once: the service takes no negative prompt
        tags = [self.preset.name] if self.preset.name != DEFAULT_PRESET else []
        tags += ["resized to source"] if self.resize_to_source else []
        self.name = name or "http:" + ",".join(self.pool.urls) + (f" [{', '.join(tags)}]" if tags else "")

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
        p = self.preset
        steps, guidance = int(request.num_inference_steps), float(request.guidance_scale)
        # the service's own bounds, said here rather than as its 422 (which is not retried either)
        if p.max_steps is not None and not 1 <= steps <= p.max_steps:
            raise ValueError(f"num_inference_steps {steps}: the {p.name} service takes 1-{p.max_steps}")
        if p.max_guidance is not None and not 0.0 <= guidance <= p.max_guidance:
            raise ValueError(f"{p.guidance_field} {guidance:g}: the {p.name} service takes 0-{p.max_guidance:g}")
        body = {"image": png_base64(request.image), "prompt": request.prompt, "seed": int(request.seed),
                p.guidance_field: guidance, "num_inference_steps": steps}
        if p.negative_prompt is not None:
            body["negative_prompt"] = request.negative_prompt
        elif request.negative_prompt.strip() and not self._unsent_negative:
            self._unsent_negative = True
            log.warning("%s: the %s service takes no negative prompt; %r is not sent", self.name, p.name,
                        request.negative_prompt[:40])
        body.update(self.extra)
        return body

    def _at_source_size(self, edited: np.ndarray, source: np.ndarray) -> np.ndarray:
        if not self.resize_to_source or edited.shape[:2] == source.shape[:2]:
            return edited
        from PIL import Image
        height, width = source.shape[:2]
        return np.array(Image.fromarray(edited).resize((width, height), Image.Resampling.LANCZOS))

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

        edited = self._client.call(attempt, f"edit {request.prompt[:40]!r}")
        return self._at_source_size(edited, request.image)


__all__ = ["HttpEditor"]
