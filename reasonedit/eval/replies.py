"""Reading a judge's reply: one parser per reply format, tolerant of layout, never guessing.

Each parser finds the scores by what its format calls them: VIEScore's "score" list (`score_list`), a field named
as the metric (`score_fields`), labelled "<criterion>: <n>" lines (`score_lines`), a "Final Score: <n>" line
(`final_score`). Layout is forgiven: code fences, prose around the scores, markdown bold, headings and list marks,
Windows line endings, full-width (Chinese) punctuation and digits, numbered lines, "4/5" or "4 out of 5" when the
top matches the query's scale, and the not-quite-JSON that the official KRIS templates ask for (the reasoning left
unquoted, a trailing comma). What is never done: taking a number from anywhere else in the text, truncating 3.5 to 3,
clamping or mapping an out-of-range value, or making one up. A reply that does not hold exactly the asked scores,
in range, raises `JudgeReplyError`, and its sample is reported as failed.

`tests/data/judge_reply_corpora.json` holds reply variants for every parser with what the official scripts extract
from each and what we do; the few where they differ (mostly where the official scripts guess) are listed there.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Protocol


class JudgeQuery(Protocol):
    """What a parser reads of `benchmark.JudgeQuery` (which imports this module, so it is not imported here)."""

    name: str
    metrics: tuple[str, ...]
    reply_format: str
    scale: tuple[float, float]
    integers: bool


class JudgeReplyError(ValueError):
    """A judge reply that cannot be read as the scores the query asked for."""


# full-width forms (U+FF01-U+FF5E: "：", "，", "［", "５", ...) as ASCII, the ideographic space as a space,
# curly double quotes as straight ones; zero-width marks and the byte-order mark dropped
_WIDE = {**{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}, 0x3000: " ", 0x201C: '"', 0x201D: '"', 0x201E: '"'}
_INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\u200c\u200d"))
VIESCORE_DELIMITER = "||V^=^V||"


def _lines(text: str) -> str:
    """The reply with Windows and old Mac line endings as "\\n" and invisible marks dropped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)


def _plain(text: str) -> str:
    """`_lines`, with full-width punctuation and digits and curly quotes as ASCII (not for JSON strings: a curly
    quote inside one would end it)."""
    return _lines(text).translate(_WIDE)


def _number_pattern(space: str = r"\s") -> str:
    """A score: an integer or decimal, then optionally "/ N" or "out of N" naming the top of its scale."""
    return (rf"(?P<value>-?\d+(?:\.\d+)?)(?:{space}*(?:/|out{space}+of){space}*(?P<top>\d+(?:\.\d+)?))?"
            rf"(?![\d.]*\d)")


def _value(number: str, top: str | None, what: str, query: "JudgeQuery") -> float:
    """A score as written; "n/top" only when top is the top of the query's scale (4/10 on a 1-5 scale is refused)."""
    if top is not None and float(top) != query.scale[1]:
        lo, hi = query.scale
        raise JudgeReplyError(f"{what} is {number}/{top}, not a score on the {lo:g}-{hi:g} scale")
    return float(number)


