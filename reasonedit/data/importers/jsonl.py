"""The `jsonl` format: edit pairs as JSON objects (one a line, or one JSON array), with image paths.

Each row names a `source` and a `target` image (relative paths from the input's folder or the
image root) and the `instruction` that turns one into the other, which makes an edit pair. A row
that also has an `abstract_instruction` makes a thinking pair as well, whose concrete instruction is
`instruction` split into steps; `extra_sources` (a list of image paths: further input images for models
that take several), `category` and `split` are optional, and any other field is kept in the record's
meta under "extra".
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

from ..samples import MAX_LIST_IMAGES, EditPair, ThinkingPair
from .records import IMPORTED, Context, Planned, build_edit_pair, build_thinking_pair, plan_rows, row_key
from .rows import Row, image_path, json_type, read_rows, row_object, split_of, text_field


_COLUMNS = {"source", "target", "instruction", "abstract_instruction", "category", "split", "extra_sources"}


def plan_jsonl(path: Path, tag: str, ctx: Context) -> Iterator[Planned]:
    """The records of one JSON Lines file of edit pairs."""
    return plan_rows(read_rows(path), ctx, partial(_jsonl_records, tag=tag, ctx=ctx))


def _jsonl_records(row: Row, tag: str, ctx: Context) -> Iterator[Planned]:
    obj = row_object(row)
    root = ctx.root(row.path)
    instruction = text_field(row, "instruction")
    abstract = text_field(row, "abstract_instruction", required=False)
    category = text_field(row, "category", required=False) or IMPORTED
    source = ("source", image_path(row, "source", obj.get("source"), root))
    target = ("target", image_path(row, "target", obj.get("target"), root))
    extra = obj.get("extra_sources", [])
    if not isinstance(extra, list) or len(extra) > MAX_LIST_IMAGES:
        got = f"{len(extra)} paths" if isinstance(extra, list) else json_type(extra)
        raise row.error("extra_sources", f"expected a list of at most {MAX_LIST_IMAGES} image paths, got {got}",
                        reason="wrong_type")
    extras = [(f"extra_sources[{i}]", image_path(row, f"extra_sources[{i}]", p, root)) for i, p in enumerate(extra)]
    split, key = split_of(row, ctx.split), row_key(tag, row)
    meta = {"origin": row.origin, "source_path": obj["source"], "target_path": obj["target"],
            **({"extra_source_paths": extra} if extra else {}),
            "extra": {k: v for k, v in obj.items() if k not in _COLUMNS}}
    yield Planned(split, EditPair.KIND, key, row.where,
                  partial(build_edit_pair, key, row.where, source, instruction, target, meta, extras),
                  (source, target, *extras))
    if abstract is not None:
        yield Planned(split, ThinkingPair.KIND, key, row.where, partial(
            build_thinking_pair, key, row.where, source, abstract, instruction, category, target, meta),
            (source, target))
