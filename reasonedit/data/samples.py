"""The four sample kinds and their webdataset encoding.

A record is stored as `<key>.json` (every text and number field, plus `kind` and
`schema_version`) and one `<key>.<name>.png` per image field; an image-list field (an edit pair's
`extra_sources`) stores its length in the json and `<key>.<name>.<i>.png` per image (absent: empty). `docs/data.md` documents each
kind's fields; a field added after schema 1 was first written (`OPTIONAL`) reads as its default when a stored
record lacks it. `from_wds` refuses a record that does not match the schema, naming the field, and `to_wds` one
holding a NaN or an infinity (JSON has neither), naming the record and the field, or one whose key is not a plain
name (`key_problem`: a key such as `../../x` would make tar members that land outside whoever extracts the shard).
Both refuse a record whose fields break a rule between them (`Record.problem`: a reflection's `restart` needs
the Reflection decision and a new instruction).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from reasonedit.paths import name_problem

SCHEMA_VERSION = 1
RECORD_DECISIONS = ("Success", "Reflection", "Failed")  # a reflection sample's decision, as records store it


class SchemaError(ValueError):
    """A stored record that does not match its kind's schema."""


def encode_png(image: np.ndarray) -> bytes:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)  # flat colours: level 1 is 2x faster, ~2 KB
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


MAX_LIST_IMAGES = 8  # an image-list field holds at most this many


def key_problem(key: object) -> str | None:
    """Why `key` cannot be a record's key in a shard, whose members are `<key>.json` and `<key>.<field>.png`;
    None when it can: one plain file name (`reasonedit.paths.name_problem`) without a '.'."""
    problem = name_problem(key)
    if problem is None and "." in key:  # type: ignore[operator]
        problem = "it contains '.' (webdataset reads a key up to its first '.')"
    return problem


