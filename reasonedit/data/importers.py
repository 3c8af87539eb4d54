"""Import datasets that users already have into our shards.

Four formats (see `FORMATS` and `docs/importers.md`): JSONL edit pairs with image paths,
LLaMA-Factory sharegpt conversations (EditThinker's `sft_train.json`), EditThinker's RL rows, and
folders of captioned images. An import reads every row first, checking each field and that each
image file exists, then decodes the images and writes `OUT/<split>/<kind>-NNNNN.tar` plus
`manifest.json` in a hidden sibling directory that is renamed into place only when complete. A
bad row stops the import with a `DataImportError` naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from .samples import SCHEMA_VERSION, EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from .shards import DatasetDirError, building_dataset, write_manifest, write_records
from .synth import KINDS, SPLITS

log = logging.getLogger(__name__)

FORMATS = {
    "jsonl": "JSON Lines of {source, target, instruction[, abstract_instruction, split]} image paths -> "
             "edit_pair (+ thinking_pair)",
    "sharegpt": "LLaMA-Factory sharegpt (messages + images), e.g. EditThinker's sft_train.json -> "
                "reflection (critiques) or thinking_pair",
    "editthinker-rl": "EditThinker RL rows {origin_prompt, rewritten_prompt, origin_image_path, "
                      "edited_image_path, evaluation} -> reflection",
    "captions": "a folder of x.png + x.txt pairs, or a captions.jsonl of {image, caption} -> text_to_image",
}
DEFAULT_SHARD_SIZE = 500
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"
# EditThinker's inference stops refining once semantic and quality are both at least 8
# (inference/run_edit_thinker_inference.py); our imported decision is Success exactly then.
EDITTHINKER_SUCCESS = 8
IMPORTED = "imported"  # category / error_type of imported records: the source format does not say


class DataImportError(ValueError):
    """A row or input that cannot be imported; names the file, line and field and what to fix."""


class _Unmapped(DataImportError):
    """A well-formed row that fits none of our record kinds (skippable with `skip_unmapped`)."""


# -- reading rows -----------------------------------------------------------------------------------
def _json_type(value: Any) -> str:
    """`value`'s JSON type with its article, for messages: "an array", "a string", "null"."""
    for types, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (dict, "an object"),
                        (list, "an array")):
        if isinstance(value, types):
            return name
    return "null"


