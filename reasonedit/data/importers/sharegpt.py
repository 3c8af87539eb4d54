"""The `sharegpt` format: LLaMA-Factory conversations with images, e.g. EditThinker's `sft_train.json`.

A row holds its turns in `messages` ({role, content}; system/user/assistant) or `conversations`
({from, value}; system/human/gpt), and `images`, paths matched one to one by `<image>` placeholders
in the turns. Only one user turn answered by one assistant turn maps to a record. An answer with a
<score> block is an EditThinker critique of an (original, edited) pair: its <think>, <score> and
<answer> (the refined prompt) make a reflection sample; a refined prompt is EditThinker's restart from the
original image (`restart`). Without one, a (source, target) pair makes a thinking pair: the user's request
is the abstract instruction, the <answer> block (or the answer less its <think>) the concrete one. Rows that
fit neither, or that are malformed, stop the import, or with `skip_unmapped` are skipped and reported.
Quoted instructions may run over several lines and hold quotes; scores may be written 7, 7.5, "7", [7] or 7/10.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

from ..samples import ReflectionSample, ThinkingPair
from .editthinker import EDITTHINKER_SUCCESS, editthinker_score, read_scores, score_json, score_meta, score_reason
from .records import IMPORTED, Context, Planned, build_reflection, build_thinking_pair, plan_rows, row_key
from .rows import DataImportError, Row, image_path, json_type, read_rows, row_object, split_of

# LLaMA-Factory sharegpt: two spellings of a conversation, each with its own role names.
_SHAREGPT_STYLES = {
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "conversations": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}
IMAGE_PLACEHOLDER = "<image>"


class _Unmapped(DataImportError):
    """A well-formed row that fits none of our record kinds (skippable with `skip_unmapped`)."""


def _tag_blocks(text: str, tag: str) -> list[str]:
    # EditThinker's reward strips whitespace around "<", ">" and "/" before matching; so do we
    return re.findall(rf"<\s*{tag}\s*>(.*?)<\s*/\s*{tag}\s*>", text, re.DOTALL | re.IGNORECASE)


def _one_block(row: Row, text: str, tag: str, field_name: str, *, required: bool) -> str | None:
    blocks = _tag_blocks(text, tag)
    if len(blocks) > 1:
        raise row.error(field_name, f"has {len(blocks)} <{tag}> blocks; expected one", reason="bad_critique")
    if not blocks:
        if required:
            raise row.error(field_name, f"has a <score> block but no <{tag}>...</{tag}> block (EditThinker's "
                                        "answer is <think>...</think> <score>{...}</score> <answer>...</answer>)",
                            reason="bad_critique")
        return None
    return blocks[0].strip()


_TEMPLATE_LABELS = ("Original User Instruction", "Rewritten Prompt")  # EditThinker's prompt template
# where a quoted template value ends at the latest: the next label line, a markdown heading
_NEXT_TEMPLATE_LINE = re.compile(rf"^[ \t]*(?:#|(?:{'|'.join(_TEMPLATE_LABELS)})[^:\n]*:)", re.MULTILINE)


def _quoted_value(text: str, label: str) -> str | None:
    """The quoted value of an EditThinker prompt-template line such as `Original User Instruction (...): "..."`.

    The value may hold quotes and run over several lines (the template fills in the instruction as it is): it
    ends at the last quote before the next template line (another label or a heading), else at the last quote
    on its own line. Kept as written, line breaks included; None when there is no such line.
    """
    match = re.search(rf'^[ \t]*{label}[^:\n]*:[ \t]*"', text, re.MULTILINE)
    if match is None:
        return None
    start = match.end()
    following = _NEXT_TEMPLATE_LINE.search(text, start)
    block = text[start: following.start() if following else len(text)].rstrip()
    if block.endswith('"'):
        return block[:-1]
    line = text[start:].split("\n", 1)[0].rstrip()  # more text follows, outside the template: one line only
    return line[:-1] if line.endswith('"') else None


def _conversation(row: Row) -> tuple[list[tuple[str, str]], str]:
    """The (role, content) turns of a sharegpt row with roles named system/user/assistant, and the list's name."""
    obj = row_object(row)
    name = next((n for n in _SHAREGPT_STYLES if n in obj), None)
    if name is None:
        raise row.error("messages", "missing; a sharegpt row holds its turns in 'messages' (or 'conversations')",
                        reason="missing_field")
    role_key, content_key, roles = _SHAREGPT_STYLES[name]
    turns = obj[name]
    if not isinstance(turns, list) or not turns:
        raise row.error(name, f"expected a non-empty array of turns, got {json_type(turns)} {turns!r:.40}",
                        reason="bad_conversation")
    out = []
    for i, turn in enumerate(turns):
        at = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise row.error(at, f"expected a JSON object with '{role_key}' and '{content_key}', "
                                f"got {json_type(turn)}", reason="bad_conversation")
        for key in (role_key, content_key):
            if not isinstance(turn.get(key), str):
                raise row.error(f"{at}.{key}", "missing" if key not in turn else
                                f"expected a string, got {json_type(turn[key])}", reason="bad_conversation")
        if turn[role_key] not in roles:
            raise row.error(f"{at}.{role_key}", f"unknown role {turn[role_key]!r}; expected one of "
                                                f"{', '.join(roles)}", reason="bad_conversation")
        out.append((roles[turn[role_key]], turn[content_key]))
    return out, name


