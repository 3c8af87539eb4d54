"""EditThinker's reflection contract: the reply `<think>..</think><score>{..}</score><answer>..</answer>`, our
wording of the prompt that asks for it, the loader of a user's own prompt file (EditThinker's
`inference/prompt_template.txt`, which EditThinker-8B was trained on), and two readers of a reply: ours
(`parse_editthinker`, strict) and one that reads it as EditThinker's client does (`read_as_client`), for the
editthinker loop."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from reasonedit.models.prompts import ThinkerReplyError


# Our wording of EditThinker's reflection contract (its model was trained on its own prompt file, which
# `prompt_template=` loads as is). Placeholders as EditThinker's: {original_instruction}, {rewritten_prompt}.
EDITTHINKER_TEMPLATE = """You see two images: first the original image, then the image edited from it.
The user asked: "{original_instruction}"
The edit was made with this instruction: "{rewritten_prompt}"

Judge the edited image on two 0-10 scales:
- semantic: does it do what the user asked, while leaving everything else unchanged?
- quality: does it look natural, without artifacts?
If the edit is not good enough, write a better instruction for editing the original image; if it is good
enough, repeat the instruction that was used.

Reply in exactly this form:
<think>your analysis</think>
<score>{"semantic": S, "quality": Q}</score>
<answer>the instruction</answer>"""

CONTRACTS = ("reasonedit", "editthinker")
PLACEHOLDERS = ("{original_instruction}", "{rewritten_prompt}")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_SCORE_RE = re.compile(r"<score>(.*?)</score>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class EditThinkerVerdict:
    thought: str
    semantic: float
    quality: float
    answer: str


def parse_editthinker(text: str) -> EditThinkerVerdict:
    """Read `<think>..</think><score>{"semantic": s, "quality": q}</score><answer>..</answer>`; ThinkerReplyError
    (naming the part) when a part is missing, repeated or out of range."""
    parts = {}
    for name, pattern in (("think", _THINK_RE), ("score", _SCORE_RE), ("answer", _ANSWER_RE)):
        found = pattern.findall(text)
        if len(found) != 1:
            raise ThinkerReplyError(f"expected one <{name}>...</{name}>, found {len(found)} in {text[:80]!r}")
        parts[name] = found[0].strip()
    try:
        scores = json.loads(parts["score"])
    except ValueError:
        raise ThinkerReplyError(f"<score> is not JSON: {parts['score'][:80]!r}") from None
    if not isinstance(scores, dict):
        raise ThinkerReplyError(f"<score> is not a JSON object: {parts['score'][:80]!r}")
    values = {}
    for key in ("semantic", "quality"):
        v = scores.get(key)
        if isinstance(v, list) and len(v) == 1:  # some models echo the template's [0-10] brackets
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:
            raise ThinkerReplyError(f"<score> {key} must be a number in 0-10, got {v!r}")
        values[key] = float(v)
    if not parts["answer"]:
        raise ThinkerReplyError("<answer> is empty")
    return EditThinkerVerdict(parts["think"], values["semantic"], values["quality"], parts["answer"])


def load_prompt_template(path: str | Path, option: str = "prompt_template") -> str:
    """The prompt file at `path` as EditThinker's client sends it: the text stripped, then its `<image>` markers
    dropped (the images go as parts before it). An error naming `option` and the file when it is missing
    (FileNotFoundError), unreadable, not UTF-8, empty or lacks a placeholder (ValueError)."""
    path = Path(path)
    where = f"{option} {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    text = text.strip().replace("<image>", "")
    if not text.strip():
        raise ValueError(f"{where}: holds no prompt text")
    check_template(text, where)
    return text


def check_template(text: str, where: str = "prompt_template") -> None:
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"{where}: missing the placeholder{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         "that the editthinker contract fills in")


@dataclass
class ClientReading:
    """A reply read as EditThinker's client reads it. `semantic`/`quality`: the numbers its stop test compares
    (a missing key reads 0; None: not a number, so no score passes the test); `score`: sqrt(semantic * quality)
    when the reply gave both as numbers in 0-10, else None; `satisfied`: the client's stop test; `notes`: where
    the reply left the format and how that was read."""

    thought: str
    semantic: Optional[float]
    quality: Optional[float]
    score: Optional[float]
    answer: str
    satisfied: bool
    notes: list[str] = field(default_factory=list)


def _client_number(scores: dict, key: str, notes: list[str]) -> tuple[Optional[float], bool]:
    """(the number the client compares, whether the reply gave it as a 0-10 number)."""
    if key not in scores:
        notes.append(f"no \"{key}\" key: read as 0")
        return 0.0, False
    value = scores[key]
    if isinstance(value, list) and len(value) == 1:  # the template's [0-10] echoed
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        notes.append(f"{key} {value!r} is not a number: no score")
        return None, False
    return float(value), 0 <= value <= 10


def read_as_client(text: str, previous: str, threshold: float = 8.0) -> ClientReading:
    """Read `text` as EditThinker's client (`evaluate_and_rewrite_prompt`) does, never failing: the first
    `<think>` (none: ""), the first `<score>` as JSON (missing or not JSON: {}), a missing key as 0, the first
    closed `<answer>` (missing, unclosed or empty: the previous prompt, and satisfied). Satisfied when the
    answer repeats `previous` or both numbers reach `threshold`."""
    notes: list[str] = []
    think = _THINK_RE.search(text)
    if think is None:
        notes.append("no <think>")
    semantic = quality = score = None
    found_score = _SCORE_RE.search(text)
    scores: Any = None
    if found_score is None:
        notes.append("no <score>: read as {}")
    else:
        try:
            scores = json.loads(found_score.group(1).strip())
        except ValueError:
            notes.append("<score> is not JSON: read as {}")
        else:
            if not isinstance(scores, dict):
                notes.append("<score> is not a JSON object: read as {}")
                scores = None
    if scores is None:  # the client reads {} here: both numbers 0
        semantic = quality = 0.0
    else:
        (semantic, s_ok), (quality, q_ok) = (_client_number(scores, k, notes) for k in ("semantic", "quality"))
        if s_ok and q_ok:
            score = math.sqrt(semantic * quality)
    found = _ANSWER_RE.search(text)
    answer = found.group(1).strip() if found else previous
    satisfied = answer.strip() == previous.strip() or (
        semantic is not None and quality is not None and semantic >= threshold and quality >= threshold)
    if not answer.strip():
        answer, satisfied = previous, True
    if found is None or not found.group(1).strip():
        notes.append(f"{'no closed' if found is None else 'an empty'} <answer>: the previous prompt kept, satisfied")
    return ClientReading(think.group(1).strip() if think else "", semantic, quality, score, answer, satisfied, notes)


__all__ = ["CONTRACTS", "ClientReading", "EDITTHINKER_TEMPLATE", "EditThinkerVerdict", "PLACEHOLDERS",
           "check_template", "load_prompt_template", "parse_editthinker", "read_as_client"]