@dataclass
class _Row:
    """One input row and where it came from."""

    path: Path
    line: int
    index: int  # 0-based among the file's rows
    value: Any
    in_array: bool = False

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" + (f" (row {self.index + 1})" if self.in_array else "")

    @property
    def origin(self) -> dict:
        """Kept in each record's meta; the file name only, so shards do not depend on where inputs live."""
        return {"file": self.path.name, "line": self.line, "row": self.index}

    def error(self, field_name: str | None, problem: str, kind: type = DataImportError) -> DataImportError:
        return kind(f"{self.where}: field '{field_name}': {problem}" if field_name else f"{self.where}: {problem}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not JSON
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataImportError(f"{path}:{line}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from None
    except IsADirectoryError:
        raise DataImportError(f"{path}: is a directory; this format reads a .json or .jsonl file") from None
    except FileNotFoundError:
        raise DataImportError(f"{path}: no such file") from None
    except OSError as e:
        raise DataImportError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_rows(path: Path) -> Iterator[_Row]:
    """The rows of a JSON Lines file, or of a file holding one JSON array (LLaMA-Factory's .json)."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        yield from _array_rows(path, text, start + 1)
        return
    index = 0
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataImportError(f"{path}:{n}: bad JSON ({e.msg} at column {e.colno})") from None
        yield _Row(path, n, index, value)
        index += 1


def _array_rows(path: Path, text: str, i: int) -> Iterator[_Row]:
    decoder, blank = json.JSONDecoder(), re.compile(r"\s*")
    line, counted = 1, 0

    def line_at(pos: int) -> int:  # counted incrementally: rows come in order
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    i = blank.match(text, i).end()
    if text.startswith("]", i):
        return
    index = 0
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataImportError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
        yield _Row(path, line_at(i), index, value, in_array=True)
        index += 1
        i = blank.match(text, end).end()
        if text.startswith(",", i):
            i = blank.match(text, i + 1).end()
        elif text.startswith("]", i):
            rest = blank.match(text, i + 1).end()
            if rest != len(text):
                raise DataImportError(f"{path}:{line_at(rest)}: bad JSON (text after the closing ']')")
            return
        else:
            raise DataImportError(f"{path}:{line_at(i)}: bad JSON (expected ',' or ']' after row {index})")


# -- fields -----------------------------------------------------------------------------------------
def _object(row: _Row) -> dict:
    if not isinstance(row.value, dict):
        raise row.error(None, f"expected a JSON object, got {_json_type(row.value)}")
    return row.value


def _text(row: _Row, name: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
    obj = _object(row)
    value = obj.get(name)
    if value is None:
        if required:
            raise row.error(name, "missing; add it as a string" if name not in obj else "is null; a string is required")
        return None
    if not isinstance(value, str):
        raise row.error(name, f"expected a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise row.error(name, "is empty; give a non-empty string")
    return value


def _split_of(row: _Row, default: str) -> str:
    split = _text(row, "split", required=False) or default
    if split not in SPLITS:
        raise row.error("split", f"{split!r} is not a split; use one of {', '.join(SPLITS)}")
    return split


def _image_path(row: _Row, name: str, value: Any, root: Path) -> Path:
    """The file an image field names (relative paths from `root`), checked to exist."""
    if value is None:
        raise row.error(name, "missing; an image path is required")
    if not isinstance(value, str):
        raise row.error(name, f"expected an image path (a string), got {_json_type(value)}")
    if not value.strip():
        raise row.error(name, "is empty; an image path is required")
    relative = not Path(value).is_absolute()
    path = root / value if relative else Path(value)
    if not path.is_file():
        raise row.error(name, f"image file {path} not found" + (f" (relative paths are read from {root}; "
                                                                "set image_root (--image-root) to change that)"
                                                                if relative else ""))
    return path


def load_image(path: Path, where: str, field_name: str) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array, upright per its EXIF orientation; alpha is dropped."""
    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataImportError(f"{where}: field '{field_name}': image {path} cannot be decoded ({e}); "
                              "replace it with a readable PNG or JPEG") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


_STEP_RE = re.compile(r"Step\s+\d+\s*:\s*")


def split_steps(concrete: str) -> list[str]:
    """The steps of a concrete instruction: after each "Step N:" marker, else one per line."""
    pieces = _STEP_RE.split(concrete)
    if len(pieces) > 1:
        return [p.strip() for p in pieces[1:] if p.strip()]
    lines = [ln.strip() for ln in concrete.splitlines() if ln.strip()]
    return lines or [concrete.strip()]


# -- EditThinker's critique: scores and decision -----------------------------------------------------
def editthinker_score(semantic: float, quality: float) -> int:
    """Our 0-10 score for an EditThinker evaluation: the weaker of its two axes, rounded down.

    So score >= 8 exactly when EditThinker would stop refining (both axes at least 8).
    """
    return int(math.floor(min(semantic, quality)))


def _axis(row: _Row, scores: Any, where_field: str, names: tuple[str, ...]) -> float:
    if not isinstance(scores, dict):
        raise row.error(where_field, f"expected a JSON object of scores, got {_json_type(scores)}")
    name = next((n for n in names if n in scores), None)
    if name is None:
        raise row.error(f"{where_field}.{names[0]}", "missing; EditThinker scores are "
                                                     '{"semantic" (or "semantics"): N, "quality": N}')
    value = scores[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise row.error(f"{where_field}.{name}", f"expected a number from 0 to 10, got {value!r}")
    if not 0 <= value <= 10:
        raise row.error(f"{where_field}.{name}", f"{value} is outside 0-10")
    return float(value)


def _scores(row: _Row, scores: Any, where_field: str) -> tuple[float, float]:
    # the RL ground truth spells it "semantics", the model's <score> answer "semantic"
    return (_axis(row, scores, where_field, ("semantics", "semantic")),
            _axis(row, scores, where_field, ("quality",)))


def _number_text(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _score_reason(semantic: float, quality: float) -> str:
    return (f"EditThinker evaluation: semantic {_number_text(semantic)}/10 (instruction following and "
            f"preservation), quality {_number_text(quality)}/10 (naturalness and artifacts).")


def _score_meta(semantic: float, quality: float) -> dict:
    return {"semantic": semantic, "quality": quality, "overall": round(math.sqrt(semantic * quality), 4)}


# -- planning: rows to records still to build --------------------------------------------------------
@dataclass
class _Planned:
    """A record checked field by field whose images are decoded only when it is written."""

    split: str
    kind: str
    key: str
    where: str
    build: Callable[[], Record]


@dataclass
class _Context:
    split: str  # for rows that name none
    image_root: Path | None
    skip_unmapped: bool = False
    skipped: list[str] = field(default_factory=list)

    def root(self, path: Path) -> Path:
        return self.image_root if self.image_root is not None else path.parent


def _key_part(text: str) -> str:
    # webdataset cuts a key at its first "." and a "/" makes a tar directory
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def _row_key(tag: str, row: _Row) -> str:
    return f"{tag}-{row.index:07d}"


# Builders: each decodes its images (given as (field, path), for error messages) and makes one record.
_Image = tuple[str, Path]


def _edit_pair(key: str, where: str, source: _Image, instruction: str, target: _Image, meta: dict) -> EditPair:
    return EditPair(key, load_image(source[1], where, source[0]), instruction, load_image(target[1], where, target[0]),
                    meta=meta)


def _thinking_pair(key: str, where: str, image: _Image, abstract: str, concrete: str, category: str,
                   target: _Image, meta: dict) -> ThinkingPair:
    return ThinkingPair(key, load_image(image[1], where, image[0]), abstract, concrete, split_steps(concrete),
                        category, load_image(target[1], where, target[0]), meta=meta)


def _reflection(key: str, where: str, source: _Image, instruction: str, candidate: _Image, score: int, reason: str,
                thought: str, decision: str, new_instruction: str, meta: dict) -> ReflectionSample:
    # imports carry no expected-target description (""), and do not know how the candidate was made
    return ReflectionSample(key, load_image(source[1], where, source[0]), instruction,
                            load_image(candidate[1], where, candidate[0]), "", score, reason, thought, decision,
                            new_instruction, IMPORTED, meta=meta)


def _text_to_image(key: str, where: str, caption: str, image: _Image, meta: dict) -> TextToImage:
    return TextToImage(key, caption, load_image(image[1], where, image[0]), meta=meta)


def _plan_jsonl(path: Path, tag: str, ctx: _Context) -> Iterator[_Planned]:
    known = {"source", "target", "instruction", "abstract_instruction", "category", "split"}
    for row in read_rows(path):
        obj = _object(row)
        instruction = _text(row, "instruction")
        abstract = _text(row, "abstract_instruction", required=False)
        category = _text(row, "category", required=False) or IMPORTED
        source = ("source", _image_path(row, "source", obj.get("source"), ctx.root(path)))
        target = ("target", _image_path(row, "target", obj.get("target"), ctx.root(path)))
        split, key = _split_of(row, ctx.split), _row_key(tag, row)
        meta = {"origin": row.origin, "source_path": obj["source"], "target_path": obj["target"],
                "extra": {k: v for k, v in obj.items() if k not in known}}
        yield _Planned(split, EditPair.KIND, key, row.where,
                       partial(_edit_pair, key, row.where, source, instruction, target, meta))
        if abstract is not None:
            yield _Planned(split, ThinkingPair.KIND, key, row.where, partial(
                _thinking_pair, key, row.where, source, abstract, instruction, category, target, meta))


# LLaMA-Factory sharegpt: two spellings of a conversation, each with its own role names.
_SHAREGPT_STYLES = {
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "conversations": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}
IMAGE_PLACEHOLDER = "<image>"


def _tag_blocks(text: str, tag: str) -> list[str]:
    # EditThinker's reward strips whitespace around "<", ">" and "/" before matching; so do we
    return re.findall(rf"<\s*{tag}\s*>(.*?)<\s*/\s*{tag}\s*>", text, re.DOTALL | re.IGNORECASE)


def _one_block(row: _Row, text: str, tag: str, field_name: str, *, required: bool) -> str | None:
    blocks = _tag_blocks(text, tag)
    if len(blocks) > 1:
        raise row.error(field_name, f"has {len(blocks)} <{tag}> blocks; expected one")
    if not blocks:
        if required:
            raise row.error(field_name, f"has a <score> block but no <{tag}>...</{tag}> block (EditThinker's "
                                        "answer is <think>...</think> <score>{...}</score> <answer>...</answer>)")
        return None
    return blocks[0].strip()


def _quoted_line(text: str, label: str) -> str | None:
    """The quoted value of an EditThinker prompt-template line such as `Original User Instruction (...): "..."`."""
    match = re.search(rf'^[ \t]*{label}[^:\n]*:[ \t]*"(.*)"[ \t]*$', text, re.MULTILINE)
    return match.group(1) if match else None


def _conversation(row: _Row) -> tuple[list[tuple[str, str]], str]:
    """The (role, content) turns of a sharegpt row with roles named system/user/assistant, and the list's name."""
    obj = _object(row)
    name = next((n for n in _SHAREGPT_STYLES if n in obj), None)
    if name is None:
        raise row.error("messages", "missing; a sharegpt row holds its turns in 'messages' (or 'conversations')")
    role_key, content_key, roles = _SHAREGPT_STYLES[name]
    turns = obj[name]
    if not isinstance(turns, list) or not turns:
        raise row.error(name, f"expected a non-empty array of turns, got {_json_type(turns)} {turns!r:.40}")
    out = []
    for i, turn in enumerate(turns):
        at = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise row.error(at, f"expected a JSON object with '{role_key}' and '{content_key}', "
                                f"got {_json_type(turn)}")
        for key in (role_key, content_key):
            if not isinstance(turn.get(key), str):
                raise row.error(f"{at}.{key}", "missing" if key not in turn else
                                f"expected a string, got {_json_type(turn[key])}")
        if turn[role_key] not in roles:
            raise row.error(f"{at}.{role_key}", f"unknown role {turn[role_key]!r}; expected one of "
                                                f"{', '.join(roles)}")
        out.append((roles[turn[role_key]], turn[content_key]))
    return out, name


def _plan_sharegpt(path: Path, tag: str, ctx: _Context) -> Iterator[_Planned]:
    for row in read_rows(path):
        try:
            planned = _sharegpt_record(row, tag, ctx)
        except _Unmapped as e:
            if not ctx.skip_unmapped:
                raise DataImportError(f"{e}; pass skip_unmapped (--skip-unmapped) to skip and count such rows"
                                      ) from None
            ctx.skipped.append(str(e))
            log.debug("skipped %s", e)
            continue
        yield planned


def _sharegpt_record(row: _Row, tag: str, ctx: _Context) -> _Planned:
    turns, name = _conversation(row)
    obj = row.value
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise row.error("system", f"expected a string, got {_json_type(system)}")
    images = obj.get("images", [])
    if not isinstance(images, list):
        raise row.error("images", f"expected an array of image paths, got {_json_type(images)}")
    placeholders = sum(content.count(IMAGE_PLACEHOLDER) for _, content in turns)
    if placeholders != len(images):
        raise row.error("images", f"{len(images)} image path(s) but {placeholders} {IMAGE_PLACEHOLDER} "
                                  "placeholder(s) in the turns; LLaMA-Factory needs one per image")
    dialogue = [i for i, (role, _) in enumerate(turns) if role != "system"]
    roles = [turns[i][0] for i in dialogue]
    if roles != ["user", "assistant"]:
        raise row.error(name, f"turns are {', '.join(roles)}; only one user turn answered by one "
                              "assistant turn maps to a record", _Unmapped)
    turn = _Turns(question=turns[dialogue[0]][1], answer=turns[dialogue[1]][1],
                  question_field=f"{name}[{dialogue[0]}].content", answer_field=f"{name}[{dialogue[1]}].content")
    critique = bool(_tag_blocks(turn.answer, "score"))
    if not critique and len(images) != 2:
        raise row.error(None, f"fits no record kind: the answer has no <score> block (not an EditThinker critique) "
                              f"and the row has {len(images)} image(s), not 2 (source, target) for a thinking pair",
                        _Unmapped)
    paths = [_image_path(row, f"images[{i}]", p, ctx.root(row.path)) for i, p in enumerate(images)]
    split, key = _split_of(row, ctx.split), _row_key(tag, row)
    meta = {"origin": row.origin, "image_paths": list(images)}
    return (_critique if critique else _thinking)(row, turn, paths, split, key, meta)


@dataclass
class _Turns:
    """The user turn and the assistant turn of a sharegpt row, with their field names for errors."""

    question: str
    answer: str
    question_field: str
    answer_field: str


def _critique(row: _Row, turn: _Turns, paths: list[Path], split: str, key: str, meta: dict) -> _Planned:
    """An EditThinker critique (original image, edited image; think, score, refined prompt) -> ReflectionSample."""
    if len(paths) != 2:
        raise row.error("images", f"an EditThinker critique needs 2 images (original, edited), got {len(paths)}")
    think = _one_block(row, turn.answer, "think", turn.answer_field, required=True)
    raw = _one_block(row, turn.answer, "score", turn.answer_field, required=True)
    refined = _one_block(row, turn.answer, "answer", turn.answer_field, required=True)
    try:
        scores = json.loads(raw)
    except json.JSONDecodeError as e:
        raise row.error(turn.answer_field, f"<score> block is not JSON ({e.msg}): {raw[:60]!r}") from None
    semantic, quality = _scores(row, scores, f"{turn.answer_field} <score>")
    instruction = _quoted_line(turn.question, "Original User Instruction")
    if instruction is None or not instruction.strip():
        raise row.error(turn.question_field, "has no 'Original User Instruction (...): \"...\"' line (EditThinker's "
                                             "prompt template), so the critique does not say what the edit was for")
    rewritten = (_quoted_line(turn.question, "Rewritten Prompt") or "").strip()
    score = editthinker_score(semantic, quality)
    if score >= EDITTHINKER_SUCCESS:
        decision, new_instruction = "Success", ""
    elif refined and refined != rewritten:
        decision, new_instruction = "Reflection", refined
    else:
        decision, new_instruction = "Failed", ""  # below the bar and no new prompt: start again
    meta = {**meta, **_score_meta(semantic, quality), "rewritten_prompt": rewritten, "refined_prompt": refined,
            "new_instruction_applies_to": "source"}
    reason = think or _score_reason(semantic, quality)
    return _Planned(split, ReflectionSample.KIND, key, row.where, partial(
        _reflection, key, row.where, ("images[0]", paths[0]), instruction, ("images[1]", paths[1]), score, reason,
        think, decision, new_instruction, meta))


def _thinking(row: _Row, turn: _Turns, paths: list[Path], split: str, key: str, meta: dict) -> _Planned:
    """A request (source image) answered by concrete steps, with the target as the second image -> ThinkingPair."""
    think = _one_block(row, turn.answer, "think", turn.answer_field, required=False) or ""
    concrete = _one_block(row, turn.answer, "answer", turn.answer_field, required=False)
    if concrete is None:
        concrete = re.sub(r"<\s*think\s*>.*?<\s*/\s*think\s*>", "", turn.answer,
                          flags=re.DOTALL | re.IGNORECASE).strip()
    if not concrete:
        raise row.error(turn.answer_field, "has no concrete instruction after its <think> block")
    request = turn.question.replace(IMAGE_PLACEHOLDER, "").strip()
    match = re.search(r"^[ \t]*Request:[ \t]*(.+)$", request, re.MULTILINE)  # our own think prompt
    abstract = match.group(1).strip() if match else request
    if not abstract:
        raise row.error(turn.question_field, "has no request text besides the images")
    return _Planned(split, ThinkingPair.KIND, key, row.where, partial(
        _thinking_pair, key, row.where, ("images[0]", paths[0]), abstract, concrete, IMPORTED,
        ("images[1]", paths[1]), {**meta, "thought": think}))


def _plan_editthinker_rl(path: Path, tag: str, ctx: _Context) -> Iterator[_Planned]:
    known = {"origin_prompt", "rewritten_prompt", "origin_image_path", "edited_image_path", "evaluation", "split"}
    for row in read_rows(path):
        obj = _object(row)
        instruction = _text(row, "origin_prompt")
        rewritten = _text(row, "rewritten_prompt", allow_empty=True)
        source = ("origin_image_path", _image_path(row, "origin_image_path", obj.get("origin_image_path"),
                                                   ctx.root(path)))
        candidate = ("edited_image_path", _image_path(row, "edited_image_path", obj.get("edited_image_path"),
                                                      ctx.root(path)))
        if "evaluation" not in obj:
            raise row.error("evaluation", 'missing; EditThinker RL rows carry {"semantics": N, "quality": N}')
        evaluation = obj["evaluation"]
        semantic, quality = _scores(row, evaluation, "evaluation")
        given = next((evaluation[k].strip() for k in ("reason", "reasoning")
                      if isinstance(evaluation.get(k), str) and evaluation[k].strip()), None)
        score = editthinker_score(semantic, quality)
        # rewritten_prompt is the prompt that produced the edited image, not a correction of it: with no
        # corrective instruction in the row, one below the bar can only say "start again" (Failed).
        decision = "Success" if score >= EDITTHINKER_SUCCESS else "Failed"
        thought = (f"Semantic {_number_text(semantic)}/10 and quality {_number_text(quality)}/10: "
                   + ("both reach 8, the edit is done." if decision == "Success" else
                      "not both 8 or more, so the edit is not good enough; start again from the source."))
        split, key = _split_of(row, ctx.split), _row_key(tag, row)
        meta = {"origin": row.origin, **_score_meta(semantic, quality), "rewritten_prompt": rewritten,
                "source_path": obj["origin_image_path"], "candidate_path": obj["edited_image_path"],
                "extra": {k: v for k, v in obj.items() if k not in known}}
        yield _Planned(split, ReflectionSample.KIND, key, row.where, partial(
            _reflection, key, row.where, source, instruction, candidate, score,
            given or _score_reason(semantic, quality), thought, decision, "", meta))


def _plan_captions(path: Path, tag: str, ctx: _Context) -> Iterator[_Planned]:
    if path.is_file():
        yield from _caption_rows(path, tag, ctx)
    elif (path / CAPTIONS_FILE).is_file():
        yield from _caption_rows(path / CAPTIONS_FILE, tag, ctx)
    elif path.is_dir():
        yield from _caption_pairs(path, tag, ctx)
    else:
        raise DataImportError(f"{path}: no such folder or file; give a folder of x.png + x.txt pairs or a "
                              f"{CAPTIONS_FILE}")


def _caption_rows(path: Path, tag: str, ctx: _Context) -> Iterator[_Planned]:
    for row in read_rows(path):
        obj = _object(row)
        caption = _text(row, "caption").strip()
        image = ("image", _image_path(row, "image", obj.get("image"), ctx.root(path)))
        split, key = _split_of(row, ctx.split), _row_key(tag, row)
        meta = {"origin": row.origin, "image_path": obj["image"]}
        yield _Planned(split, TextToImage.KIND, key, row.where,
                       partial(_text_to_image, key, row.where, caption, image, meta))


def _caption_pairs(folder: Path, tag: str, ctx: _Context) -> Iterator[_Planned]:
    images: dict[str, list[Path]] = {}
    captions: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        stem = rel.with_suffix("").as_posix()
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(stem, []).append(p)
        elif p.suffix.lower() == ".txt":
            captions[stem] = p
    for stem in sorted(set(images) | set(captions)):
        found, txt = images.get(stem, []), captions.get(stem)
        if txt is None:
            raise DataImportError(f"{found[0]}: field 'caption': no caption file {stem}.txt beside this image; "
                                  "add one or move the image out")
        where = f"{txt}:1"
        if not found:
            raise DataImportError(f"{where}: field 'image': no image named {stem} with a suffix among "
                                  f"{', '.join(IMAGE_SUFFIXES)} beside this caption")
        if len(found) > 1:
            raise DataImportError(f"{where}: field 'image': {len(found)} images share its name "
                                  f"({', '.join(p.name for p in found)}); keep one")
        caption = _read_text(txt).strip()
        if not caption:
            raise DataImportError(f"{where}: field 'caption': the caption file is empty")
        key = f"{tag}-{_key_part(stem)}"
        meta = {"origin": {"file": txt.relative_to(folder).as_posix(), "line": 1},
                "image_path": found[0].relative_to(folder).as_posix()}
        yield _Planned(ctx.split, TextToImage.KIND, key, where,
                       partial(_text_to_image, key, where, caption, ("image", found[0]), meta))


_PLANNERS: dict[str, Callable[[Path, str, _Context], Iterator[_Planned]]] = {
    "jsonl": _plan_jsonl, "sharegpt": _plan_sharegpt, "editthinker-rl": _plan_editthinker_rl,
    "captions": _plan_captions}


# -- writing ----------------------------------------------------------------------------------------
def _as_paths(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not paths:
        raise DataImportError("no input given; name at least one file (or, for captions, a folder)")
    return paths


def _tags(paths: list[Path]) -> list[str]:
    """A key prefix per input, from its name; numbered when two inputs share one."""
    stems = [_key_part(p.stem if p.suffix else p.name) for p in paths]
    return [s if stems.count(s) == 1 else f"{s}{i}" for i, s in enumerate(stems)]


def _source_entry(path: Path) -> dict:
    entry: dict[str, Any] = {"path": str(path.resolve())}
    if path.is_file():
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entry


def import_dataset(format: str, inputs: str | Path | Sequence[str | Path], out: str | Path, *,
                   shard_size: int = DEFAULT_SHARD_SIZE, split: str = "train", overwrite: bool = False,
                   image_root: str | Path | None = None, skip_unmapped: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Import `inputs` in `format` (a key of `FORMATS`) into a dataset directory `out`; return its manifest.

    `split` is for rows that name none; relative image paths are read from each input's folder, or
    from `image_root`. Nothing is left at `out` unless every row imports.
    """
    if format not in _PLANNERS:
        raise DataImportError(f"unknown import format {format!r}; choose one of {', '.join(FORMATS)}")
    if skip_unmapped and format != "sharegpt":
        raise DataImportError("skip_unmapped (--skip-unmapped) applies to --format sharegpt only")
    if split not in SPLITS:
        raise DataImportError(f"--split {split!r} is not a split; use one of {', '.join(SPLITS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise DataImportError(f"--shard-size must be a positive number of records, got {shard_size!r}")
    paths, out = _as_paths(inputs), Path(out)
    ctx = _Context(split, Path(image_root) if image_root is not None else None, skip_unmapped)

    planned: list[_Planned] = []
    seen: dict[tuple[str, str], str] = {}
    for path, tag in zip(paths, _tags(paths)):
        for p in _PLANNERS[format](path, tag, ctx):
            if (p.kind, p.key) in seen:
                raise DataImportError(f"{p.where}: its key {p.key!r} repeats that of {seen[p.kind, p.key]}; "
                                      "rename one of the files")
            seen[p.kind, p.key] = p.where
            planned.append(p)
    if not planned:
        skipped = f" ({len(ctx.skipped)} skipped)" if ctx.skipped else ""
        raise DataImportError(f"no records to import from {', '.join(map(str, paths))}{skipped}")

    groups: dict[str, dict[str, list[_Planned]]] = {}
    for s in SPLITS:  # fixed order, so the manifest is the same whatever order the rows come in
        for kind in KINDS:
            group = [p for p in planned if p.split == s and p.kind == kind]
            if group:
                groups.setdefault(s, {})[kind] = group
    done, total = 0, len(planned)
    shards: dict[str, dict[str, list]] = {}

    def write(tmp: Path) -> dict:
        for s, kinds in groups.items():
            (tmp / s).mkdir()
            shards[s] = {}
            for kind, group in kinds.items():
                def built(group: list[_Planned] = group, label: str = f"{s}/{kind}") -> Iterator[Record]:
                    nonlocal done
                    for p in group:
                        yield p.build()
                        done += 1
                        if progress is not None:
                            progress(label, done, total)
                shards[s][kind] = write_records(built(), tmp / s, kind, shard_size)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "generator": "reasonedit.data.importers",
            "importer": format,
            "sources": [_source_entry(p) for p in paths],
            "settings": {"split": split, "shard_size": shard_size, "skip_unmapped": skip_unmapped,
                         "image_root": str(ctx.image_root.resolve()) if ctx.image_root else None},
            "counts": {s: {k: len(ps) for k, ps in kinds.items()} for s, kinds in groups.items()},
            "skipped": {"count": len(ctx.skipped), "first": ctx.skipped[:20]},
            "shards": shards,
        }
        write_manifest(tmp, manifest)
        return manifest

    try:
        with building_dataset(out, overwrite) as tmp:
            manifest = write(tmp)
    except DatasetDirError as e:
        raise DataImportError(str(e)) from None
    log.info("imported %d records from %d %s input(s) into %s%s", total, len(paths), format, out,
             f"; skipped {len(ctx.skipped)} rows that fit no record kind" if ctx.skipped else "")
    return manifest


def import_jsonl(inputs: str | Path | Sequence[str | Path], out: str | Path, **kw: Any) -> dict:
    """JSON Lines of edit pairs with image paths -> edit_pair (+ thinking_pair); see `import_dataset`."""
    return import_dataset("jsonl", inputs, out, **kw)


def import_sharegpt(inputs: str | Path | Sequence[str | Path], out: str | Path, **kw: Any) -> dict:
    """LLaMA-Factory sharegpt (EditThinker's sft_train.json) -> reflection / thinking_pair; see `import_dataset`."""
    return import_dataset("sharegpt", inputs, out, **kw)


def import_editthinker_rl(inputs: str | Path | Sequence[str | Path], out: str | Path, **kw: Any) -> dict:
    """EditThinker's RL rows (rl_train.jsonl) -> reflection; see `import_dataset`."""
    return import_dataset("editthinker-rl", inputs, out, **kw)


def import_captions(inputs: str | Path | Sequence[str | Path], out: str | Path, **kw: Any) -> dict:
    """Folders of captioned images (or captions.jsonl files) -> text_to_image; see `import_dataset`."""
    return import_dataset("captions", inputs, out, **kw)


__all__ = ["CAPTIONS_FILE", "DEFAULT_SHARD_SIZE", "DataImportError", "EDITTHINKER_SUCCESS", "FORMATS",
           "editthinker_score", "import_captions", "import_dataset", "import_editthinker_rl", "import_jsonl",
           "import_sharegpt", "load_image", "split_steps"]
