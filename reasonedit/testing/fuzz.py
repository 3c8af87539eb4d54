"""A seeded fuzz of the edit service (`reasonedit serve`): malformed and oversized requests of every field and
kind, each a pure function of (seed, index), sent to a server on loopback, with a `/health` probe between
bursts. What docs/serve.md promises is what a case expects: a JSON `{"success": false, ...}` answer with a
4xx status, and the status and `field` the docs give for that kind of badness.

    target = FuzzTarget(max_body_bytes=2 ** 20, token="s3cret")
    report = run_fuzz(server.url, 2000, seed=0, target=target)
    assert not report.failures and not report.mismatches, report.describe()

Each case changes one thing of a request the service would take (`base_fields`), so the answer has one right
field. Most cases go through httpx; the bodies over the limit go over a raw socket, which can declare a
length it never sends and stop a chunked body once the server has answered.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import httpx
import numpy as np
from PIL import Image

from reasonedit.serve.schema import Limits

UNCHECKED = "<unchecked>"  # a case's field where the docs name none
SEED_MAX = 2 ** 63 - 1
GUIDANCE_MAX = 30.0

# docs/serve.md, "Request fields": each field's JSON type (the numeric bounds are in `_bounds`)
FIELD_TYPES = {"image": "str", "prompt": "str", "seed": "int", "guidance_scale": "float", "num_inference_steps": "int",
               "negative_prompt": "str", "think": "bool", "reflect": "bool", "rounds": "int"}
NUMERIC_FIELDS = ("seed", "guidance_scale", "num_inference_steps", "rounds")
TEXT_FIELDS = ("prompt", "negative_prompt")
UPLOAD_FIELDS = ("image", "image_file")
ROUTES = (("POST", "/edit"), ("POST", "/edit-upload"), ("GET", "/health"), ("GET", "/status"), ("GET", "/docs"),
          ("GET", "/redoc"), ("GET", "/openapi.json"))


@dataclass(frozen=True)
class FuzzTarget:
    """What the fuzz must know of the server it sends to: its body limit, token, request limits, and whether
    it has a thinker (without one, a plain `think: true` is refused)."""

    max_body_bytes: int = 64 * 2 ** 20
    token: Optional[str] = None
    limits: Limits = field(default_factory=Limits)
    thinker: bool = False


@dataclass
class Case:
    """One malformed request and what the docs say it is answered."""

    index: int
    kind: str  # what is wrong, e.g. "seed/out-of-range"
    note: str  # the variant, e.g. "seed = -1"
    method: str
    path: str
    headers: list[tuple[str, bytes]]
    body: bytes
    statuses: tuple[int, ...]  # any of these
    field: Optional[str] = UNCHECKED  # the `field` the answer names; UNCHECKED where the docs name none
    transport: str = "http"  # "http" (httpx) | "declared" (a Content-Length it never sends) | "chunked"
    declared: int = 0  # "declared": the Content-Length sent

    def describe(self) -> str:
        body = self.body[:160] + (b"..." if len(self.body) > 160 else b"")
        return (f"case {self.index} {self.kind} ({self.note}): {self.method} {self.path}, {len(self.body)} bytes "
                f"{body!r}, expected {'/'.join(map(str, self.statuses))} field {self.field!r}")


@dataclass
class Answer:
    status: Optional[int]  # None: no answer (a timeout, a reset)
    content_type: str = ""
    body: bytes = b""
    error: str = ""  # what went wrong on the way, when there was no answer


@dataclass
class Problem:
    case: Case
    what: str
    answer: Answer

    def __str__(self) -> str:
        return f"{self.what}: {self.case.describe()}; answered {self.answer.status} {self.answer.body[:300]!r}"


@dataclass
class FuzzReport:
    """What a run saw. `failures` break the service's promise (an answer that is not a JSON 4xx, a 5xx, no
    answer); `mismatches` are JSON 4xx answers with another status or field than the docs give."""

    seed: int
    cases: int = 0
    by_kind: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    failures: list[Problem] = field(default_factory=list)
    mismatches: list[Problem] = field(default_factory=list)
    health_seconds: list[float] = field(default_factory=list)  # each probe, in order; before the first burst too
    health_failures: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    stopped_early: bool = False  # `max_seconds` ran out before every case was sent

    @property
    def health_max(self) -> float:
        return max(self.health_seconds, default=0.0)

    @property
    def health_median(self) -> float:
        return statistics.median(self.health_seconds) if self.health_seconds else 0.0

    def describe(self, most: int = 20) -> str:
        lines = [f"seed {self.seed}: {self.cases} cases in {self.wall_seconds:.1f}s; by status "
                 + ", ".join(f"{s}: {n}" for s, n in sorted(self.by_status.items(), key=lambda kv: str(kv[0]))),
                 f"{len(self.failures)} failures, {len(self.mismatches)} mismatches; /health max "
                 f"{self.health_max * 1000:.0f}ms, median {self.health_median * 1000:.0f}ms over "
                 f"{len(self.health_seconds)} probes" + (" (stopped early)" if self.stopped_early else "")]
        lines += [str(p) for p in (self.failures + self.mismatches)[:most]]
        lines += self.health_failures[:most]
        return "\n".join(lines)


# -- the building blocks of a request -----------------------------------------------------------------------
PROMPTS = ("make the red circle blue", "Move the small green star to row 2, column 3.", "rendre le ciel plus bleu",
           "把猫变成狗", "add a 🙂 on the left", "  swap the square and the triangle  ", "x")


def _bounds(name: str, limits: Limits) -> tuple[float, float]:
    return {"seed": (0, SEED_MAX), "guidance_scale": (0.0, GUIDANCE_MAX), "num_inference_steps": (1, limits.max_steps),
            "rounds": (1, limits.max_rounds)}[name]


def _noise(rng: random.Random, side: Optional[int] = None) -> np.ndarray:
    side = side or rng.randint(8, 24)
    return np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (side, side, 3), dtype=np.uint8)


def encoded_image(rng: random.Random, fmt: str, side: Optional[int] = None) -> bytes:
    """A small random-noise image in `fmt` (a Pillow format name)."""
    buf = io.BytesIO()
    Image.fromarray(_noise(rng, side)).save(buf, format=fmt)
    return buf.getvalue()


def _b64(raw: bytes, rng: random.Random) -> str:
    text = base64.b64encode(raw).decode()
    return f"data:image/png;base64,{text}" if rng.random() < 0.3 else text


def base_fields(rng: random.Random, target: FuzzTarget) -> dict[str, Any]:
    """A request the service takes: an image, a prompt, and a random choice of the optional fields."""
    fields: dict[str, Any] = {"image": _b64(encoded_image(rng, rng.choice(("PNG", "JPEG", "WEBP"))), rng),
                              "prompt": rng.choice(PROMPTS)}
    optional = {"seed": lambda: rng.choice((0, 7, SEED_MAX, rng.randint(0, SEED_MAX))),
                "guidance_scale": lambda: rng.choice((0, 1, 4.0, 30, round(rng.uniform(0, 30), 3))),
                "num_inference_steps": lambda: rng.randint(1, min(4, target.limits.max_steps)),
                "negative_prompt": lambda: rng.choice((" ", "blurry", "", "é" * 50)),
                "rounds": lambda: rng.randint(1, target.limits.max_rounds)}
    if target.thinker:
        optional.update(think=lambda: rng.random() < 0.5, reflect=lambda: rng.random() < 0.5)
    else:
        optional.update(think=lambda: False, reflect=lambda: False)
    for name in rng.sample(sorted(optional), rng.randint(0, len(optional))):
        fields[name] = None if rng.random() < 0.1 else optional[name]()  # null: the default
    return fields


def _pairs(fields: dict[str, Any], ascii_only: bool) -> list[tuple[str, str]]:
    """(key JSON text, value JSON text) of each field."""
    return [(json.dumps(k, ensure_ascii=ascii_only), json.dumps(v, ensure_ascii=ascii_only)) for k, v in fields.items()]


def _set(pairs: list[tuple[str, str]], name: str, raw: str) -> list[tuple[str, str]]:
    """The pairs with `name`'s value replaced by raw JSON text (added when absent)."""
    key = json.dumps(name)
    out = [(k, raw if k == key else v) for k, v in pairs]
    return out if any(k == key for k, _ in pairs) else out + [(key, raw)]


