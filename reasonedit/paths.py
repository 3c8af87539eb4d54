"""Where outputs go: every name that becomes part of an output path is checked, and every path is proved to lie
inside its output folder before anything is written there.

Keys, indices, split names, file names and config values come from files anyone can edit; a key such as `../../x`
or `/etc/x`, or a symlink left in an output folder, must never place a file outside that folder. The checks, used
by eval, data synth, data import and train alike:

- `name_problem(name)` / `safe_name(...)`: a name is one plain path component: not empty, not starting with
  "." (so neither "." nor ".." nor a hidden file), no "/" or "\\", no control character, at most
  MAX_NAME_BYTES bytes in UTF-8. `output_file(folder, *names)` builds a path from such names only.
- `relative_name_problem(text)`: a relative path of such names joined by "/" (an experiment name such as
  `sweep/run`, which makes `runs/<name>`).
- `inside(root, path)`: `path` with every symlink resolved still lies under `root` resolved; otherwise
  `OutsidePathError`, naming both.

Unsafe names are refused where they enter (naming the key, the file and the field), not renamed: a silently
renamed output is one that whoever looks for it by its name does not find.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_NAME_BYTES = 200  # leaves room for ".png" and the atomic writer's ".<name>.XXXXXXXX.tmp" within 255


class UnsafeNameError(ValueError):
    """A key or name that cannot be used as one file name inside the output folder."""


class OutsidePathError(ValueError):
    """An output path that resolves (through '..' or a symlink) to somewhere outside its output folder."""


def name_problem(name: object) -> str | None:
    """Why `name` is not one plain file name, or None when it is one."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if name.startswith("."):
        return "it starts with '.' (that makes '.', '..' or a hidden file)"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def relative_name_problem(text: object) -> str | None:
    """Why `text` is not a relative path of plain names joined by '/' ("a", "sweep/run"), or None when it is one."""
    if not isinstance(text, str):
        return f"it is a {type(text).__name__}, not a string"
    if text.startswith("/"):
        return "it is an absolute path"
    for part in text.split("/"):
        problem = name_problem(part)
        if problem is not None:
            return f"its part {part!r} is not a plain name: {problem}" if part != text else problem
    return None


def safe_name(name: object, what: str) -> str:
    """`name` when it is one plain file name; UnsafeNameError naming `what` (e.g. "gedit: FILE:3: key") otherwise."""
    problem = name_problem(name)
    if problem is not None:
        raise UnsafeNameError(f"{what} {name!r} cannot name an output file: {problem}")
    return name  # type: ignore[return-value]


def output_file(folder: str | os.PathLike, *names: str) -> Path:
    """folder / names[0] / ... / names[-1], each name checked by `safe_name` (the last one with its suffix)."""
    for name in names:
        safe_name(name, "output path part")
    return Path(folder).joinpath(*names)


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` once proved to lie under `root`, both with every symlink resolved (the parts of `path` that do not
    exist yet are taken as written); OutsidePathError otherwise."""
    base, target = Path(root).resolve(), Path(path).resolve()
    if target != base and not target.is_relative_to(base):
        raise OutsidePathError(f"{path} resolves to {target}, outside the output folder {base} ('..' or a symlink "
                               "on the way); nothing was written there: remove that link or use another --out")
    return Path(path)


def relative_source(root: Path, rel: object, what: str) -> Path:
    """root / rel for a source file an input names: a relative path without '..' (an image outside the data
    folder would be read and sent on); UnsafeNameError naming `what` otherwise."""
    if not isinstance(rel, str) or not rel:
        raise UnsafeNameError(f"{what} is {rel!r}, not a file name")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or rel.startswith("\\") or ".." in parts or "\x00" in rel:
        raise UnsafeNameError(f"{what} {rel!r} must be a path relative to {root} without '..'")
    return root / rel


__all__ = ["MAX_NAME_BYTES", "OutsidePathError", "UnsafeNameError", "inside", "name_problem", "output_file",
           "relative_name_problem", "relative_source", "safe_name"]
