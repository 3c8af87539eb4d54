"""Reading input rows and checking their fields, shared by every import format.

An input is a JSON Lines file (one JSON value a line, blank lines skipped) or a file holding one JSON
array (LLaMA-Factory's `.json`), read as UTF-8 with an optional byte-order mark. Each value becomes a
`Row` that knows its file, line and position, so a bad field raises a `DataImportError` naming the
file, the line and the field (and carrying the row and a reason code, so `skip_unmapped` can skip it); the
field readers here check strings, splits and image paths. A JSON Lines line that does not parse is that
row's error; a JSON array that does not parse stops the import (nothing after it can be located).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from reasonedit.config.synth import SPLITS


class DataImportError(ValueError):
    """A row or input that cannot be imported; names the file, line and field and what to fix.

    One raised for a single row (by `Row.error`) says where that row is (`at`: its file, line and 0-based row
    number), the field and a short `reason` code (`missing_field`, `bad_score`, ...): with `skip_unmapped` such
    a row is skipped and reported instead of stopping the import. `at` is None for an error of the whole input.
    """

    def __init__(self, message: str, *, at: dict | None = None, field: str | None = None,
                 reason: str = "bad_row") -> None:
        super().__init__(message)
        self.at, self.field, self.reason = at, field, reason


def json_type(value: Any) -> str:
    """`value`'s JSON type with its article, for messages: "an array", "a string", "null"."""
    for types, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (dict, "an object"),
                        (list, "an array")):
        if isinstance(value, types):
            return name
    return "null"


@dataclass
class Row:
    """One input row and where it came from."""

    path: Path
    line: int
    index: int  # 0-based among the file's rows
    value: Any
    in_array: bool = False
    bad_json: str | None = None  # a JSON Lines line that did not parse: why (its value is None)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" + (f" (row {self.index + 1})" if self.in_array else "")

    @property
    def origin(self) -> dict:
        """Kept in each record's meta; the file name only, so shards do not depend on where inputs live."""
        return {"file": self.path.name, "line": self.line, "row": self.index}

    def error(self, field_name: str | None, problem: str, kind: type = DataImportError,
              reason: str = "bad_field") -> DataImportError:
        """The error for this row: `reason` is the short code a skip is counted under."""
        message = f"{self.where}: field '{field_name}': {problem}" if field_name else f"{self.where}: {problem}"
        return kind(message, at={"file": str(self.path), "line": self.line, "row": self.index}, field=field_name,
                    reason=reason)


def read_text(path: Path) -> str:
    """The whole of a UTF-8 text file; a `DataImportError` naming the file (and line) if it cannot be read."""
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


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of a JSON Lines file, or of a file holding one JSON array (LLaMA-Factory's .json)."""
    text = read_text(path)
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        yield from _array_rows(path, text, start + 1)
        return
    index = 0
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            yield Row(path, n, index, json.loads(line))
        except json.JSONDecodeError as e:  # one bad line: the others still parse, so it is that row's error
            yield Row(path, n, index, None, bad_json=f"bad JSON ({e.msg} at column {e.colno})")
        index += 1


def _array_rows(path: Path, text: str, i: int) -> Iterator[Row]:
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
        yield Row(path, line_at(i), index, value, in_array=True)
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
def row_object(row: Row) -> dict:
    """The row's value, which must be a JSON object."""
    if row.bad_json is not None:
        raise row.error(None, row.bad_json, reason="bad_json")
    if not isinstance(row.value, dict):
        raise row.error(None, f"expected a JSON object, got {json_type(row.value)}", reason="not_an_object")
    return row.value


def text_field(row: Row, name: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
    """The string field `name` of an object row; None when it is absent or null and not `required`."""
    obj = row_object(row)
    value = obj.get(name)
    if value is None:
        if required:
            raise row.error(name, "missing; add it as a string" if name not in obj else "is null; a string is required",
                            reason="missing_field")
        return None
    if not isinstance(value, str):
        raise row.error(name, f"expected a string, got {json_type(value)}", reason="wrong_type")
    if not allow_empty and not value.strip():
        raise row.error(name, "is empty; give a non-empty string", reason="empty_field")
    return value


def split_of(row: Row, default: str) -> str:
    """The split a row names in its `split` field, else `default`."""
    split = text_field(row, "split", required=False) or default
    if split not in SPLITS:
        raise row.error("split", f"{split!r} is not a split; use one of {', '.join(SPLITS)}", reason="bad_split")
    return split


def image_path(row: Row, name: str, value: Any, root: Path) -> Path:
    """The file an image field names (relative paths from `root`), checked to exist."""
    if value is None:
        raise row.error(name, "missing; an image path is required", reason="missing_field")
    if not isinstance(value, str):
        raise row.error(name, f"expected an image path (a string), got {json_type(value)}", reason="wrong_type")
    if not value.strip():
        raise row.error(name, "is empty; an image path is required", reason="empty_field")
    relative = not Path(value).is_absolute()
    path = root / value if relative else Path(value)
    if not path.is_file():
        raise row.error(name, f"image file {path} not found" + (f" (relative paths are read from {root}; "
                                                                "set image_root (--image-root) to change that)"
                                                                if relative else ""), reason="missing_image")
    return path
