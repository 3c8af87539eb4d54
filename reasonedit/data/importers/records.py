"""Planned records and the builders that make them, shared by every import format.

A format turns each checked row into a `Planned` record: its split, kind, key and where it came
from, with a builder that decodes the images only when the record is written. Images are named by
(field, path) pairs so that a file that will not decode is reported against the field that named
it. Imported records get the category (and error type) "imported", since no source format says.
`plan_rows` maps rows one by one: a row that cannot be mapped stops the import, or with `skip_unmapped` is
skipped and recorded in the `Context` with its reason.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from ..samples import EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from .rows import DataImportError, Row

log = logging.getLogger(__name__)

IMPORTED = "imported"  # category / error_type of imported records: the source format does not say


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


# -- planning: rows to records still to build --------------------------------------------------------
ImageRef = tuple[str, Path]  # (the field that names an image, its file), for error messages


@dataclass
class Planned:
    """A record checked field by field whose images are decoded only when it is written."""

    split: str
    kind: str
    key: str
    where: str
    build: Callable[[], Record]
    images: tuple[ImageRef, ...] = ()  # the image files it reads, as (field, path): inputs, kept apart from --out
    key_from: str = "the input file's name and the row's number"  # for an error about the key


@dataclass
class Context:
    """The settings of one import that its formats read, and the rows they skipped."""

    split: str  # for rows that name none
    image_root: Path | None
    skip_unmapped: bool = False
    skipped: list[dict] = field(default_factory=list)  # one report entry per skipped row, in input order

    def root(self, path: Path) -> Path:
        return self.image_root if self.image_root is not None else path.parent

    def skip(self, error: DataImportError) -> None:
        """Skip the row `error` is about when `skip_unmapped` is set (recording why); else raise it."""
        if not self.skip_unmapped or error.at is None:  # an error of the whole input is never skipped
            raise error
        self.skipped.append({**error.at, "reason": error.reason, "field": error.field, "message": str(error)})
        log.debug("skipped %s", error)

    def reasons(self) -> dict[str, int]:
        """Skipped rows counted by reason, most frequent first (ties by name)."""
        counts = Counter(entry["reason"] for entry in self.skipped)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def plan_rows(rows: Iterable[Row], ctx: Context, plan: Callable[[Row], Iterable[Planned]]) -> Iterator[Planned]:
    """The records `plan` makes of each row; a row it cannot map stops the import, or is skipped (`Context.skip`)."""
    for row in rows:
        try:
            records = list(plan(row))  # whole, so a row that fails halfway gives none of its records
        except DataImportError as e:
            ctx.skip(e)
            continue
        yield from records


def key_part(text: str) -> str:
    """`text` made safe inside a sample key."""
    # webdataset cuts a key at its first "." and a "/" makes a tar directory
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def row_key(tag: str, row: Row) -> str:
    """The key of the record(s) made from `row` of the input tagged `tag`."""
    return f"{tag}-{row.index:07d}"


# Builders: each decodes its images (given as (field, path), for error messages) and makes one record.


def build_edit_pair(key: str, where: str, source: ImageRef, instruction: str, target: ImageRef,
                    meta: dict, extra_sources: list[ImageRef] = ()) -> EditPair:
    return EditPair(key, load_image(source[1], where, source[0]), instruction, load_image(target[1], where, target[0]),
                    meta=meta, extra_sources=[load_image(p, where, name) for name, p in extra_sources])


def build_thinking_pair(key: str, where: str, image: ImageRef, abstract: str, concrete: str, category: str,
                        target: ImageRef, meta: dict) -> ThinkingPair:
    return ThinkingPair(key, load_image(image[1], where, image[0]), abstract, concrete, split_steps(concrete),
                        category, load_image(target[1], where, target[0]), meta=meta)


def build_reflection(key: str, where: str, source: ImageRef, instruction: str, candidate: ImageRef, score: int,
                     reason: str, thought: str, decision: str, new_instruction: str, meta: dict,
                     restart: bool = False) -> ReflectionSample:
    # imports carry no expected-target description (""), and do not know how the candidate was made
    return ReflectionSample(key, load_image(source[1], where, source[0]), instruction,
                            load_image(candidate[1], where, candidate[0]), "", score, reason, thought, decision,
                            new_instruction, IMPORTED, meta=meta, restart=restart)


def build_text_to_image(key: str, where: str, caption: str, image: ImageRef, meta: dict) -> TextToImage:
    return TextToImage(key, caption, load_image(image[1], where, image[0]), meta=meta)
