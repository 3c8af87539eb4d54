"""The `editthinker-rl` format, and how we read EditThinker's scores (also used by `sharegpt`).

An EditThinker RL row (its `rl_train.jsonl`) pairs an `origin_image_path` and the `origin_prompt`
asked of it with the `edited_image_path` that `rewritten_prompt` produced, and an `evaluation` of
that edit: a `semantics` (or `semantic`) and a `quality` score from 0 to 10, with an optional
`reason` (or `reasoning`). Each row makes one reflection sample: Success when both scores reach 8,
where EditThinker stops refining, else Failed, since the row holds no corrected instruction to try.
"""

from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from ..samples import ReflectionSample
from .records import Context, Planned, build_reflection, plan_rows, row_key
from .rows import Row, image_path, json_type, read_rows, row_object, split_of, text_field

# EditThinker's inference stops refining once semantic and quality are both at least 8
# (inference/run_edit_thinker_inference.py); our imported decision is Success exactly then.
EDITTHINKER_SUCCESS = 8


# -- EditThinker's critique: scores and decision -----------------------------------------------------
def editthinker_score(semantic: float, quality: float) -> int:
    """Our 0-10 score for an EditThinker evaluation: the weaker of its two axes, rounded down.

    So score >= 8 exactly when EditThinker would stop refining (both axes at least 8).
    """
    return int(math.floor(min(semantic, quality)))


# A score as a critic writes it: 7, 7.5, "7", "7/10", and [7] or "[7]" (EditThinker's prompt template shows
# `"semantic": [0-10]`, which models copy); a fraction only out of 10, since the scale is 0-10.
_SCORE_TEXT = re.compile(r"\[?\s*([+-]?\d+(?:\.\d+)?)\s*(?:/\s*10(?:\.0*)?)?\s*\]?")
_BARE_FRACTION = re.compile(r"(:\s*)(\[?\s*\d+(?:\.\d+)?\s*/\s*10(?:\.0*)?\s*\]?)(?=\s*[,}\]])")


def score_number(value: Any) -> float | None:
    """The number a score value stands for (see `_SCORE_TEXT`), or None when it stands for none."""
    if isinstance(value, list) and len(value) == 1 and not isinstance(value[0], list):
        value = value[0]
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        match = _SCORE_TEXT.fullmatch(value.strip())
        return float(match.group(1)) if match else None
    return None


def score_json(text: str) -> Any:
    """A <score> block's JSON, also when it writes a fraction bare (`"semantic": 7/10`, not JSON); raises
    json.JSONDecodeError (of the text as written) when neither reads."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        quoted = _BARE_FRACTION.sub(lambda m: f'{m.group(1)}"{m.group(2)}"', text)
        if quoted == text:
            raise
        try:
            return json.loads(quoted)
        except json.JSONDecodeError:
            raise first from None


def _axis(row: Row, scores: Any, where_field: str, names: tuple[str, ...]) -> float:
    if not isinstance(scores, dict):
        raise row.error(where_field, f"expected a JSON object of scores, got {json_type(scores)}", reason="bad_score")
    name = next((n for n in names if n in scores), None)
    if name is None:
        raise row.error(f"{where_field}.{names[0]}", "missing; EditThinker scores are "
                                                     '{"semantic" (or "semantics"): N, "quality": N}',
                        reason="bad_score")
    value = score_number(scores[name])
    if value is None:
        raise row.error(f"{where_field}.{name}", "expected a number from 0 to 10 (such as 7, 7.5, \"7\", [7] or "
                                                 f"\"7/10\"), got {scores[name]!r}", reason="bad_score")
    if not 0 <= value <= 10:
        raise row.error(f"{where_field}.{name}", f"{scores[name]!r} is outside 0-10", reason="bad_score")
    return value


def read_scores(row: Row, scores: Any, where_field: str) -> tuple[float, float]:
    """The (semantic, quality) scores of an EditThinker evaluation object, each checked to be in 0-10."""
    # the RL ground truth spells it "semantics", the model's <score> answer "semantic"
    return (_axis(row, scores, where_field, ("semantics", "semantic")),
            _axis(row, scores, where_field, ("quality",)))


def _number_text(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def score_reason(semantic: float, quality: float) -> str:
    """The reason a reflection gives for its score when the source gives none."""
    return (f"EditThinker evaluation: semantic {_number_text(semantic)}/10 (instruction following and "
            f"preservation), quality {_number_text(quality)}/10 (naturalness and artifacts).")


def score_meta(semantic: float, quality: float) -> dict:
    """The scores as kept in a record's meta."""
    return {"semantic": semantic, "quality": quality, "overall": round(math.sqrt(semantic * quality), 4)}


# -- the RL rows -------------------------------------------------------------------------------------
def plan_editthinker_rl(path: Path, tag: str, ctx: Context) -> Iterator[Planned]:
    """The reflection samples of one file of EditThinker RL rows."""
    return plan_rows(read_rows(path), ctx, partial(_rl_record, tag=tag, ctx=ctx))


_RL_COLUMNS = {"origin_prompt", "rewritten_prompt", "origin_image_path", "edited_image_path", "evaluation", "split"}


def _rl_record(row: Row, tag: str, ctx: Context) -> Iterator[Planned]:
    obj = row_object(row)
    instruction = text_field(row, "origin_prompt")
    rewritten = text_field(row, "rewritten_prompt", allow_empty=True)
    source = ("origin_image_path", image_path(row, "origin_image_path", obj.get("origin_image_path"),
                                              ctx.root(row.path)))
    candidate = ("edited_image_path", image_path(row, "edited_image_path", obj.get("edited_image_path"),
                                                 ctx.root(row.path)))
    if "evaluation" not in obj:
        raise row.error("evaluation", 'missing; EditThinker RL rows carry {"semantics": N, "quality": N}',
                        reason="missing_field")
    evaluation = obj["evaluation"]
    semantic, quality = read_scores(row, evaluation, "evaluation")
    given = next((evaluation[k].strip() for k in ("reason", "reasoning")
                  if isinstance(evaluation.get(k), str) and evaluation[k].strip()), None)
    score = editthinker_score(semantic, quality)
    # rewritten_prompt is the prompt that produced the edited image, not a correction of it: with no
    # corrective instruction in the row, one below the bar can only say "start again" (Failed).
    decision = "Success" if score >= EDITTHINKER_SUCCESS else "Failed"
    thought = (f"Semantic {_number_text(semantic)}/10 and quality {_number_text(quality)}/10: "
               + ("both reach 8, the edit is done." if decision == "Success" else
                  "not both 8 or more, so the edit is not good enough; start again from the source."))
    split, key = split_of(row, ctx.split), row_key(tag, row)
    meta = {"origin": row.origin, **score_meta(semantic, quality), "rewritten_prompt": rewritten,
            "source_path": obj["origin_image_path"], "candidate_path": obj["edited_image_path"],
            "extra": {k: v for k, v in obj.items() if k not in _RL_COLUMNS}}
    yield Planned(split, ReflectionSample.KIND, key, row.where, partial(
        build_reflection, key, row.where, source, instruction, candidate, score,
        given or score_reason(semantic, quality), thought, decision, "", meta), (source, candidate))
