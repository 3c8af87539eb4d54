"""Import datasets that users already have into our shards.

Four formats (see `FORMATS` and `docs/importers.md`), one module each: JSONL edit pairs with image
paths (`jsonl`), LLaMA-Factory sharegpt conversations such as EditThinker's `sft_train.json`
(`sharegpt`), EditThinker's RL rows (`editthinker`), and folders of captioned images (`captions`);
`rows` reads and checks input rows and `records` builds the records. An import reads every row first,
checking each field and that each image file exists, then decodes the images and writes
`OUT/<split>/<kind>-NNNNN.tar` plus `manifest.json` in a hidden sibling directory that is renamed
into place only when complete. A bad row stops the import with a `DataImportError` naming the file,
the line and the field, unless `skip_unmapped` is set: then each row that cannot be mapped is skipped,
counted by reason in the manifest and listed in `OUT/import_report.jsonl` (`REPORT`). A NaN or an infinity
in a record stops the import when it is written. Record keys are made
from input names (anything but letters, digits, `_` and `-` replaced), so no input can name a tar member outside
the shard; a key too long to be a file name is refused when it is planned. `--out` must lie
apart from the inputs: it may not be, hold or lie inside an input file or folder or the image root, nor
hold an image that a row names (replacing it would delete them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..samples import SCHEMA_VERSION, Record, SchemaError, key_problem
from ..shards import DatasetDirError, building_dataset, check_apart, write_manifest, write_records
from reasonedit.config.synth import KINDS, SPLITS
from .captions import plan_captions
from .editthinker import editthinker_score, plan_editthinker_rl
from .jsonl import plan_jsonl
from .records import Context, Planned, key_part, split_steps
from .rows import DataImportError
from .sharegpt import plan_sharegpt

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
REPORT = "import_report.jsonl"  # in OUT with skip_unmapped: one line per skipped row (file, line, row, reason, ...)

_PLANNERS: dict[str, Callable[[Path, str, Context], Iterator[Planned]]] = {
    "jsonl": plan_jsonl, "sharegpt": plan_sharegpt, "editthinker-rl": plan_editthinker_rl,
    "captions": plan_captions}


# -- writing ----------------------------------------------------------------------------------------
def _as_paths(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not paths:
        raise DataImportError("no input given; name at least one file (or, for captions, a folder)")
    return paths


def _tags(paths: list[Path]) -> list[str]:
    """A key prefix per input, from its name; numbered when two inputs share one."""
    stems = [key_part(p.stem if p.suffix else p.name) for p in paths]
    return [s if stems.count(s) == 1 else f"{s}{i}" for i, s in enumerate(stems)]


def _source_entry(path: Path) -> dict:
    entry: dict[str, Any] = {"path": str(path.resolve())}
    if path.is_file():
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entry


def _check_apart(out: Path, inputs: list[tuple[str, Path]]) -> None:
    try:
        check_apart(out, inputs)
    except DatasetDirError as e:
        raise DataImportError(str(e)) from None


def _named_images(planned: list[Planned]) -> list[tuple[str, Path]]:
    """Each image file the rows name, once, with the first row and field that name it."""
    images: dict[Path, str] = {}
    for p in planned:
        for field_name, path in p.images:
            images.setdefault(path, f"the image that {p.where} names in field '{field_name}',")
    return [(what, path) for path, what in images.items()]


def import_dataset(format: str, inputs: str | Path | Sequence[str | Path], out: str | Path, *,
                   shard_size: int = DEFAULT_SHARD_SIZE, split: str = "train", overwrite: bool = False,
                   image_root: str | Path | None = None, skip_unmapped: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Import `inputs` in `format` (a key of `FORMATS`) into a dataset directory `out`; return its manifest.

    `split` is for rows that name none; relative image paths are read from each input's folder, or
    from `image_root`. Nothing is left at `out` unless every row imports, or, with `skip_unmapped`, unless
    every row imports or is skipped (counted in the manifest, listed in `out/import_report.jsonl`).
    """
    if format not in _PLANNERS:
        raise DataImportError(f"unknown import format {format!r}; choose one of {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise DataImportError(f"--split {split!r} is not a split; use one of {', '.join(SPLITS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise DataImportError(f"--shard-size must be a positive number of records, got {shard_size!r}")
    paths, out = _as_paths(inputs), Path(out)
    ctx = Context(split, Path(image_root) if image_root is not None else None, skip_unmapped)
    roots = [("--image-root", ctx.image_root)] if ctx.image_root is not None else []
    _check_apart(out, [("the input", p) for p in paths] + roots)  # before anything is read or deleted

    planned: list[Planned] = []
    seen: dict[tuple[str, str], str] = {}
    for path, tag in zip(paths, _tags(paths)):
        for p in _PLANNERS[format](path, tag, ctx):
            problem = key_problem(p.key)
            if problem is not None:  # the key names the record's tar members: refused now, before anything is written
                raise DataImportError(f"{p.where}: its record key {p.key!r} (made from {p.key_from}) cannot name "
                                      f"shard members: {problem}; shorten those names")
            if (p.kind, p.key) in seen:
                raise DataImportError(f"{p.where}: its key {p.key!r} repeats that of {seen[p.kind, p.key]}; "
                                      "rename one of the files")
            seen[p.kind, p.key] = p.where
            planned.append(p)
    if not planned:
        skipped = ""
        if ctx.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in ctx.reasons().items())
            skipped = f": every row was skipped ({reasons}; the first: {ctx.skipped[0]['message']})"
        raise DataImportError(f"no records to import from {', '.join(map(str, paths))}{skipped}")
    if out.is_dir():  # else it holds no image
        _check_apart(out, _named_images(planned))

    groups: dict[str, dict[str, list[Planned]]] = {}
    for s in SPLITS:  # fixed order, so the manifest is the same whatever order the rows come in
        for kind in KINDS:
            group = [p for p in planned if p.split == s and p.kind == kind]
            if group:
                groups.setdefault(s, {})[kind] = group
    done, total = 0, len(planned)
    shards: dict[str, dict[str, list]] = {}
    writing = [""]  # where the record being written comes from, for its errors

    def write(tmp: Path) -> dict:
        for s, kinds in groups.items():
            (tmp / s).mkdir()
            shards[s] = {}
            for kind, group in kinds.items():
                def built(group: list[Planned] = group, label: str = f"{s}/{kind}") -> Iterator[Record]:
                    nonlocal done
                    for p in group:
                        writing[0] = p.where
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
            "skipped": {"count": len(ctx.skipped), "reasons": ctx.reasons(),
                        "report": REPORT if skip_unmapped else None,
                        "first": [entry["message"] for entry in ctx.skipped[:20]]},
            "shards": shards,
        }
        if skip_unmapped:  # written with the dataset, so it is there exactly when the dataset is
            (tmp / REPORT).write_text("".join(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
                                              for entry in ctx.skipped), encoding="utf-8")
        write_manifest(tmp, manifest)
        return manifest

    try:
        with building_dataset(out, overwrite) as tmp:
            manifest = write(tmp)
    except DatasetDirError as e:
        raise DataImportError(str(e)) from None
    except SchemaError as e:  # a record that cannot be stored (a NaN in its fields): nothing was written
        raise DataImportError(f"{writing[0]}: {e}") from None
    log.info("imported %d records from %d %s input(s) into %s%s", total, len(paths), format, out,
             f"; skipped {len(ctx.skipped)} rows that could not be mapped (see {out / REPORT})" if ctx.skipped else "")
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


__all__ = ["DEFAULT_SHARD_SIZE", "DataImportError", "FORMATS", "REPORT", "editthinker_score", "import_captions",
           "import_dataset", "import_editthinker_rl", "import_jsonl", "import_sharegpt", "split_steps"]