def _non_finite(value: Any, name: str) -> tuple[str, float] | None:
    """(the field's dotted name, the value) of the first NaN or infinity in `value`, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (name, value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{name}.{k}" if isinstance(value, dict) else f"{name}[{k}]")
        if found is not None:
            return found
    return None


def _same_image(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@dataclass
class Record:
    """Base of the sample kinds: a key, typed fields, images as (H, W, 3) uint8 arrays."""

    KIND: ClassVar[str] = ""
    IMAGES: ClassVar[tuple[str, ...]] = ()
    IMAGE_LISTS: ClassVar[tuple[str, ...]] = ()  # fields holding a list of images
    # fields added since shards were first written: a stored record without one reads as the field's default (its
    # old meaning), so older shards stay readable
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def problem(self) -> str | None:
        """What breaks a rule between this record's fields (checked on write and on read); None when nothing."""
        return None

    def to_wds(self) -> dict[str, Any]:
        problem = key_problem(self.key)
        if problem is not None:
            raise SchemaError(f"record key {self.key!r} cannot name its shard members (<key>.json, "
                              f"<key>.<field>.png): {problem}; give it a plain key of letters, digits, '_' and '-'")
        problem = self.problem()
        if problem is not None:
            raise SchemaError(f"record {self.key}: {problem}")
        sample: dict[str, Any] = {"__key__": self.key}
        doc = {"kind": self.KIND, "schema_version": SCHEMA_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.IMAGES:
                sample[f"{f.name}.png"] = encode_png(value)
            elif f.name in self.IMAGE_LISTS:
                doc[f.name] = len(value)
                for i, image in enumerate(value):
                    sample[f"{f.name}.{i}.png"] = encode_png(image)
            elif f.name != "key":
                bad = _non_finite(value, f.name)
                if bad is not None:
                    raise SchemaError(f"record {self.key}: field '{bad[0]}' is {bad[1]}: records are stored as JSON, "
                                      "which has no NaN or infinity; drop the value or store null")
                doc[f.name] = value
        sample["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False, allow_nan=False).encode()
        return sample

    @classmethod
    def from_wds(cls, sample: dict[str, Any], where: str = "") -> "Record":
        key = sample.get("__key__", "?")
        at = f"{where}: record {key}" if where else f"record {key}"
        if "json" not in sample:
            raise SchemaError(f"{at}: missing field 'json'")
        try:
            doc = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SchemaError(f"{at}: field 'json' is not valid JSON ({e})") from None
        if doc.get("kind") != cls.KIND:
            raise SchemaError(f"{at}: kind {doc.get('kind')!r} is not {cls.KIND!r}")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"{at}: schema_version {doc.get('schema_version')!r}, "
                              f"this reader knows {SCHEMA_VERSION}")
        values: dict[str, Any] = {"key": key}
        for f in fields(cls):
            if f.name == "key":
                continue
            if f.name in cls.IMAGES:
                blob = sample.get(f"{f.name}.png")
                if blob is None:
                    raise SchemaError(f"{at}: missing image field '{f.name}.png'")
                try:
                    values[f.name] = decode_png(blob)
                except Exception as e:  # PIL raises several types for bad bytes
                    raise SchemaError(f"{at}: image field '{f.name}.png' cannot be decoded ({e})") from None
            elif f.name in cls.IMAGE_LISTS:
                values[f.name] = cls._image_list(sample, doc, f.name, at)
            elif f.name in doc:
                values[f.name] = doc[f.name]
            elif f.name not in cls.OPTIONAL:  # an optional one takes its dataclass default
                raise SchemaError(f"{at}: missing field '{f.name}'")
        record = cls(**values)
        problem = record.problem()
        if problem is not None:
            raise SchemaError(f"{at}: {problem}")
        return record

    @staticmethod
    def _image_list(sample: dict[str, Any], doc: dict, name: str, at: str) -> list[np.ndarray]:
        count = doc.get(name, 0)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_LIST_IMAGES:
            raise SchemaError(f"{at}: field '{name}' must count its images, 0-{MAX_LIST_IMAGES}, got {count!r}")
        images = []
        for i in range(count):
            blob = sample.get(f"{name}.{i}.png")
            if blob is None:
                raise SchemaError(f"{at}: missing image field '{name}.{i}.png' ({name} counts {count})")
            try:
                images.append(decode_png(blob))
            except Exception as e:  # PIL raises several types for bad bytes
                raise SchemaError(f"{at}: image field '{name}.{i}.png' cannot be decoded ({e})") from None
        return images

    def equals(self, other: "Record") -> bool:
        """Field by field, images byte by byte."""
        if type(self) is not type(other):
            return False
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in self.IMAGES:
                if not _same_image(a, b):
                    return False
            elif f.name in self.IMAGE_LISTS:
                if len(a) != len(b) or not all(_same_image(x, y) for x, y in zip(a, b)):
                    return False
            elif a != b:
                return False
        return True


@dataclass
class ThinkingPair(Record):
    """An abstract request and the concrete steps that carry it out."""

    KIND: ClassVar[str] = "thinking_pair"
    IMAGES: ClassVar[tuple[str, ...]] = ("image", "target")
    key: str
    image: np.ndarray
    abstract_instruction: str
    concrete_instruction: str
    steps: list[str]
    category: str
    target: np.ndarray
    meta: dict = field(default_factory=dict)


@dataclass
class ReflectionSample(Record):
    """A candidate edit judged against the expected target, with the decision to take.

    `restart` (Reflection only): the new instruction is for the source image, not the candidate, as in
    EditThinker, whose refined prompt always re-edits the original; False (and absent in older shards): the
    new instruction edits the candidate again. `target_description` may be "" (imported records carry none).
    """

    KIND: ClassVar[str] = "reflection"
    IMAGES: ClassVar[tuple[str, ...]] = ("source", "candidate")
    OPTIONAL: ClassVar[tuple[str, ...]] = ("restart",)
    key: str
    source: np.ndarray
    instruction: str
    candidate: np.ndarray
    target_description: str
    score: int
    reason: str
    thought: str
    decision: str  # one of RECORD_DECISIONS
    new_instruction: str  # the corrective instruction for Reflection, "" otherwise
    error_type: str
    meta: dict = field(default_factory=dict)
    restart: bool = False  # Reflection only: the next edit starts again from the source with new_instruction

    def problem(self) -> str | None:
        if not isinstance(self.restart, bool):
            return f"field 'restart' is {self.restart!r}, expected true or false"
        if self.restart and self.decision != "Reflection":
            return (f"field 'restart' is true but the decision is {self.decision!r}: restart belongs to Reflection "
                    "(Failed starts again from the source by itself)")
        if self.restart and not (isinstance(self.new_instruction, str) and self.new_instruction.strip()):
            return "field 'restart' is true but 'new_instruction' is empty: a restart needs the instruction to redo"
        return None


@dataclass
class EditPair(Record):
    """A source image, a concrete instruction and its exact target; `extra_sources` are further input images
    ("Picture 2", ...) for models that take several (Qwen-Image-Edit-2509 / 2511)."""

    KIND: ClassVar[str] = "edit_pair"
    IMAGES: ClassVar[tuple[str, ...]] = ("source", "target")
    IMAGE_LISTS: ClassVar[tuple[str, ...]] = ("extra_sources",)
    key: str
    source: np.ndarray
    instruction: str
    target: np.ndarray
    meta: dict = field(default_factory=dict)
    extra_sources: list[np.ndarray] = field(default_factory=list)

    @property
    def sources(self) -> list[np.ndarray]:
        """Every input image, the one edited first."""
        return [self.source, *self.extra_sources]


@dataclass
class TextToImage(Record):
    """A caption and its image."""

    KIND: ClassVar[str] = "text_to_image"
    IMAGES: ClassVar[tuple[str, ...]] = ("image",)
    key: str
    caption: str
    image: np.ndarray
    meta: dict = field(default_factory=dict)


RECORD_KINDS: dict[str, type[Record]] = {
    cls.KIND: cls for cls in (ThinkingPair, ReflectionSample, EditPair, TextToImage)}


def record_from_wds(sample: dict[str, Any], where: str = "") -> Record:
    """Decode a stored sample of any kind, dispatching on its `kind` field."""
    at = f"{where}: record {sample.get('__key__', '?')}"
    if "json" not in sample:
        raise SchemaError(f"{at}: missing field 'json'")
    try:
        kind = json.loads(sample["json"]).get("kind")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise SchemaError(f"{at}: field 'json' is not a valid JSON object ({e})") from None
    if kind not in RECORD_KINDS:
        raise SchemaError(f"{at}: unknown kind {kind!r} in field 'json'; expected one of {list(RECORD_KINDS)}")
    return RECORD_KINDS[kind].from_wds(sample, where)


__all__ = ["EditPair", "RECORD_DECISIONS", "RECORD_KINDS", "Record", "ReflectionSample", "SCHEMA_VERSION", "SchemaError",
           "TextToImage", "ThinkingPair", "decode_png", "encode_png", "key_problem", "record_from_wds"]
