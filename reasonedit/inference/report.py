"""Write a Trace to a folder: source.png, round_<k>.png, final.png, trace.json, index.html, contact_sheet.png.

Everything is written into a temporary sibling folder, which is renamed to `out` only once complete; an
existing `out` is replaced the same way (moved aside, then removed), so a reader never sees half a trace.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reasonedit.inference.trace import Trace
from reasonedit.publish import staged_folder

SHEET_TILE = 256  # pixels per side of each image on the contact sheet
SHEET_TEXT_LINES = 9


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")


def _round_caption(trace: Trace, k: int) -> list[str]:
    r = trace.rounds[k]
    lines = [f"round {r.index}{' (best)' if k == trace.best else ''}, from {r.edited_from}",
             f"edit: {r.instruction}"]
    f = r.reflection
    if f is not None:
        score = "-" if f.score is None else f"{f.score:g}"
        lines += [f"score {score}: {f.reason}", f"decision: {f.decision}"]
        if f.thought:
            lines.append(f"thought: {f.thought}")
        if f.instruction:
            lines.append(f"next: {f.instruction}")
        if f.parse_error:
            lines.append(f"parse error: {f.parse_error}")
    return lines


def _fit(image: np.ndarray, side: int) -> Image.Image:
    """The image scaled to fit a side x side tile; small images grow with nearest-neighbour (crisp pixels)."""
    tile = Image.fromarray(np.asarray(image, dtype=np.uint8))
    scale = side / max(tile.size)
    size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
    return tile.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Lines of `text` no wider than `width` pixels, broken between words where it can."""
    text = "".join(c if c.isprintable() else " " for c in text)
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for c in word:  # a word wider than the tile is cut where it overflows
            if draw.textlength(line + c, font=font) > width and line:
                lines.append(line)
                line = ""
            line += c
    if line:
        lines.append(line)
    return lines


def contact_sheet(trace: Trace) -> Image.Image:
    """The source, then each round, side by side; under each its instruction, score, decision and thought."""
    font = ImageFont.load_default()
    columns = [(trace.source, ["source", f"request: {trace.instruction}"]
                + ([f"think: {trace.thought}"] if trace.thought else []))]
    columns += [(trace.rounds[k].image, _round_caption(trace, k)) for k in range(len(trace.rounds))]
    text_h = 12 * SHEET_TEXT_LINES + 8
    sheet = Image.new("RGB", (len(columns) * (SHEET_TILE + 8) + 8, SHEET_TILE + text_h + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (image, caption) in enumerate(columns):
        x = 8 + c * (SHEET_TILE + 8)
        tile = _fit(image, SHEET_TILE)
        sheet.paste(tile, (x, 8))
        if c - 1 == trace.best:
            draw.rectangle([x - 3, 5, x + tile.width + 2, 8 + tile.height + 2], outline=(0, 160, 0), width=3)
        lines = [piece for line in caption for piece in _wrap(draw, line, font, SHEET_TILE)][:SHEET_TEXT_LINES]
        for i, line in enumerate(lines):
            draw.text((x, SHEET_TILE + 16 + 12 * i), line, fill="black", font=font)
    return sheet


def _html(trace: Trace, data: dict) -> str:
    e = html.escape
    cells = [f"<td><img src='{e(data['source'])}'><p><b>source</b></p><p>request: {e(trace.instruction)}</p>"
             + (f"<p>think: {e(trace.thought)}</p>" if trace.thought else "") + "</td>"]
    for k, r in enumerate(data["rounds"]):
        style = " class='best'" if k == trace.best else ""
        rows = "".join(f"<p>{e(line)}</p>" for line in _round_caption(trace, k))
        cells.append(f"<td{style}><img src='{e(r['image'])}'>{rows}</td>")
    timings = ", ".join(f"{p} {s:.3f}s" for p, s in data["timings"].items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>reasonedit trace</title><style>"
            "body{font-family:sans-serif} td{vertical-align:top;max-width:280px;padding:6px} "
            "img{max-width:256px;image-rendering:pixelated} .best{outline:3px solid #0a0}</style></head><body>"
            f"<h1>{e(trace.instruction)}</h1><p>editor {e(trace.editor)}, thinker {e(trace.thinker or '-')}; "
            f"stopped: {e(trace.stopped)}; {'best' if trace.loop == 'reasonedit' else 'last'} round "
            f"{data['best_round']} ({e(trace.loop)} loop); parse errors {data['parse_errors']}</p>"
            f"<p>time per phase: {e(timings)}</p><table><tr>{''.join(cells)}</tr></table>"
            "<p><a href='trace.json'>trace.json</a> · <a href='contact_sheet.png'>contact sheet</a></p>"
            "</body></html>\n")


def write_trace(trace: Trace, out: str | os.PathLike) -> Path:
    """Write the trace folder at `out` atomically; returns its path."""
    out = Path(out)
    if not trace.rounds:
        raise ValueError("write_trace: the trace has no rounds")
    with staged_folder(out) as staging:
        names = {"source": "source.png", "final": "final.png"}
        _save_png(trace.source, staging / names["source"])
        _save_png(trace.image, staging / names["final"])
        for r in trace.rounds:
            names[f"round_{r.index}"] = f"round_{r.index}.png"
            _save_png(r.image, staging / names[f"round_{r.index}"])
        data = trace.to_dict(names)
        (staging / "trace.json").write_text(json.dumps(data, indent=2) + "\n")
        (staging / "index.html").write_text(_html(trace, data))
        contact_sheet(trace).save(staging / "contact_sheet.png", format="PNG")
    return out


__all__ = ["contact_sheet", "write_trace"]
