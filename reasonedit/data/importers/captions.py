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
from .records import Context, Planned, build_text_to_image, key_part, row_key
from .rows import DataImportError, image_path, read_rows, read_text, row_object, split_of, text_field

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
    for row in read_rows(path):
        obj = row_object(row)
        caption = text_field(row, "caption").strip()
        image = ("image", image_path(row, "image", obj.get("image"), ctx.root(path)))
        split, key = split_of(row, ctx.split), row_key(tag, row)
        meta = {"origin": row.origin, "image_path": obj["image"]}
        yield Planned(split, TextToImage.KIND, key, row.where,
                      partial(build_text_to_image, key, row.where, caption, image, meta), (image,))


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
        caption = read_text(txt).strip()
        if not caption:
            raise DataImportError(f"{where}: field 'caption': the caption file is empty")
        key = f"{tag}-{key_part(stem)}"
        meta = {"origin": {"file": txt.relative_to(folder).as_posix(), "line": 1},
                "image_path": found[0].relative_to(folder).as_posix()}
        image = ("image", found[0])
        yield Planned(ctx.split, TextToImage.KIND, key, where,
                      partial(build_text_to_image, key, where, caption, image, meta), (image,),
                      key_from="the folder's name and the image's path in it")
