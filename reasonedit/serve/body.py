"""A request's body, read within bounds: its size while it streams in (a chunked body declares no length to
check up front), and for JSON its nesting depth and its number of values, checked before it is parsed."""

from __future__ import annotations

import json
import re
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.types import Message

from reasonedit.serve.schema import Limits, RequestError

# what opens, closes or separates JSON values, and what starts a string (whose inside is skipped)
_JSON_STRUCTURE = re.compile(r'[\[\]{},"]')


def limit_body(request: Request, max_bytes: int) -> Request:
    """The same request, whose body reading raises a 413 `RequestError` once more than `max_bytes` have come
    in (at once when its Content-Length says more): a chunked body is cut off there, not read first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):  # int() refuses 4300+ digits
        raise RequestError("body", f"{declared[:20]} bytes is over the {max_bytes}-byte limit", 413)
    receive, received = request.receive, 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise RequestError("body", f"over the {max_bytes}-byte limit (cut off as it came in)", 413)
        return message

    return _LimitedRequest(request.scope, counted)


class _LimitedRequest(Request):
    """A request whose body, when reading it fails (cut off at the limit, the client gone), is let go at once.
    The failure's traceback holds this frame, and a caller may keep the traceback in a reference cycle (an
    exception stored on the asyncio task that raised it is one) until the cyclic GC runs: without this, each
    refused body would stay in memory, up to the limit, until then."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            chunks: list[bytes] = []
            try:
                async with aclosing(self.stream()) as stream:
                    async for chunk in stream:
                        chunks.append(chunk)
            except BaseException:
                chunks.clear()
                raise
            self._body = b"".join(chunks)
        return self._body


def parse_json_object(raw: bytes, limits: Limits) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes, refused (400, naming the body) before parsing when it nests deeper
    than `limits.max_json_depth` or holds more than `limits.max_json_values` values."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("body", f"not UTF-8 (byte {e.start}); send JSON as UTF-8", 400) from None
    _check_shape(text, limits)
    try:
        body = json.loads(text, object_pairs_hook=_object_once, parse_int=_json_int)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError("body", f"not valid JSON ({e})", 400) from None
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object of fields, got {type(body).__name__}")
    return body


def _check_shape(text: str, limits: Limits) -> None:
    """Depth and value count of JSON text, in one pass that skips over strings at memchr speed."""
    # drop escaped backslashes, then escaped quotes: every '"' left starts or ends a string. (Outside a string
    # a backslash is a syntax error the parser stops at, so what this changes there is never parsed.)
    text = text.replace("\\\\", "").replace('\\"', "")
    depth = values = pos = 0
    while (token := _JSON_STRUCTURE.search(text, pos)) is not None:
        char, pos = token.group(), token.end()
        if char == '"':
            pos = text.find('"', pos) + 1
            if pos == 0:
                raise RequestError("body", "not valid JSON (a string that never ends)", 400)
        elif char in "[{":
            depth, values = depth + 1, values + 1
            if depth > limits.max_json_depth:
                raise RequestError("body", f"nested deeper than {limits.max_json_depth} levels", 400)
        elif char in "]}":
            depth -= 1
        else:
            values += 1
        if values > limits.max_json_values:
            raise RequestError("body", f"holds more than {limits.max_json_values} JSON values; a request is one "
                                       f"object of at most {limits.max_fields} fields", 400)


def _json_int(literal: str) -> int | float:
    """An integer literal. One too long for int() (over 4300 digits) is past every range: it is read as the
    infinity of its sign, as 1e999 is, so that the field holding it is refused by name rather than the body."""
    try:
        return int(literal)
    except ValueError:
        return float(literal)


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: parsers disagree on which of two values counts."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise RequestError(key, "given more than once")
        obj[key] = value
    return obj


__all__ = ["limit_body", "parse_json_object"]
