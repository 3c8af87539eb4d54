"""The `captions` format: captioned images, as a folder of pairs or as a captions file.

An input is a folder in which each image (`x.png`, `.jpg`, `.jpeg`, `.webp` or `.bmp`, in any
subfolder, hidden files skipped) has its caption in a text file of the same name beside it
(`x.txt`); or a folder holding a `captions.jsonl`, or that file itself, whose rows are
{image, caption[, split]} with image paths. Each image makes one text-to-image record.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

from ..samples import TextToImage
from .records import Context, Planned, build_text_to_image, key_part, plan_rows, row_key
from .rows import DataImportError, Row, image_path, read_rows, read_text, row_object, split_of, text_field

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def plan_captions(path: Path, tag: str, ctx: Context) -> Iterator[Planned]:
    """The records of one captions input: a captions file, or a folder with one or with caption pairs."""
    if path.is_file():
        yield from _caption_rows(path, tag, ctx)
    elif (path / CAPTIONS_FILE).is_file():
        yield from _caption_rows(path / CAPTIONS_FILE, tag, ctx)
    elif path.is_dir():
        yield from _caption_pairs(path, tag, ctx)
    else:
        raise DataImportError(f"{path}: no such folder or file; give a folder of x.png + x.txt pairs or a "
                              f"{CAPTIONS_FILE}")


def _caption_rows(path: Path, tag: str, ctx: Context) -> Iterator[Planned]:
    return plan_rows(read_rows(path), ctx, partial(_caption_row, tag=tag, ctx=ctx))


def _caption_row(row: Row, tag: str, ctx: Context) -> Iterator[Planned]:
    obj = row_object(row)
    caption = text_field(row, "caption").strip()
    image = ("image", image_path(row, "image", obj.get("image"), ctx.root(row.path)))
    split, key = split_of(row, ctx.split), row_key(tag, row)
    meta = {"origin": row.origin, "image_path": obj["image"]}
    yield Planned(split, TextToImage.KIND, key, row.where,
                  partial(build_text_to_image, key, row.where, caption, image, meta), (image,))


def _pair_error(file: Path, line: int | None, field_name: str, problem: str, reason: str) -> DataImportError:
    """The error for one (image, caption) pair of a folder: skippable like a row's."""
    where = f"{file}:{line}" if line is not None else str(file)
    return DataImportError(f"{where}: field '{field_name}': {problem}",
                           at={"file": str(file), "line": line, "row": None}, field=field_name, reason=reason)


def _caption_pairs(folder: Path, tag: str, ctx: Context) -> Iterator[Planned]:
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
        try:
            planned = _caption_pair(folder, tag, ctx, stem, images.get(stem, []), captions.get(stem))
        except DataImportError as e:
            ctx.skip(e)
            continue
        yield planned


def _caption_pair(folder: Path, tag: str, ctx: Context, stem: str, found: list[Path], txt: Path | None) -> Planned:
    if txt is None:
        raise _pair_error(found[0], None, "caption", f"no caption file {stem}.txt beside this image; add one or "
                                                     "move the image out", "missing_caption")
    where = f"{txt}:1"
    if not found:
        raise _pair_error(txt, 1, "image", f"no image named {stem} with a suffix among {', '.join(IMAGE_SUFFIXES)} "
                                           "beside this caption", "missing_image")
    if len(found) > 1:
        raise _pair_error(txt, 1, "image", f"{len(found)} images share its name "
                                           f"({', '.join(p.name for p in found)}); keep one", "ambiguous_image")
    try:
        caption = read_text(txt).strip()
    except DataImportError as e:  # not UTF-8, unreadable: this pair's problem alone
        e.at, e.field, e.reason = {"file": str(txt), "line": 1, "row": None}, "caption", "unreadable_caption"
        raise
    if not caption:
        raise _pair_error(txt, 1, "caption", "the caption file is empty", "empty_field")
    key = f"{tag}-{key_part(stem)}"
    meta = {"origin": {"file": txt.relative_to(folder).as_posix(), "line": 1},
            "image_path": found[0].relative_to(folder).as_posix()}
    image = ("image", found[0])
    return Planned(ctx.split, TextToImage.KIND, key, where,
                   partial(build_text_to_image, key, where, caption, image, meta), (image,),
                   key_from="the folder's name and the image's path in it")