def _number(value: Any, what: str, query: "JudgeQuery") -> float:
    """A JSON value that is a number, or a string holding one (such as "4" or "4/5")."""
    if isinstance(value, bool):
        raise JudgeReplyError(f"{what} is {value!r}, not a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise JudgeReplyError(f"{what} is {value!r}, not a finite number")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"[\s*\"']*" + _number_pattern() + r"[\s*\"']*", value.translate(_WIDE))
        if m:
            return _value(m["value"], m["top"], what, query)
    raise JudgeReplyError(f"{what} is {value!r}, not a number")


def _one(found: list[tuple[str, str | None]], what: str) -> tuple[str, str | None]:
    """The single value a reply gives for something, however often it repeats it; a conflict is an error."""
    if len({(float(v), t) for v, t in found}) > 1:
        raise JudgeReplyError(f"the reply gives more than one {what} ({', '.join(v for v, _ in found)})")
    return found[0]


# -- JSON, as judges write it ------------------------------------------------------------------------------------
def _fenced(text: str) -> list[str]:
    """The insides of the ``` code fences of a reply (language tag dropped), then the whole reply."""
    parts = text.split("```")
    blocks = [re.sub(r"^[ \t]*[A-Za-z]*[ \t]*\n", "", parts[i]) for i in range(1, len(parts) - 1, 2)]
    return [b for b in blocks if "{" in b] + [text]


def _near_json(raw: str) -> str:
    """Common near-JSON made JSON: full-width punctuation and curly quotes, a comma before a closing bracket."""
    return re.sub(r",(\s*[}\]])", r"\1", raw.translate(_WIDE))


def json_object(text: str) -> dict | None:
    """The JSON object in a reply (in a code fence or amid prose: its first "{" to its last "}"), control characters
    inside strings allowed; None when there is none that parses, even once made JSON by `_near_json`."""
    for body in _fenced(_lines(text)):
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end < start:
            continue
        raw = body[start:end + 1]
        for attempt in (raw, _near_json(raw)):
            try:
                doc = json.loads(attempt, strict=False)
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return None


def _name(name: str) -> str:
    """A metric name as a whole word, "_" or a space between its parts, any case (consistency_score,
    Consistency Score)."""
    return r"(?<![A-Za-z0-9_])" + r"[_ ]".join(map(re.escape, name.split("_"))) + r"(?![A-Za-z0-9_])"


def labelled_values(text: str, name: str) -> list[tuple[str, str | None]]:
    """Every number written right after `name` and ":" or "=" (quotes, bold and spaces around allowed), as
    (value, top of scale or None)."""
    pattern = _name(name) + r"[\"'*]*[ \t]*[:=][ \t]*[\"'*]*[ \t]*" + _number_pattern(r"[ \t]")
    return [(m["value"], m["top"]) for m in re.finditer(pattern, _plain(text), re.IGNORECASE)]


# -- the parsers --------------------------------------------------------------------------------------------------
def parse_score_list(query: "JudgeQuery", text: str) -> list[float]:
    """VIEScore's format: a JSON object whose "score" is a list with one number per metric, between optional
    ||V^=^V|| delimiters; a "score": [...] that is not in valid JSON, or a reply that is only such a list, too."""
    body = _lines(text)
    if body.count(VIESCORE_DELIMITER) == 2:
        body = body.split(VIESCORE_DELIMITER)[1]
    doc = json_object(body)
    if doc is not None:
        if "score" not in doc:
            raise JudgeReplyError('the reply has no "score" field')
        raw = doc["score"] if isinstance(doc["score"], list) else [doc["score"]]
    else:
        plain = _plain(body)
        lists = re.findall(r"(?<![A-Za-z0-9_])[\"']?score[\"']?[ \t]*[:=][ \t]*\[([^\[\]]*)\]", plain, re.IGNORECASE)
        if not lists:
            bare = re.fullmatch(r"[\s`]*\[([^\[\]]*)\][\s`]*", plain)
            if bare is None:
                raise JudgeReplyError('no JSON object with a "score" list in the reply')
            lists = [bare.group(1)]
        if len({re.sub(r"\s", "", s) for s in lists}) > 1:
            raise JudgeReplyError(f'the reply gives more than one "score" list ({"; ".join(lists)})')
        raw = [item for item in lists[0].split(",")] if lists[0].strip() else []
    if len(raw) != len(query.metrics):
        raise JudgeReplyError(f'"score" has {len(raw)} value(s); {query.name} asks for {len(query.metrics)}')
    return [_number(v, f'"score"[{i}]', query) for i, v in enumerate(raw)]


def parse_score_fields(query: "JudgeQuery", text: str) -> list[float]:
    """A JSON object with one numeric field per metric, named as the metric. When the object is not JSON (the
    official KRIS templates leave the reasoning unquoted and may end on a comma) each field is read by its name."""
    doc = json_object(text)
    out = []
    for m in query.metrics:
        if doc is not None and m in doc:
            out.append(_number(doc[m], f'"{m}"', query))
            continue
        found = labelled_values(text, m)
        if not found:
            raise JudgeReplyError(f'the reply has no "{m}" field')
        value, top = _one(found, f'"{m}"')
        out.append(_value(value, top, f'"{m}"', query))
    return out


_SCORE_LINE = re.compile(
    r"^[ \t>*#-]*(?:\(?\d{1,2}[.)][ \t]+)?[*_]*(?P<label>[^:\n]*?[^:\n*_ \t])[*_]*[ \t]*:[ \t]*[*_]*[ \t]*"
    + _number_pattern(r"[ \t]") + r"[ \t]*[*_]*[ \t]*\.?[ \t]*$", re.MULTILINE)


def parse_score_lines(query: "JudgeQuery", text: str) -> list[float]:
    """Lines "<criterion>: <number>" (ImgEdit's format): exactly one per metric, taken in reply order. A line may be
    numbered, bulleted or bold."""
    hits = [m for m in _SCORE_LINE.finditer(_plain(text)) if re.search(r"[^\W\d_]", m["label"])]
    if len(hits) != len(query.metrics):
        found = ", ".join(f"{m['label'].strip()}: {m['value']}" for m in hits) or "none"
        raise JudgeReplyError(f'expected {len(query.metrics)} lines "<criterion>: <number>", '
                              f'found {len(hits)} ({found})')
    return [_value(m["value"], m["top"], m["label"].strip(), query) for m in hits]


_FINAL = re.compile(r"final[ \t]*scores?(?:[ \t]*\([^()\n]*\))?(?P<sep>[\s*_:=#]*)" + _number_pattern(r"[ \t]")
                    + r"(?P<rest>[^\n]*)", re.IGNORECASE)


def parse_final_score(query: "JudgeQuery", text: str) -> list[float]:
    """A "Final Score: N" (or "Final Scores") line, RISEBench's format, markdown bold anywhere around it; one metric
    per query. A range echoed from the prompt ("1-5") is not a score; the number may sit alone on the next line."""
    if len(query.metrics) != 1:
        raise ValueError(f"{query.name}: reply_format final_score yields one metric, not {len(query.metrics)}")
    found = []
    for m in _FINAL.finditer(_plain(text)):
        rest = m["rest"]
        if re.match(r"[ \t*]*[-\u2013~][ \t*]*\d", rest):
            continue  # "1-5": the prompt's range, echoed
        if "\n" in m["sep"] and not re.fullmatch(r"[ \t*_.]*", rest):
            continue  # a number that opens the next line of prose or a list ("1. The ..."), not the score
        if re.match(r"[ \t*]*[,;][ \t*]*\d", rest):
            raise JudgeReplyError(f'the reply gives several numbers after "Final Score" ({m.group(0).strip()})')
        found.append((m["value"], m["top"]))
    if not found:
        raise JudgeReplyError('the reply has no "Final Score: <number>" line')
    value, top = _one(found, "final score")
    return [_value(value, top, "the final score", query)]


REPLY_PARSERS: dict[str, Callable[["JudgeQuery", str], list[float]]] = {
    "score_list": parse_score_list,
    "score_fields": parse_score_fields,
    "score_lines": parse_score_lines,
    "final_score": parse_final_score,
}


def parse_reply(query: "JudgeQuery", text: str) -> dict[str, float]:
    """The named scores in a judge reply; JudgeReplyError when the reply does not hold exactly them, in range (and
    whole numbers where the query asks for them)."""
    if not isinstance(text, str) or not text.strip():
        raise JudgeReplyError(f"{query.name}: the reply is empty")
    try:
        parser = REPLY_PARSERS[query.reply_format]
    except KeyError:
        raise ValueError(f"{query.name}: unknown reply_format {query.reply_format!r}; "
                         f"known: {sorted(REPLY_PARSERS)}") from None
    try:
        values = parser(query, text)
    except JudgeReplyError as e:
        raise JudgeReplyError(f"{query.name}: {e}") from None
    lo, hi = query.scale
    for m, v in zip(query.metrics, values):
        if not lo <= v <= hi:
            raise JudgeReplyError(f"{query.name}: {m} = {v:g} is outside the scale [{lo:g}, {hi:g}]")
        if query.integers and v != int(v):
            raise JudgeReplyError(f"{query.name}: {m} = {v:g} is not one of the whole numbers {lo:g}-{hi:g} asked for")
    return dict(zip(query.metrics, values))


__all__ = ["JudgeReplyError", "REPLY_PARSERS", "VIESCORE_DELIMITER", "json_object", "labelled_values",
           "parse_final_score", "parse_reply", "parse_score_fields", "parse_score_lines", "parse_score_list"]
