"""`OpenAIThinker`: the thinker behind any OpenAI-compatible chat endpoint (vLLM, a hosted model), in our
reflection contract or EditThinker's (`reasonedit.inference.editthinker`).

Calls go through `reasonedit.clients.http.HttpClient` (retries with backoff and jitter, Retry-After, an
endpoint pool); a reply in neither contract is a parse failure the loop records, not an exception. Built for
the editthinker loop (`loop="editthinker"`), EditThinker's contract reads replies as EditThinker's client
does (`editthinker.read_as_client`): nothing fails to parse.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from reasonedit.clients.http import ClientOwner, HttpClient, RetryPolicy, Retryable, check_status
from reasonedit.clients.images import data_url
from reasonedit.config import LOOPS
from reasonedit.inference.descriptions import TargetDescriptions
from reasonedit.inference.types import Reflection, check_reflect_inputs
from reasonedit.models import prompts
from reasonedit.models.prompts import ThinkerReplyError

from .editthinker import CONTRACTS, EDITTHINKER_TEMPLATE, check_template, load_prompt_template, parse_editthinker, \
    read_as_client

log = logging.getLogger(__name__)

_DECISION_TAG_RE = re.compile(r"<#[^<>\s]*>")


def _openai_messages(messages: Sequence[dict]) -> list[dict]:
    """Our prompt builders' messages ({"type": "image", "image": array}) as OpenAI chat messages (data URLs)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": data_url(p["image"])}})
                else:
                    parts.append({"type": "text", "text": p.get("text", "")})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