def plan_sharegpt(path: Path, tag: str, ctx: Context) -> Iterator[Planned]:
    """The records of one sharegpt file; rows that cannot be mapped raise, or are skipped with `ctx.skip_unmapped`."""
    return plan_rows(read_rows(path), ctx, partial(_sharegpt_row, tag=tag, ctx=ctx))


def _sharegpt_row(row: Row, tag: str, ctx: Context) -> Iterator[Planned]:
    try:
        yield _sharegpt_record(row, tag, ctx)
    except _Unmapped as e:
        if ctx.skip_unmapped:
            raise
        # a conversation of another kind is no mistake in the file: say how to leave such rows out
        raise DataImportError(f"{e}; pass skip_unmapped (--skip-unmapped) to skip and count such rows",
                              at=e.at, field=e.field, reason=e.reason) from None


def _sharegpt_record(row: Row, tag: str, ctx: Context) -> Planned:
    turns, name = _conversation(row)
    obj = row.value
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise row.error("system", f"expected a string, got {json_type(system)}", reason="wrong_type")
    images = obj.get("images", [])
    if not isinstance(images, list):
        raise row.error("images", f"expected an array of image paths, got {json_type(images)}", reason="wrong_type")
    placeholders = sum(content.count(IMAGE_PLACEHOLDER) for _, content in turns)
    if placeholders != len(images):
        raise row.error("images", f"{len(images)} image path(s) but {placeholders} {IMAGE_PLACEHOLDER} "
                                  "placeholder(s) in the turns; LLaMA-Factory needs one per image", reason="bad_images")
    dialogue = [i for i, (role, _) in enumerate(turns) if role != "system"]
    roles = [turns[i][0] for i in dialogue]
    if roles != ["user", "assistant"]:
        raise row.error(name, f"turns are {', '.join(roles)}; only one user turn answered by one "
                              "assistant turn maps to a record", _Unmapped, reason="fits_no_kind")
    turn = _Turns(question=turns[dialogue[0]][1], answer=turns[dialogue[1]][1],
                  question_field=f"{name}[{dialogue[0]}].content", answer_field=f"{name}[{dialogue[1]}].content")
    critique = bool(_tag_blocks(turn.answer, "score"))
    if not critique and len(images) != 2:
        raise row.error(None, f"fits no record kind: the answer has no <score> block (not an EditThinker critique) "
                              f"and the row has {len(images)} image(s), not 2 (source, target) for a thinking pair",
                        _Unmapped, reason="fits_no_kind")
    paths = [image_path(row, f"images[{i}]", p, ctx.root(row.path)) for i, p in enumerate(images)]
    split, key = split_of(row, ctx.split), row_key(tag, row)
    meta = {"origin": row.origin, "image_paths": list(images)}
    return (_critique if critique else _thinking)(row, turn, paths, split, key, meta)