def _drop(pairs: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in pairs if k != json.dumps(name)]


def json_text(pairs: list[tuple[str, str]], rng: random.Random) -> bytes:
    """An object of raw JSON pairs, in a random order and spacing."""
    pairs = list(pairs)
    rng.shuffle(pairs)
    colon, comma = rng.choice(((":", ","), (": ", ", "), (" : ", " ,\n ")))
    return ("{" + comma.join(f"{k}{colon}{v}" for k, v in pairs) + "}").encode("utf-8")


def field_shown(name: str) -> str:
    """A field name as docs/serve.md says an error shows it: surrogates escaped, cut to 64 characters."""
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name if len(name) <= 64 else name[:64] + "..."


def multipart(parts: Sequence[tuple[str, Optional[str], Optional[str], bytes]], boundary: str) -> bytes:
    """A multipart/form-data body of (name, filename, content type, data) parts."""
    out = []
    for name, filename, ctype, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        out.append(head.encode("utf-8") + b"\r\n" + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


def form_parts(fields: dict[str, Any], rng: random.Random, image: Optional[bytes] = None
               ) -> list[tuple[str, Optional[str], Optional[str], bytes]]:
    """The fields as form parts; the image as an uploaded file (`image` bytes, or the base64 field decoded)."""
    parts = []
    for name, value in fields.items():
        if name == "image":
            continue
        if value is None:
            continue  # a form cannot say null
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        parts.append((name, None, None, text.encode("utf-8")))
    raw = image if image is not None else base64.b64decode(fields["image"].split(",")[-1])
    parts.append((rng.choice(UPLOAD_FIELDS), rng.choice(("in.png", "a", "image.jpg")),
                  rng.choice(("image/png", "application/octet-stream", None)), raw))
    rng.shuffle(parts)
    return parts


# -- the cases ----------------------------------------------------------------------------------------------
class _Builder:
    """Makes one case's request around a base request; the kind functions below fill it in."""

    def __init__(self, index: int, kind: str, rng: random.Random, target: FuzzTarget):
        self.index, self.kind, self.rng, self.target = index, kind, rng, target
        self.fields = base_fields(rng, target)
        self.ascii_only = rng.random() < 0.5

    def auth(self) -> list[tuple[str, bytes]]:
        return [("authorization", f"Bearer {self.target.token}".encode())] if self.target.token else []

    def case(self, note: str, body: bytes, statuses: Sequence[int], field: Optional[str] = UNCHECKED, *,
             ctype: Optional[str] = "application/json", method: str = "POST", path: Optional[str] = None,
             headers: Optional[list[tuple[str, bytes]]] = None, transport: str = "http", declared: int = 0) -> Case:
        head = list(self.auth() if headers is None else headers)
        if ctype is not None:
            head.append(("content-type", ctype.encode("latin-1")))
        return Case(self.index, self.kind, note, method, path or self.rng.choice(("/edit", "/edit-upload")), head,
                    body, tuple(statuses), field, transport, declared)

    def json_case(self, note: str, pairs: list[tuple[str, str]], statuses: Sequence[int], field: Optional[str]) -> Case:
        return self.case(note, json_text(pairs, self.rng), statuses, field)

    def pairs(self) -> list[tuple[str, str]]:
        return _pairs(self.fields, self.ascii_only)

    def form_case(self, note: str, parts, statuses: Sequence[int], field: Optional[str]) -> Case:
        boundary = self.rng.choice(("xyz", "----fuzz" + "%08x" % self.rng.getrandbits(32), "a" * 70))
        return self.case(note, multipart(parts, boundary), statuses, field,
                         ctype=f"multipart/form-data; boundary={boundary}")

    def image_case(self, note: str, raw: bytes) -> Case:
        """Image bytes the service must refuse (422 naming the image), as base64 JSON or as an upload."""
        if self.rng.random() < 0.6:
            return self.json_case(note, _set(self.pairs(), "image", json.dumps(_b64(raw, self.rng))), [422], "image")
        return self.form_case(note + ", uploaded", form_parts(self.fields, self.rng, raw), [422], "image")


def _wrong_type(b: _Builder, name: str) -> Case:
    kind = FIELD_TYPES[name]
    choices = {"str": ["0", "1.5", "true", "false", "[]", '["x"]', "{}", '{"a": "b"}', "-1e5"],
               "int": ['"3"', '""', "true", "false", "1.5", "[1]", "{}", '"0x10"', "-0.5", "2.000001", '{"v": 1}'],
               "float": ['"4.0"', '""', "true", "false", "[4.0]", "{}", '"nan"', '{"v": 1}'],
               "bool": ["1", "0", '"true"', '"false"', '""', "[]", "{}", "1.0", '"yes"', "[true]"]}[kind]
    raw = b.rng.choice(choices)
    return b.json_case(f"{name} = {raw}", _set(b.pairs(), name, raw), [422], name)


def _out_of_range(b: _Builder, name: str) -> Case:
    lo, hi = _bounds(name, b.target.limits)
    if name == "guidance_scale":
        raw = b.rng.choice(["-0.001", "-1", "30.0001", "31", "1e308", "-1e308", str(b.rng.uniform(30.01, 1e6))])
    else:
        raw = str(b.rng.choice([lo - 1, -1, hi + 1, hi * 10 + 7, -(2 ** 63), 2 ** 64])) if b.rng.random() < 0.8 \
            else b.rng.choice(["1e19", "1e300", "-1e10"])
    return b.json_case(f"{name} = {raw}", _set(b.pairs(), name, raw), [422], name)


def _huge_integer(b: _Builder, name: str) -> Case:
    """An integer literal of 20 to 6000 digits: valid JSON, out of every range."""
    digits = b.rng.choice([20, 100, 309, 400, 4300, 4301, 6000])
    raw = b.rng.choice(("", "-")) + str(b.rng.randint(1, 9)) + "".join(b.rng.choices("0123456789", k=digits - 1))
    return b.json_case(f"{name} = a {digits}-digit integer", _set(b.pairs(), name, raw), [422], name)


def _non_finite(b: _Builder, name: str) -> Case:
    raw = b.rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400"])
    return b.json_case(f"{name} = {raw}", _set(b.pairs(), name, raw), [422], name)


SURROGATES = ("\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ude00\\ud83d", "\\ud83dx", "\\ud83d\\ud83d")


def _surrogate_text(rng: random.Random, text: str) -> str:
    """JSON string text of `text` with an unpaired surrogate escape between two of its characters."""
    at = rng.randint(0, len(text))
    return json.dumps(text[:at])[:-1] + rng.choice(SURROGATES) + json.dumps(text[at:])[1:]


def _surrogate(b: _Builder, name: str) -> Case:
    if name == "field name":
        key = _surrogate_text(b.rng, b.rng.choice(("x", "prompt", "", "seed_")))
        shown = field_shown(json.loads(key))
        return b.json_case(f"a field named {key}", b.pairs() + [(key, "1")], [422], shown)
    text = b.fields["image"] if name == "image" else b.fields.get(name) or b.rng.choice(PROMPTS)
    raw = _surrogate_text(b.rng, text)
    return b.json_case(f"{name} with {raw[:30]}...", _set(b.pairs(), name, raw), [422], name)


def _too_long(b: _Builder, name: str) -> Case:
    most = b.target.limits.max_prompt_chars
    length = b.rng.choice([most + 1, most + 2, 2 * most, 5 * most])
    text = "".join(b.rng.choices(("a", " ", "é", "中", "🙂"), k=length))
    raw = json.dumps(text, ensure_ascii=b.ascii_only)
    return b.json_case(f"{name} of {length} characters", _set(b.pairs(), name, raw), [422], name)


def _missing(b: _Builder, name: str) -> Case:
    if b.rng.random() < 0.5:
        return b.json_case(f"no {name}", _drop(b.pairs(), name), [422], name)
    raw = b.rng.choice(['""', '"   "', '"\\n\\t"']) if name == "prompt" else '""'
    return b.json_case(f"{name} = {raw}", _set(b.pairs(), name, raw), [422], name)


def _no_thinker(b: _Builder, name: str) -> Case:
    return b.json_case(f"{name} = true without a thinker", _set(b.pairs(), name, "true"), [422], name)


# none of EditThinker's field names (num_inference_step, width, enhance_prompt, ...): a server may take those
MISSPELLINGS = ("num_inference_stpes", "num-inference-steps", "guidance", "guidance-scale", "promt", "Prompt", "IMAGE",
                "image ", "seeds", "negativePrompt", "negative_promt", "round", "thinking", "reflection", "imge",
                "num_steps", "steps", "guidancescale", "image_file", "Seed")
UNKNOWN = ("foo", "", " ", "__proto__", "constructor", "model", "prompt\u0000", "🙂", "a.b", "$where",
           "ｐｒｏｍｐｔ", "n", "strength", "mask")


def _unknown_field(b: _Builder, misspelled: bool) -> Case:
    if misspelled:
        name = b.rng.choice(MISSPELLINGS)
    else:
        name = b.rng.choice(UNKNOWN + ("q" * b.rng.choice((65, 1000, 50_000)),))
    value = b.rng.choice(("1", '"x"', "null", "[]", "true"))
    pairs = b.pairs() + [(json.dumps(name, ensure_ascii=b.ascii_only), value)]
    return b.json_case(f"a field named {name[:40]!r}", pairs, [422], field_shown(name))


def _duplicate_key(b: _Builder) -> Case:
    pairs = b.pairs()
    if b.rng.random() < 0.2:
        name, value = "x-extra", "1"
        pairs.append((json.dumps(name), value))
    else:
        key, value = b.rng.choice(pairs)
        name = json.loads(key)
    # the same key again, perhaps written with an escape (a parser decodes both to the same name)
    spelled = json.dumps(name)
    if b.rng.random() < 0.3 and len(name) > 1:
        spelled = '"' + "\\u%04x" % ord(name[0]) + json.dumps(name)[2:]
    again = value if b.rng.random() < 0.5 else b.rng.choice(("1", '"other"', "null"))
    text = json_text(pairs, b.rng)[:-1] + f", {spelled}: {again}}}".encode()
    return b.case(f"{name!r} twice", text, [422], name)


def _too_many_fields(b: _Builder) -> Case:
    most = b.target.limits.max_fields
    n = b.rng.randint(most + 1, min(4 * most, b.target.limits.max_json_values // 2 - 20))
    if b.rng.random() < 0.5:
        pairs = b.pairs() + [(json.dumps(f"x{i}"), "0") for i in range(n)]
        return b.json_case(f"{n} more fields", pairs, [422], "body")
    parts = [(f"x{i}", None, None, b"0") for i in range(n)] + form_parts(b.fields, b.rng)
    return b.form_case(f"a form of {n} more fields", parts, [400], "body")  # docs: a form's is 400


def _too_deep(b: _Builder) -> Case:
    depth = b.rng.choice([b.target.limits.max_json_depth + 1, 100, 1000, 100_000,
                          min(400_000, b.target.max_body_bytes // 3)])
    # (opening, closing, levels each repeat adds, what sits innermost)
    open_, close, levels, inner = b.rng.choice((("[", "]", 1, ""), ('{"a":', "}", 1, "0"), ('[{"a":', "}]", 2, "0")))
    nest = -(-depth // levels)
    if len(open_) * nest > b.target.max_body_bytes // 3:
        open_, close, levels, inner = "[", "]", 1, ""
        nest = depth
    deep = open_ * nest + inner + close * nest
    if b.rng.random() < 0.2:
        return b.case(f"a body nested {depth} levels", deep.encode(), [400], "body")
    name = b.rng.choice(list(FIELD_TYPES) + ["extra"])
    return b.json_case(f"{name} nested {depth} levels", _set(b.pairs(), name, deep), [400], "body")


def _too_many_values(b: _Builder) -> Case:
    n = b.rng.choice([b.target.limits.max_json_values + 1, 5000, min(200_000, b.target.max_body_bytes // 8)])
    item = b.rng.choice(("0", "{}", "[]", '"a"', "null"))
    many = "[" + ",".join([item] * n) + "]"
    name = b.rng.choice(list(FIELD_TYPES) + ["extra"])
    if b.rng.random() < 0.2:
        return b.case(f"a body of {n} values", many.encode(), [400], "body")
    return b.json_case(f"{name} of {n} values", _set(b.pairs(), name, many), [400], "body")


def _not_json(b: _Builder) -> Case:
    good = json_text(b.pairs(), b.rng)
    variants = {
        "empty": b"", "blank": b"  \r\n", "an open brace": b"{", "a trailing comma": good[:-1] + b",}",
        "single quotes": b"{'prompt': 'x'}", "form text": b"prompt=x&image=y", "a comment": good + b" // hi",
        "two objects": good + b" {}", "cut short": good[:b.rng.randint(1, len(good) - 1)], "NUL": b"\x00" + good,
        "a BOM": "\ufeff".encode() + good, "bare words": b"{prompt: x}", "unquoted NaN key": b"{NaN: 1}",
        "an unclosed string": b'{"prompt": "make it', "garbage": bytes(b.rng.getrandbits(8) & 0x7F for _ in range(64)),
    }
    note = b.rng.choice(sorted(variants))
    return b.case(note, variants[note], [400], "body")


def _not_utf8(b: _Builder) -> Case:
    text = json_text(_set(b.pairs(), "prompt", json.dumps("café " + b.rng.choice(PROMPTS), ensure_ascii=False)), b.rng)
    variants = {"latin-1": text.decode("utf-8").encode("latin-1", "replace"), "utf-16": text.decode().encode("utf-16"),
                "a lone continuation byte": text[:-2] + b"\x80" + text[-2:],
                "an overlong slash": text[:-2] + b"\xc0\xaf" + text[-2:],
                "a CESU-8 surrogate": text[:-2] + b"\xed\xa0\x80" + text[-2:],
                "a cut multibyte character": text.replace("é".encode(), b"\xc3"),
                "0xff bytes": b"\xff\xfe" + text}
    note = b.rng.choice(sorted(variants))
    return b.case(note, variants[note], [400], "body")


def _not_an_object(b: _Builder) -> Case:
    good = json_text(b.pairs(), b.rng).decode()
    raw = b.rng.choice(("[]", '"x"', "1", "-0.5", "null", "true", "[" + good + "]", '"a request"', "[{}]"))
    return b.case(f"a body of {raw[:20]}", raw.encode(), [422], "body")  # valid JSON of the wrong type


def _content_type(b: _Builder) -> Case:
    ctype = b.rng.choice(("text/plain", "application/xml", "application/octet-stream", "image/png", "", "*/*",
                          "application/jsonx", "text/json", "application/json-patch+json",
                          "multipart/mixed; boundary=x", "application/x-ndjson", "text/html; charset=utf-8", "json",
                          ";", "application/ json"))
    return b.case(f"Content-Type {ctype!r}", json_text(b.pairs(), b.rng), [415], UNCHECKED, ctype=ctype)


def _bad_base64(b: _Builder) -> Case:
    raw = encoded_image(b.rng, "PNG")
    text = base64.b64encode(raw).decode()
    at = b.rng.randint(0, len(text) - 4)
    variants = {"a '!' inside": text[:at] + "!" + text[at:], "line breaks": text[:at] + "\n" + text[at:],
                "spaces": text[:at] + " " + text[at:],
                "url-safe alphabet": text.replace("+", "-").replace("/", "_") + "-_",
                "wrong padding": text[:-1] if text.endswith("=") else text + "A", "one character": "A",
                "a data URL without a comma": "data:image/png;base64" + text,
                "a data URL of garbage": "data:image/png;base64,%%%%",
                "non-ASCII letters": text[:at] + "é" + text[at:],
                "a padding in the middle": text[:8] + "=" + text[8:]}
    note = b.rng.choice(sorted(variants))
    value = variants[note]
    return b.json_case(note, _set(b.pairs(), "image", json.dumps(value, ensure_ascii=b.ascii_only)), [422], "image")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


def _not_an_image(b: _Builder) -> Case:
    variants = {"random bytes": bytes(b.rng.getrandbits(8) for _ in range(b.rng.randint(1, 4096))),
                "zeros": bytes(b.rng.randint(1, 2048)), "text": b"a picture of a cat",
                "HTML": b"<html><body><img src=x></body></html>", "a ZIP": b"PK\x03\x04" + bytes(60),
                "a PDF": b"%PDF-1.7\n1 0 obj << >> endobj\n", "JSON": b'{"image": "x"}', "one byte": b"\x89"}
    note = b.rng.choice(sorted(variants))
    return b.image_case(note, variants[note])


def _other_format(b: _Builder) -> Case:
    fmt = b.rng.choice(("GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "EPS", "EPS binary", "TIFF big-endian", "PSD",
                        "QOI", "SVG", "AVIF"))
    if fmt in ("GIF", "BMP", "TIFF", "ICO", "PPM", "TGA"):
        raw = encoded_image(b.rng, fmt)
    else:
        raw = {"EPS": EPS, "EPS binary": b"\xc5\xd0\xd3\xc6" + struct.pack("<II", 30, len(EPS)) + bytes(22) + EPS,
               "TIFF big-endian": b"MM\x00*\x00\x00\x00\x08" + bytes(64), "PSD": b"8BPS\x00\x01" + bytes(64),
               "QOI": b"qoif" + struct.pack(">II", 16, 16) + b"\x03\x00" + bytes(32),
               "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"/>',
               "AVIF": b"\x00\x00\x00\x1cftypavif" + bytes(64)}[fmt]
    return b.image_case(f"a {fmt} file", raw)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with next to no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG whose (baseline) frame header declares width x height, then a scan of junk."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    sos = b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + app0 + sof + sos + bytes(64) + b"\xff\xd9"


def webp_declaring(width: int, height: int, chunk: str) -> bytes:
    """A WebP whose first chunk (VP8, VP8L or VP8X) declares width x height."""
    if chunk == "VP8 ":
        data = b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width & 0x3FFF, height & 0x3FFF) + bytes(16)
    elif chunk == "VP8L":
        data = b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little") + bytes(16)
    else:
        data = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + chunk.encode() + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _too_many_pixels(b: _Builder) -> Case:
    limits, rng = b.target.limits, b.rng
    most_sides = {"PNG": 2 ** 31 - 1, "JPEG": 65535, "VP8 ": 16383, "VP8L": 16384, "VP8X": 2 ** 24}
    # the formats whose header can declare more than the limits allow
    able = [f for f, most in most_sides.items()
            if most > limits.max_side or limits.max_pixels < min(limits.max_side, most) ** 2] or ["PNG"]
    fmt = rng.choice(able)
    most_side = most_sides[fmt]
    over_side = limits.max_side < most_side
    over_area = limits.max_pixels < min(limits.max_side, most_side) ** 2
    if over_area and (not over_side or rng.random() < 0.5):  # every side within the limit, the area over it
        side = min(limits.max_side, most_side)
        width, height = side, rng.randint(limits.max_pixels // side + 1, side)
    else:
        width, height = rng.randint(limits.max_side + 1, most_side), rng.randint(1, most_side)
    if rng.random() < 0.5:
        width, height = height, width
    make = {"PNG": png_declaring, "JPEG": jpeg_declaring}.get(fmt) or (lambda w, h: webp_declaring(w, h, fmt))
    return b.image_case(f"a {fmt.strip()} declaring {width}x{height}", make(width, height))


def _zero_size(b: _Builder) -> Case:
    fmt = b.rng.choice(("PNG", "JPEG", "VP8 "))
    width, height = b.rng.choice(((0, 16), (16, 0), (0, 0)))
    make = {"PNG": png_declaring, "JPEG": jpeg_declaring}.get(fmt) or (lambda w, h: webp_declaring(w, h, "VP8 "))
    return b.image_case(f"a {fmt.strip()} declaring {width}x{height}", make(width, height))


def _truncated(b: _Builder) -> Case:
    fmt = b.rng.choice(("PNG", "JPEG", "WEBP"))
    raw = encoded_image(b.rng, fmt, side=32)
    cut = b.rng.randint(1, int(len(raw) * 0.6))  # never past the pixel data's middle, so it cannot decode
    return b.image_case(f"a {fmt} cut to {cut} of {len(raw)} bytes", raw[:cut])


def _broken_header(b: _Builder) -> Case:
    png, jpeg = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"
    variants = {"PNG without IHDR": png + b"\x00\x00\x00\x00IEND\xaeB`\x82" + bytes(16), "PNG magic alone": png,
                "JPEG without a marker": jpeg + b"\xff\x00" + bytes(32),
                "JPEG, segment of length 0": jpeg + b"\xff\xe0\x00\x00" + bytes(16),
                "JPEG, scan before frame": jpeg + b"\xff\xda\x00\x08" + bytes(32),
                "JPEG of 2000 empty segments": jpeg + b"\xff\xfe\x00\x02" * 2000 + bytes(8),
                "JPEG, segment past the end": jpeg + b"\xff\xe1\xff\xff" + bytes(16),
                "WebP of an unknown chunk": b"RIFF\x20\x00\x00\x00WEBPVP8Z" + bytes(24),
                "VP8L of a wrong signature": b"RIFF\x20\x00\x00\x00WEBPVP8L\x10\x00\x00\x00\x00" + bytes(24),
                "RIFF cut short": b"RIFF\x00\x00\x00\x00WEBP"}
    note = b.rng.choice(sorted(variants))
    return b.image_case(note, variants[note])


def _declared_over_limit(b: _Builder) -> Case:
    limit = b.target.max_body_bytes
    # at most 20 digits: h11 refuses a longer Content-Length before the app sees the request
    declared = b.rng.choice((limit + 1, limit + 4096, 2 * limit, 10 ** 12, 10 ** 19, 10 ** 20 - 1))
    ctype = b.rng.choice(("application/json", "multipart/form-data; boundary=xyz", "text/plain", None))
    start = json_text(b.pairs(), b.rng)[:b.rng.randint(0, 256)]
    return b.case(f"Content-Length {declared}, {len(start)} bytes sent", start, [413], "body", ctype=ctype,
                  transport="declared", declared=declared)


def _chunked_over_limit(b: _Builder) -> Case:
    what = b.rng.choice(("JSON", "a file part", "a text part"))
    ctype = "application/json" if what == "JSON" else "multipart/form-data; boundary=xyz"
    start = {"JSON": b'{"prompt": "',
             "a file part": b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n\r\n',
             "a text part": b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'}[what]
    return b.case(f"a chunked body of {what} past the limit", start, [413], "body", ctype=ctype, transport="chunked")


def _multipart_broken(b: _Builder) -> Case:
    parts = form_parts(b.fields, b.rng)
    good = multipart(parts, "xyz")
    variants = {
        "no boundary": (good, "multipart/form-data"), "an empty boundary": (good, "multipart/form-data; boundary="),
        "a part without a name": (b'--xyz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xyz--\r\n',
                                  "multipart/form-data; boundary=xyz"),
        "junk before the boundary line": (b"\x00junk" + good, "multipart/form-data; boundary=xyz"),
        "a bad part header line": (b"--xyz\r\nnot a header\r\n\r\nx\r\n--xyz--\r\n",
                                   "multipart/form-data; boundary=xyz"),
        "a boundary line without CRLF": (b"--xyzjunk\r\n" + good, "multipart/form-data; boundary=xyz"),
    }
    note = b.rng.choice(sorted(variants))
    body, ctype = variants[note]
    return b.case(note, body, [400], "body", ctype=ctype)


def _multipart_files(b: _Builder) -> Case:
    """File parts the docs do not take: a wrong name, two images, three files, an image twice."""
    raw = encoded_image(b.rng, "PNG")
    parts = [p for p in form_parts(b.fields, b.rng) if p[1] is None]  # the text fields
    which = b.rng.choice(("wrong name", "two files", "three files", "file and field"))
    if which == "wrong name":
        name = b.rng.choice(("file", "img", "upload", "images", "Image", "prompt"))
        return b.form_case(f"the image as file field {name!r}", parts + [(name, "in.png", "image/png", raw)],
                           [422], name)
    if which == "two files":
        first, second = b.rng.choice((("image", "image_file"), ("image_file", "image"), ("image", "image"),
                                      ("image_file", "image_file")))
        files = [(first, "a.png", "image/png", raw), (second, "b.png", "image/png", raw)]
        return b.form_case(f"files {first!r} and {second!r}", parts + files, [422], second)
    if which == "three files":
        files = [(b.rng.choice(UPLOAD_FIELDS), f"{i}.png", "image/png", raw) for i in range(3)]
        return b.form_case("three files", parts + files, [400], "body")  # docs: a form at most 2 files
    files = [("image", "a.png", "image/png", raw), ("image", None, None, b.fields["image"].encode())]
    b.rng.shuffle(files)
    return b.form_case("the image as a file and as a field", parts + files, [422], "image")


def _form_value(b: _Builder, urlencoded: bool) -> Case:
    """A form (multipart or urlencoded) whose one field is malformed, or given twice."""
    name = b.rng.choice(list(FIELD_TYPES.keys() - {"image"}))
    bad = {"str": ["", "   "], "int": ["abc", "1.5", "", "-1", "1e3", "0x10", "9" * 5000],
           "float": ["nan", "inf", "-inf", "abc", "", "31", "-1", "1e999"], "bool": ["maybe", "2", "", "on", "truee"]}
    kind = FIELD_TYPES[name]
    if kind == "str":  # an empty prompt, a negative prompt over the length limit
        value = b.rng.choice(bad["str"]) if name == "prompt" else "n" * (b.target.limits.max_prompt_chars + 1)
    elif name == "num_inference_steps" and b.rng.random() < 0.3:
        value = str(b.target.limits.max_steps + 1)
    elif name == "rounds" and b.rng.random() < 0.3:
        value = str(b.target.limits.max_rounds + 1)
    else:
        value = b.rng.choice(bad[kind])
    twice = b.rng.random() < 0.15
    fields = {k: v for k, v in b.fields.items() if k != name}
    if urlencoded:
        items = [(k, json.dumps(v) if isinstance(v, bool) else str(v)) for k, v in fields.items() if v is not None]
        items += [(name, value)] + ([(name, "1")] if twice else [])
        b.rng.shuffle(items)
        return b.case(f"urlencoded {name} = {value[:20]!r}" + (" twice" if twice else ""),
                      urllib.parse.urlencode(items).encode(), [422], name, ctype="application/x-www-form-urlencoded")
    parts = form_parts(fields, b.rng) + [(name, None, None, value.encode())]
    if twice:
        parts.append((name, None, None, b"1"))
    return b.form_case(f"form {name} = {value[:20]!r}" + (" twice" if twice else ""), parts, [422], name)


def _unknown_route(b: _Builder) -> Case:
    path = b.rng.choice(("/", "/nowhere", "/edit2", "/EDIT", "/edit-uploads", "/v1/edit", "/health/x", "/%2e%2e/etc",
                         "/edit%00", "/" + "a" * 2000, "/%C3%BC", "/docs/oauth2-redirect", "/status.json", "/.env"))
    method = b.rng.choice(("GET", "POST"))
    body = json_text(b.pairs(), b.rng) if method == "POST" else b""
    return b.case(f"{method} {path[:30]}", body, [404], "path", method=method, path=path)


def _wrong_method(b: _Builder) -> Case:
    method, path = b.rng.choice((("GET", "/edit"), ("PUT", "/edit"), ("DELETE", "/edit-upload"), ("PATCH", "/edit"),
                                 ("OPTIONS", "/edit"), ("POST", "/health"), ("PUT", "/status"), ("POST", "/docs"),
                                 ("DELETE", "/openapi.json"), ("BREW", "/edit"), ("TRACE", "/edit"),
                                 ("GET", "/edit-upload"), ("POST", "/redoc")))
    body = json_text(b.pairs(), b.rng) if method in ("PUT", "PATCH", "POST") else b""
    return b.case(f"{method} {path}", body, [405], "method", method=method, path=path)


def _auth(b: _Builder, missing: bool) -> Case:
    token = b.target.token or ""
    method, path = b.rng.choice([r for r in ROUTES if r[1] != "/health"])
    if missing:
        headers, note = [], "no Authorization"
    else:
        # (no trailing space: h11 will not send one, and HTTP drops it anyway)
        wrong = [f"Basic {token}", f"Token {token}", "Bearer", f"Bearer {token}x", f"Bearer {token[:-1]}",
                 f"Bearer {token.swapcase()}", f"Bearer{token}", token, "Bearer " + "t" * 8000,
                 f"Bearer {token}\u00e9", "Bearer \u00ff" + token]
        value = b.rng.choice([v for v in wrong if v != f"Bearer {token}"])
        headers, note = [("authorization", value.encode("latin-1"))], f"Authorization {value[:30]!r}"
    body = json_text(b.pairs(), b.rng) if method == "POST" else b""
    return b.case(note + f" on {method} {path}", body, [401 if missing else 403], "authorization",
                  method=method, path=path, headers=headers, ctype="application/json" if method == "POST" else None)


KindFn = Callable[[_Builder], Case]


def kinds(target: FuzzTarget) -> list[tuple[str, KindFn]]:
    """Every kind of malformed request the target can be sent, in a fixed order."""
    out: list[tuple[str, KindFn]] = []
    for name in FIELD_TYPES:
        out.append((f"{name}/wrong-type", lambda b, n=name: _wrong_type(b, n)))
    for name in NUMERIC_FIELDS:
        out += [(f"{name}/out-of-range", lambda b, n=name: _out_of_range(b, n)),
                (f"{name}/huge-integer", lambda b, n=name: _huge_integer(b, n)),
                (f"{name}/non-finite", lambda b, n=name: _non_finite(b, n))]
    for name in ("image", "prompt", "negative_prompt", "field name"):
        out.append((f"{name.replace(' ', '-')}/unpaired-surrogate", lambda b, n=name: _surrogate(b, n)))
    for name in TEXT_FIELDS:
        out.append((f"{name}/too-long", lambda b, n=name: _too_long(b, n)))
    for name in ("image", "prompt"):
        out.append((f"{name}/missing-or-empty", lambda b, n=name: _missing(b, n)))
    if not target.thinker:
        out += [("think/no-thinker", lambda b: _no_thinker(b, "think")),
                ("reflect/no-thinker", lambda b: _no_thinker(b, "reflect"))]
    out += [("image/bad-base64", _bad_base64), ("image/not-an-image", _not_an_image),
            ("image/other-format", _other_format), ("image/too-many-pixels", _too_many_pixels),
            ("image/zero-size", _zero_size), ("image/truncated", _truncated), ("image/broken-header", _broken_header),
            ("body/unknown-field", lambda b: _unknown_field(b, False)),
            ("body/misspelled-field", lambda b: _unknown_field(b, True)), ("body/duplicate-key", _duplicate_key),
            ("body/too-many-fields", _too_many_fields), ("body/too-deep", _too_deep),
            ("body/too-many-values", _too_many_values), ("body/not-json", _not_json), ("body/not-utf8", _not_utf8),
            ("body/not-an-object", _not_an_object), ("body/content-type", _content_type),
            ("body/declared-over-limit", _declared_over_limit), ("body/chunked-over-limit", _chunked_over_limit),
            ("multipart/malformed", _multipart_broken), ("multipart/files", _multipart_files),
            ("multipart/bad-value", lambda b: _form_value(b, False)),
            ("urlencoded/bad-value", lambda b: _form_value(b, True)),
            ("route/unknown", _unknown_route), ("route/wrong-method", _wrong_method)]
    if target.token:
        out += [("auth/missing", lambda b: _auth(b, True)), ("auth/wrong", lambda b: _auth(b, False))]
    return out


def make_case(seed: int, index: int, target: FuzzTarget = FuzzTarget()) -> Case:
    """Case `index` of the run `seed`: a pure function of the two (and the target). The kinds take turns, in an
    order the seed shuffles, so any run of at least `len(kinds(target))` cases holds every kind."""
    table = kinds(target)
    order = list(range(len(table)))
    random.Random(f"reasonedit-fuzz-order:{seed}").shuffle(order)
    kind, build = table[order[index % len(table)]]
    rng = random.Random(f"reasonedit-fuzz:{seed}:{index}")
    return build(_Builder(index, kind, rng, target))


# -- sending ------------------------------------------------------------------------------------------------
def _read_answer(sock: socket.socket) -> Answer:
    """An HTTP/1.1 answer from a socket (its body by Content-Length, or up to the close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            return Answer(None, error=f"the connection closed after {len(data)} bytes of the answer")
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return Answer(int(lines[0].split()[1]), headers.get("content-type", ""), body[:length] if length >= 0 else body)


def _send_raw(host: str, port: int, case: Case, limit: int, timeout: float) -> Answer:
    head = f"{case.method} {case.path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    head += b"".join(k.encode() + b": " + v + b"\r\n" for k, v in case.headers)
    if case.transport == "declared":
        head += f"Content-Length: {case.declared}\r\n".encode()
    else:
        head += b"Transfer-Encoding: chunked\r\n"
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(head + b"\r\n" + (case.body if case.transport == "declared" else b""))
            if case.transport == "chunked":  # until the server answers, or well past the limit
                sent, piece = 0, b"A" * 65536
                while sent < limit + 8 * len(piece) and not select.select([sock], [], [], 0)[0]:
                    data = case.body + piece if sent == 0 else piece
                    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                    sent += len(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: read what it said
        try:
            return _read_answer(sock)
        except (socket.timeout, TimeoutError):
            return Answer(None, error=f"no answer within {timeout:g}s")
        except (OSError, ValueError, IndexError) as e:  # a reset, or an answer that is not HTTP
            return Answer(None, error=f"{type(e).__name__}: {e}")


def send(client: httpx.Client, url: str, case: Case, target: FuzzTarget, timeout: float) -> Answer:
    """Send one case and read its answer; a timeout or a reset is an Answer without a status."""
    if case.transport != "http":
        host, port = urllib.parse.urlsplit(url)[1].rsplit(":", 1)
        return _send_raw(host, int(port), case, target.max_body_bytes, timeout)
    try:
        # the path goes as it is (percent escapes and all): httpx.URL would normalise it
        request = client.build_request(case.method, url, content=case.body, headers=case.headers, timeout=timeout)
        request.url = request.url.copy_with(raw_path=case.path.encode())
        answer = client.send(request)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        return Answer(None, error=f"{type(e).__name__}: {e}")
    return Answer(answer.status_code, answer.headers.get("content-type", ""), answer.content)


def judge(case: Case, answer: Answer) -> tuple[Optional[str], Optional[str]]:
    """(failure, mismatch) of an answer against what the docs promise the case; None for each that holds."""
    if answer.status is None:
        return f"no answer ({answer.error})", None
    try:
        doc = json.loads(answer.body)
    except ValueError:
        doc = None
    if not answer.content_type.startswith("application/json") or not isinstance(doc, dict):
        return f"not JSON ({answer.content_type or 'no content type'})", None
    if answer.status >= 500:
        return f"a {answer.status}", None
    if not 400 <= answer.status < 500:
        return f"not a 4xx: {answer.status}", None
    if doc.get("success") is not False or not isinstance(doc.get("error"), str) or "field" not in doc:
        return "not the error format ({success: false, error, field})", None
    if answer.status not in case.statuses:
        return None, f"status {answer.status}, the docs say {'/'.join(map(str, case.statuses))}"
    if case.field != UNCHECKED and doc["field"] != case.field:
        return None, f"field {doc['field']!r}, the docs say {case.field!r}"
    return None, None


def probe_health(client: httpx.Client, url: str, timeout: float) -> tuple[float, Optional[str]]:
    """Seconds /health took to answer, and what was wrong (no answer, not JSON) or None. Any status counts:
    a busy server may answer 503 with its load."""
    started = time.perf_counter()
    try:
        answer = client.get(url + "/health", timeout=timeout)
        seconds = time.perf_counter() - started
        answer.json()
    except (httpx.HTTPError, ValueError) as e:
        return time.perf_counter() - started, f"/health: {type(e).__name__}: {e}"
    return seconds, None


def run_fuzz(url: str, n: int, seed: int = 0, target: FuzzTarget = FuzzTarget(), *, start: int = 0, burst: int = 100,
             concurrency: int = 4, timeout: float = 10.0, max_seconds: Optional[float] = None) -> FuzzReport:
    """Send cases start..start+n of run `seed` to `url` in bursts of `burst` (`concurrency` at a time), with a
    /health probe before the first burst and after each; stop starting bursts after `max_seconds`."""
    report = FuzzReport(seed)
    started = time.perf_counter()
    with httpx.Client(trust_env=False, timeout=timeout) as client, ThreadPoolExecutor(concurrency) as pool:
        def probe() -> None:
            seconds, wrong = probe_health(client, url, timeout)
            report.health_seconds.append(seconds)
            if wrong:
                report.health_failures.append(f"after {report.cases} cases: {wrong}")

        def one(index: int) -> tuple[Case, Answer]:
            case = make_case(seed, index, target)
            return case, send(client, url, case, target, timeout)

        probe()
        for first in range(start, start + n, burst):
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                report.stopped_early = True
                break
            for case, answer in pool.map(one, range(first, min(first + burst, start + n))):
                report.cases += 1
                report.by_kind[case.kind] += 1
                report.by_status[answer.status if answer.status is not None else "none"] += 1
                failure, mismatch = judge(case, answer)
                if failure:
                    report.failures.append(Problem(case, failure, answer))
                elif mismatch:
                    report.mismatches.append(Problem(case, mismatch, answer))
            probe()
    report.wall_seconds = time.perf_counter() - started
    return report


# -- a `reasonedit serve` process ---------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """A process's resident set size (VmRSS in /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_process(*args: str, env: Optional[dict[str, Optional[str]]] = None, start_timeout: float = 120.0
                  ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m reasonedit serve ARGS --port P` on loopback, run from this package's checkout with the
    environment plus `env` (a None value unsets a variable); yields (url, process) once /health answers and
    terminates it on exit."""
    port = free_port()
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    log_file = tempfile.TemporaryFile()  # not a pipe: a server that logs much must never block on it
    proc = subprocess.Popen([sys.executable, "-m", "reasonedit", "serve", *args, "--host", "127.0.0.1",
                             "--port", str(port)], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=log_file, env=environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"reasonedit serve exited {proc.returncode}: {log_file.read().decode()[-2000:]}")
            try:
                httpx.get(url + "/health", timeout=5, trust_env=False).json()
                break
            except (httpx.HTTPError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reasonedit serve did not answer /health within {start_timeout:g}s") from None
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


@dataclass
class ProcessRun:
    """A fuzz run against a `reasonedit serve` process, and its resident memory before and after."""

    report: FuzzReport
    warmup: FuzzReport
    rss_before: int  # bytes, after the warm-up
    rss_after: int

    @property
    def rss_ratio(self) -> float:
        return self.rss_after / self.rss_before


def fuzz_serve_process(n: int, seed: int = 0, *, warmup: int = 500, token: Optional[str] = None,
                       serve_args: Sequence[str] = ("--editor", "shapes"), **run_kw: Any) -> ProcessRun:
    """Start `reasonedit serve SERVE_ARGS` (with a token from the environment, or --no-auth), send it `warmup`
    cases, read its RSS, send it `n` more cases of the same run, and read its RSS again. The warm-up comes first
    so that what the first requests of each kind allocate for good (imports, caches, the thread pool, the
    allocator's arenas settling) is not counted as growth: what is left to see is memory kept after the
    requests that needed it are answered."""
    args = list(serve_args) + ([] if token else ["--no-auth"])
    target = FuzzTarget(token=token)  # the command's defaults: 64 MiB bodies, the default limits, no thinker
    with serve_process(*args, env={"REASONEDIT_SERVE_TOKEN": token}) as (url, proc):  # None: unset
        first = run_fuzz(url, warmup, seed, target, **run_kw)
        before = rss_bytes(proc.pid)
        report = run_fuzz(url, n, seed, target, start=warmup, **run_kw)
        after = rss_bytes(proc.pid)
    return ProcessRun(report, first, before, after)


__all__ = ["Answer", "Case", "FuzzReport", "FuzzTarget", "Problem", "ProcessRun", "UNCHECKED", "base_fields",
           "encoded_image", "field_shown", "form_parts", "free_port", "fuzz_serve_process",
           "jpeg_declaring", "judge", "kinds", "make_case", "multipart", "png_declaring", "probe_health", "rss_bytes",
           "run_fuzz", "send", "serve_process", "webp_declaring"]
