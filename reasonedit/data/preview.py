"""A PNG contact sheet of a dataset: each kind's images side by side with their text."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..publish import atomic_file
from .samples import EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from .shards import read_records

THUMB = 168
TEXT_W = 620
PAD = 8
DECISION_COLORS = {"Success": (20, 130, 40), "Reflection": (200, 120, 0), "Failed": (190, 30, 30)}


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def _panels(r: Record) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str, tuple]]]:
    """(labelled images, labelled text lines) for one record."""
    black = (0, 0, 0)
    if isinstance(r, EditPair):
        return ([("source", r.source), ("target", r.target)],
                [("edit pair", r.key, black), ("instruction", r.instruction, black)])
    if isinstance(r, ThinkingPair):
        return ([("source", r.image), ("target", r.target)],
                [(f"thinking pair ({r.category})", r.key, black), ("abstract", r.abstract_instruction, black),
                 ("concrete", r.concrete_instruction, (30, 60, 160))])
    if isinstance(r, ReflectionSample):
        lines = [(f"reflection ({r.error_type})", r.key, black), ("instruction", r.instruction, black),
                 ("decision", f"<#{r.decision}>  score {r.score}/10", DECISION_COLORS[r.decision]),
                 ("reason", r.reason, black), ("thought", r.thought, (90, 90, 90))]
        if r.new_instruction:
            label = "new instruction (on the source)" if r.restart else "new instruction"
            lines.append((label, r.new_instruction, (30, 60, 160)))
        return [("source", r.source), ("candidate", r.candidate)], lines
    if isinstance(r, TextToImage):
        return [("image", r.image)], [("text to image", r.key, black), ("caption", r.caption, black)]
    raise TypeError(f"no preview for {type(r).__name__}")


def contact_sheet(records: list[Record]) -> Image.Image:
    font, bold = _font(13), _font(14)
    line_h, chars = 17, 88
    rows = []
    for r in records:
        images, lines = _panels(r)
        wrapped = [(label, textwrap.wrap(f"{label}: {text}", chars) or [""], color) for label, text, color in lines]
        n_lines = sum(len(w) for _, w, _ in wrapped)
        h = max(THUMB + 18, n_lines * line_h) + 2 * PAD
        rows.append((images, wrapped, h))
    width = 2 * (THUMB + PAD) + TEXT_W + 2 * PAD
    sheet = Image.new("RGB", (width, sum(h for _, _, h in rows)), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for images, wrapped, h in rows:
        x = PAD
        for label, img in images:
            thumb = Image.fromarray(img).resize((THUMB, THUMB), Image.NEAREST)
            sheet.paste(thumb, (x, y + PAD))
            draw.text((x, y + PAD + THUMB + 2), label, fill=(90, 90, 90), font=font)
            x += THUMB + PAD
        tx, ty = 2 * (THUMB + PAD) + PAD, y + PAD
        for i, (label, block, color) in enumerate(wrapped):
            for line in block:
                draw.text((tx, ty), line, fill=color, font=bold if i == 0 else font)
                ty += line_h
        draw.line([(0, y + h - 1), (width, y + h - 1)], fill=(200, 200, 200))
        y += h
    return sheet


def _variety(r: Record) -> str:
    if isinstance(r, ReflectionSample):
        return r.decision
    if isinstance(r, ThinkingPair):
        return r.category
    if isinstance(r, EditPair):
        return r.meta.get("op", "")
    return ""


def _varied(records, rows: int, scan: int = 200) -> list[Record]:
    """Up to `rows` records, preferring ones that show a decision, category or op not yet shown."""
    pool = list(itertools.islice(records, scan))
    picked, seen = [], set()
    for r in pool:
        if len(picked) < rows and _variety(r) not in seen:
            picked.append(r)
            seen.add(_variety(r))
    picked += [r for r in pool if r not in picked][:rows - len(picked)]
    return picked


def dataset_sheet(path: str | Path, out: str | Path, rows: int = 3, split: str = "train") -> Path:
    """Write a contact sheet of the first `rows` records of each kind; returns the PNG's path."""
    picked: list[Record] = []
    for kind in ("edit_pair", "thinking_pair", "reflection", "text_to_image"):
        picked += _varied(read_records(path, split=split, kind=kind), rows)
    if not picked:
        raise ValueError(f"{path}: no records in split {split!r}")
    out = Path(out)
    with atomic_file(out) as f:
        contact_sheet(picked).save(f, format="PNG")
    return out


__all__ = ["contact_sheet", "dataset_sheet"]