@dataclass
class _Turns:
    """The user turn and the assistant turn of a sharegpt row, with their field names for errors."""

    question: str
    answer: str
    question_field: str
    answer_field: str


def _critique(row: Row, turn: _Turns, paths: list[Path], split: str, key: str, meta: dict) -> Planned:
    """An EditThinker critique (original image, edited image; think, score, refined prompt) -> ReflectionSample."""
    if len(paths) != 2:
        raise row.error("images", f"an EditThinker critique needs 2 images (original, edited), got {len(paths)}",
                        reason="bad_images")
    think = _one_block(row, turn.answer, "think", turn.answer_field, required=True)
    raw = _one_block(row, turn.answer, "score", turn.answer_field, required=True)
    refined = _one_block(row, turn.answer, "answer", turn.answer_field, required=True)
    try:
        scores = score_json(raw)
    except json.JSONDecodeError as e:
        raise row.error(turn.answer_field, f"<score> block is not JSON ({e.msg}): {raw[:60]!r}",
                        reason="bad_score") from None
    semantic, quality = read_scores(row, scores, f"{turn.answer_field} <score>")
    instruction = (_quoted_value(turn.question, "Original User Instruction") or "").strip()
    if not instruction:
        raise row.error(turn.question_field, "has no 'Original User Instruction (...): \"...\"' line (EditThinker's "
                                             "prompt template), so the critique does not say what the edit was for",
                        reason="missing_instruction")
    rewritten = (_quoted_value(turn.question, "Rewritten Prompt") or "").strip()
    score = editthinker_score(semantic, quality)
    if score >= EDITTHINKER_SUCCESS:
        decision, new_instruction = "Success", ""
    elif refined and refined != rewritten:
        decision, new_instruction = "Reflection", refined
    else:
        decision, new_instruction = "Failed", ""  # below the bar and no new prompt: start again
    meta = {**meta, **score_meta(semantic, quality), "rewritten_prompt": rewritten, "refined_prompt": refined}
    reason = think or score_reason(semantic, quality)
    images = (("images[0]", paths[0]), ("images[1]", paths[1]))
    # EditThinker edits the original image again with its refined prompt, never the edited one: a restart
    return Planned(split, ReflectionSample.KIND, key, row.where, partial(
        build_reflection, key, row.where, images[0], instruction, images[1], score, reason, think, decision,
        new_instruction, meta, restart=decision == "Reflection"), images)


def _thinking(row: Row, turn: _Turns, paths: list[Path], split: str, key: str, meta: dict) -> Planned:
    """A request (source image) answered by concrete steps, with the target as the second image -> ThinkingPair."""
    think = _one_block(row, turn.answer, "think", turn.answer_field, required=False) or ""
    concrete = _one_block(row, turn.answer, "answer", turn.answer_field, required=False)
    if concrete is None:
        concrete = re.sub(r"<\s*think\s*>.*?<\s*/\s*think\s*>", "", turn.answer,
                          flags=re.DOTALL | re.IGNORECASE).strip()
    if not concrete:
        raise row.error(turn.answer_field, "has no concrete instruction after its <think> block", reason="empty_field")
    request = turn.question.replace(IMAGE_PLACEHOLDER, "").strip()
    # our own think prompt ends with "Request: ...", which may run over several lines
    match = re.search(r"^[ \t]*Request:(.*)", request, re.MULTILINE | re.DOTALL)
    abstract = match.group(1).strip() if match else request
    if not abstract:
        raise row.error(turn.question_field, "has no request text besides the images", reason="empty_field")
    images = (("images[0]", paths[0]), ("images[1]", paths[1]))
    return Planned(split, ThinkingPair.KIND, key, row.where, partial(
        build_thinking_pair, key, row.where, images[0], abstract, concrete, IMPORTED, images[1],
        {**meta, "thought": think}), images)