class OpenAIThinker(ClientOwner):
    """A `Thinker` over an OpenAI-compatible chat endpoint.

    base_url / model / api_key: from the arguments, else OPENAI_BASE_URL / OPENAI_MODEL / OPENAI_API_KEY.
    contract: "reasonedit" (our role prompts: think; reflect = describe_target, score, decide) or
        "editthinker" (one reply `<think>..</think><score>{semantic, quality}</score><answer>..</answer>`:
        Success when the answer repeats the previous instruction or both scores reach `threshold`;
        otherwise Reflection with the answer as the next instruction and restart=True, since EditThinker
        re-edits the source). An unparsable reply is Failed with `parse_error`; it is not retried. Ours asks
        for the target's description once per (source, instruction) and reads it back in later rounds
        (`descriptions`); `calls` counts the chats per role (describe, score, decide, think, reflect).
    prompt_template: editthinker only: a prompt file (EditThinker's `inference/prompt_template.txt`, sent as its
        client sends it) or the prompt text itself; default our own wording.
    loop: the loop this thinker is built for ("reasonedit" | "editthinker"); `edit_with_reasoning` follows it.
        With the editthinker contract it also says how replies are read: "editthinker" as EditThinker's client
        reads them (no reply fails), else strictly (the default).
    """

    def __init__(self, base_url: Optional[str] = None, model: Optional[str] = None, api_key: Optional[str] = None,
                 *, contract: str = "reasonedit", timeout: float = 180.0, retry: Optional[RetryPolicy] = None,
                 concurrency: int = 8, temperature: Optional[float] = None, max_tokens: Optional[int] = None,
                 threshold: float = 8.0, prompt_template: Optional[str | Path] = None, loop: Optional[str] = None,
                 name: Optional[str] = None):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise ValueError("OpenAIThinker: no base URL; pass base_url (e.g. http://127.0.0.1:8000/v1) "
                             "or set OPENAI_BASE_URL")
        self.model = model or os.environ.get("OPENAI_MODEL")
        if not self.model:
            raise ValueError("OpenAIThinker: no model name; pass model or set OPENAI_MODEL")
        if contract not in CONTRACTS:
            raise ValueError(f"contract {contract!r}: expected one of {', '.join(CONTRACTS)}")
        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
        if loop is not None and loop not in LOOPS:
            raise ValueError(f"loop {loop!r}: expected one of {', '.join(LOOPS)}")
        if prompt_template is not None and contract != "editthinker":
            raise ValueError("prompt_template: the reasonedit contract asks with our role prompts; a prompt file is "
                             "for contract='editthinker'")
        self.template = self._load_template(prompt_template)
        # the editthinker contract reads replies by its loop, so it always has one; ours reads them one way
        self.loop = loop or ("reasonedit" if contract == "editthinker" else None)
        self.lenient = contract == "editthinker" and self.loop == "editthinker"
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._client = HttpClient([base_url], timeout=timeout, retry=retry, cooldown=0.0, token=key,
                                  max_connections=concurrency)
        self.pool, self.retry = self._client.pool, self._client.retry
        self.base_url = self.pool.urls[0]
        self.contract, self.threshold, self.concurrency = contract, threshold, concurrency
        self.temperature, self.max_tokens = temperature, max_tokens
        said = [] if contract == "reasonedit" else [contract]
        if self.template != EDITTHINKER_TEMPLATE:  # a changed prompt makes other images: say which one
            said.append("prompt " + hashlib.sha256(self.template.encode()).hexdigest()[:12])
        if self.loop == "editthinker":
            said.append("editthinker loop")
        self.name = name or f"openai:{self.model}@{self.base_url}" + (f" ({', '.join(said)})" if said else "")
        self.parse_errors = 0
        self._lock = threading.Lock()
        self.descriptions = TargetDescriptions()
        self.calls = {role: 0 for role in ("think", "describe", "score", "decide", "reflect")}

    @staticmethod
    def _load_template(template: Optional[str | Path]) -> str:
        if template is None:
            return EDITTHINKER_TEMPLATE
        if isinstance(template, Path) or ("\n" not in str(template) and "{" not in str(template)):
            return load_prompt_template(template)  # a file name: a template itself holds placeholders
        check_template(str(template))
        return str(template)

    # -- transport
    def chat(self, messages: list[dict]) -> str:
        """One completion's text for OpenAI-format `messages`, with retries; ServiceError when none comes."""
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens

        def attempt(url: str) -> str:
            response = self._client.post(url + "/chat/completions", json=body)
            check_status(response, url + "/chat/completions")
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise Retryable(f"answer is not a chat completion: {response.text[:80]!r}") from None
            if not isinstance(content, str):
                raise Retryable(f"message content is {type(content).__name__}, not text")
            return content

        return self._client.call(attempt, f"chat ({self.model})")

    def _map(self, fn: Callable[[int], Any], n: int) -> list:
        if n <= 1 or self.concurrency == 1:
            return [fn(k) for k in range(n)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="openai-thinker") as ex:
            return list(ex.map(fn, range(n)))

    def _parse_failed(self, reflection: Reflection, phase: str, message: str) -> Reflection:
        with self._lock:
            self.parse_errors += 1
        reflection.decision, reflection.restart, reflection.parse_error = "failed", True, f"{phase}: {message}"
        log.warning("%s: %s reply did not parse (%s); taken as failed", self.name, phase, message)
        return reflection

    # -- Thinker
    def think(self, sources: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
        if len(sources) != len(instructions):
            raise ValueError(f"think: {len(sources)} sources for {len(instructions)} instructions")
        return self._map(lambda k: self._think_one(sources[k], instructions[k]), len(sources))

    def _think_one(self, source: np.ndarray, instruction: str) -> str:
        self._count("think")
        if self.contract == "reasonedit":
            text, problem = self.chat(_openai_messages(prompts.think(source, instruction))).strip(), "empty reply"
        elif self.lenient:  # as EditThinker's client: whatever answer the reply holds
            text, problem = read_as_client(self.chat(self._editthinker_messages(source, source, instruction, "")),
                                           "", self.threshold).answer, "no <answer>"
        else:
            # EditThinker's first-turn mode: judge the untouched source against an empty instruction
            try:
                text, problem = parse_editthinker(self.chat(
                    self._editthinker_messages(source, source, instruction, ""))).answer, ""
            except ThinkerReplyError as e:
                text, problem = "", str(e)
        if not text:  # nothing to act on: the user's own words are the best instruction we have
            with self._lock:
                self.parse_errors += 1
            log.warning("%s: think reply for %r did not parse (%s); editing with the instruction as given",
                        self.name, instruction, problem)
            return instruction
        return text

    def reflect(self, sources: Sequence[np.ndarray], edited: Sequence[np.ndarray], instructions: Sequence[str],
                previous: Sequence[Optional[str]]) -> list[Reflection]:
        n = check_reflect_inputs(sources, edited, instructions, previous)
        one = self._reflect_ours if self.contract == "reasonedit" else self._reflect_editthinker
        return self._map(lambda k: one(sources[k], edited[k], instructions[k], previous[k]), n)

    def _count(self, role: str) -> None:
        with self._lock:
            self.calls[role] += 1

    def _timed_chat(self, reflection: Reflection, phase: str, messages: list[dict]) -> str:
        self._count(phase)
        t0 = time.perf_counter()
        reply = self.chat(messages)
        reflection.timings[phase] = time.perf_counter() - t0
        reflection.raw[phase] = reply
        return reply

    def _reflect_ours(self, source: np.ndarray, edited: np.ndarray, instruction: str,
                      previous: Optional[str]) -> Reflection:
        r = Reflection(decision="failed")
        key = self.descriptions.key(source, instruction)
        known = self.descriptions.get(key)  # the description depends on (source, instruction) alone
        if known is not None:
            (r.raw["describe"], description), r.timings["describe"] = known, 0.0
        else:
            description = self._timed_chat(r, "describe",
                                           _openai_messages(prompts.describe_target(source, instruction))).strip()
            if not description or _DECISION_TAG_RE.search(description):
                return self._parse_failed(r, "describe",
                                          f"description is empty or holds a decision tag: {description[:80]!r}")
            self.descriptions.put(key, r.raw["describe"], description)
        r.description = description
        try:
            value, reason = prompts.parse_score(self._timed_chat(r, "score", _openai_messages(prompts.score(edited, description))))
        except ThinkerReplyError as e:
            return self._parse_failed(r, "score", str(e))
        r.score, r.reason = float(value), reason
        reply = self._timed_chat(r, "decide", _openai_messages(
            prompts.decide(source, previous or instruction, description, value, reason)))
        try:
            d = prompts.parse_decision(reply)
        except ThinkerReplyError as e:
            return self._parse_failed(r, "decide", str(e))
        r.decision, r.thought, r.instruction, r.restart = (d.kind, d.thought, d.new_instruction,
                                                              d.kind == "failed" or d.restart)
        return r

    def _editthinker_messages(self, source: np.ndarray, edited: np.ndarray, instruction: str, previous: str) -> list[dict]:
        # str.replace, not format: the template holds JSON braces
        text = self.template.replace("{original_instruction}", instruction).replace("{rewritten_prompt}", previous)
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(source)}},
                                             {"type": "image_url", "image_url": {"url": data_url(edited)}},
                                             {"type": "text", "text": text}]}]

    def _reflect_editthinker(self, source: np.ndarray, edited: np.ndarray, instruction: str,
                             previous: Optional[str]) -> Reflection:
        r = Reflection(decision="failed")
        previous = previous or instruction
        reply = self._timed_chat(r, "reflect", self._editthinker_messages(source, edited, instruction, previous))
        if self.lenient:
            return self._read_as_client(r, reply, previous)
        try:
            v = parse_editthinker(reply)
        except ThinkerReplyError as e:
            return self._parse_failed(r, "reflect", str(e))
        # one 0-10 score for ranking rounds: the geometric mean, as VIEScore combines its two
        r.score = math.sqrt(v.semantic * v.quality)
        r.reason = f"semantic {v.semantic:g}, quality {v.quality:g}"
        r.thought = v.thought
        satisfied = v.answer.strip() == previous.strip() or (v.semantic >= self.threshold and v.quality >= self.threshold)
        if satisfied:
            r.decision = "success"
        else:
            r.decision, r.instruction, r.restart = "reflection", v.answer, True
        return r

    def _read_as_client(self, r: Reflection, reply: str, previous: str) -> Reflection:
        c = read_as_client(reply, previous, self.threshold)
        r.score, r.thought = c.score, c.thought
        r.reason = f"semantic {_number(c.semantic)}, quality {_number(c.quality)}" + "".join(f"; {n}" for n in c.notes)
        if c.notes:
            log.info("%s: reply read as EditThinker's client reads it: %s", self.name, "; ".join(c.notes))
        if c.satisfied:
            r.decision = "success"
        else:
            r.decision, r.instruction, r.restart = "reflection", c.answer, True
        return r


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


__all__ = ["OpenAIThinker"]
