"""EditThinker's reflection contract: the reply `<think>..</think><score>{..}</score><answer>..</answer>` and our
wording of the prompt that asks for it (a user with EditThinker's own prompt file passes it as a template)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


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


__all__ = ["CONTRACTS", "EDITTHINKER_TEMPLATE", "EditThinkerVerdict", "parse_editthinker"]
