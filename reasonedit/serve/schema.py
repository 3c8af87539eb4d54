"""The edit service's request schema: field types, ranges and defaults, text and image limits, and the
EditThinker compatibility mapping. Every error names the field (and, for a misspelling, the field it
resembles); what a client sent is quoted so that the error itself can always be sent back."""

from __future__ import annotations

import difflib
import io
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np
from PIL import Image as PILImage

from reasonedit.clients.images import decode_base64
from reasonedit.inference.types import EditRequest
from reasonedit.serve.image_header import HeaderError, read_header

log = logging.getLogger(__name__)

# "editthinker" (the default): our fields and the fields EditThinker's client and servers use; "strict": ours only
COMPAT_MODES = ("editthinker", "strict")
DEFAULT_COMPAT = "editthinker"
# EditThinker's client sends these (run_edit_thinker_inference.py, get_model_config); renames keep a meaning
EDITTHINKER_RENAMES = {"num_inference_step": "num_inference_steps", "text_guidance_scale": "guidance_scale"}
# ... and these have none for our editor (its servers ignore width/height too; we never rewrite a prompt; one
# image per request): accepted, not used. Any other name is still an unknown field.
EDITTHINKER_IGNORED = ("enhance_prompt", "width", "height", "image_guidance_scale", "num_images_per_prompt")
EDITTHINKER_FIELDS = (*EDITTHINKER_RENAMES, *EDITTHINKER_IGNORED)


def accepted_shapes(compat: Optional[str]) -> list[str]:
    """The request shapes a server in this compat mode takes (its /health says so)."""
    return ["reasonedit", "editthinker"] if compat == "editthinker" else ["reasonedit"]


def field_label(name: str, most: int = 64) -> str:
    """A client's field name as an error shows it: unpaired surrogates escaped, cut to `most` characters."""
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name if len(name) <= most else name[:most] + "..."


class RequestError(ValueError):
    """A request the service cannot take: answered with `status`, naming `field`."""

    def __init__(self, field: Optional[str], message: str, status: int = 422):
        field = field_label(field) if field else field
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.status = field, status


@dataclass
class Limits:
    """What one request may hold."""

    max_side: int = 2048  # pixels, either side
    max_pixels: int = 2048 * 2048
    max_steps: int = 100
    max_rounds: int = 8
    max_prompt_chars: int = 4000  # prompt and negative_prompt, each: attention's cost grows with the square
    max_fields: int = 64  # fields in one request, JSON or form
    max_json_depth: int = 64
    max_json_values: int = 1024  # containers and their items, over the whole body
    default_steps: int = 28


@dataclass(frozen=True)
class FieldSpec:
    kind: type  # str | int | float | bool
    lo: Optional[float] = None
    hi: Optional[float] = None


FIELDS: dict[str, FieldSpec] = {
    "image": FieldSpec(str),
    "prompt": FieldSpec(str),
    "negative_prompt": FieldSpec(str),
    "seed": FieldSpec(int, 0, 2 ** 63 - 1),
    "guidance_scale": FieldSpec(float, 0.0, 30.0),
    "num_inference_steps": FieldSpec(int, 1, None),  # upper bound: Limits.max_steps
    "think": FieldSpec(bool),
    "reflect": FieldSpec(bool),
    "rounds": FieldSpec(int, 1, None),  # upper bound: Limits.max_rounds
}
# multipart uploads name the file field either way (EditThinker's /edit-upload uses image_file)
UPLOAD_FILE_FIELDS = ("image", "image_file")


@dataclass
class ParsedEdit:
    """A validated request: the edit, whether to run the loop, and what compat mode dropped."""

    request: EditRequest
    think: bool = False
    reflect: bool = False
    rounds: int = 3
    ignored: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def loop(self) -> bool:
        return self.think or self.reflect


TEXT_FIELDS = ("prompt", "negative_prompt")  # the text a model reads: bounded by Limits.max_prompt_chars


def suggest(name: str, compat: Optional[str] = None) -> str:
    known = list(FIELDS) + ["image_file"] + (list(EDITTHINKER_FIELDS) if compat == "editthinker" else [])
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; the fields are {', '.join(FIELDS)}"


class IgnoredFieldLog:
    """Logs each field that compat mode renames or ignores once per server, not once per request; after `most`
    names it logs no new ones, so clients that send new names cannot grow it without end."""

    def __init__(self, most: int = 256) -> None:
        self.seen: set[str] = set()
        self.most = most
        self._lock = threading.Lock()

    def note(self, name: str, how: str) -> None:
        name = field_label(name)
        with self._lock:
            if name in self.seen or len(self.seen) >= self.most:
                return
            self.seen.add(name)
        log.info("compat editthinker: field '%s' %s (logged once)", name, how)


def _coerce(name: str, value: Any, spec: FieldSpec, from_form: bool) -> Any:
    """JSON values must have the field's type; form values are text and are parsed."""
    kind = spec.kind
    if from_form and isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            else:
                value = kind(text)
        except ValueError:
            raise RequestError(name, f"expected {kind.__name__}, got {value[:40]!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer of 309 digits or more: past any float, so past any range
            value = math.inf if value > 0 else -math.inf
    if kind is int and isinstance(value, float) and math.isinf(value):  # 1e999, or over 4300 digits (body.py)
        raise RequestError(name, f"must be a finite integer, got {value}")
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RequestError(name, f"expected {kind.__name__}, got {type(value).__name__} {str(value)[:40]!r}")
    if kind is str:
        check_utf8(name, value)
    if kind is float and not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value}")
    if kind in (int, float):
        if spec.lo is not None and value < spec.lo:
            raise RequestError(name, f"must be at least {spec.lo:g}, got {value}")
        if spec.hi is not None and value > spec.hi:
            raise RequestError(name, f"must be at most {spec.hi:g}, got {value}")
    return value


def check_utf8(name: str, text: str) -> None:
    """Text JSON can carry but UTF-8 cannot (an unpaired surrogate, as `"\\ud800"` decodes to) is refused."""
    if text.isascii():  # the base64 image, most prompts: no copy to check
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(name, f"holds an unpaired surrogate ({ascii(text[e.start])}) at character {e.start}: "
                                 "send surrogates in pairs, or the text as UTF-8") from None


def read_image(raw: bytes, limits: Limits, name: str = "image") -> np.ndarray:
    """Encoded PNG, JPEG or WebP bytes to uint8 (H, W, 3). The format and size come from the header, checked
    before any decoder sees the bytes, so no other format is decoded and no image over the limits is."""
    try:
        header = read_header(raw)
    except HeaderError as e:
        raise RequestError(name, str(e)) from None
    width, height = header.width, header.height
    if max(width, height) > limits.max_side:
        raise RequestError(name, f"{width}x{height} is larger than the {limits.max_side}-pixel side limit")
    if width * height > limits.max_pixels:
        raise RequestError(name, f"{width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}")
    # past the header, the bytes are the client's and Pillow's decoders raise many kinds on damaged data
    # (OSError, SyntaxError for a broken PNG chunk, DecompressionBombError, ...): each is the image's fault
    try:
        im = PILImage.open(io.BytesIO(raw), formats=[header.format])
    except Exception as e:
        raise RequestError(name, f"not a readable {header.format} image ({type(e).__name__})") from None
    if im.size != (width, height):  # a second frame header, say: what would be decoded is not what was checked
        raise RequestError(name, f"its header declares {width}x{height} but its frame is {im.size[0]}x{im.size[1]}")
    try:
        im.load()
        return np.array(im.convert("RGB"))  # writable: torch warns on read-only arrays
    except Exception as e:
        raise RequestError(name, f"image data is damaged ({type(e).__name__}: {e})") from None


def parse_edit(fields: Mapping[str, Any], limits: Limits, *, compat: Optional[str] = DEFAULT_COMPAT,
               image_bytes: Optional[bytes] = None, from_form: bool = False,
               ignored_log: Optional[IgnoredFieldLog] = None) -> ParsedEdit:
    """Validate one request's fields (a JSON object, or form fields plus an uploaded file's bytes). compat
    "editthinker" also takes EditThinker's field names; "strict" (or None) ours only."""
    if compat is not None and compat not in COMPAT_MODES:
        raise ValueError(f"compat {compat!r}: expected one of {', '.join(COMPAT_MODES)}")
    if len(fields) > limits.max_fields:
        raise RequestError("body", f"{len(fields)} fields; a request holds at most {limits.max_fields} fields")
    values: dict[str, Any] = {}
    sent_as: dict[str, str] = {}  # our field -> the name the client used, for errors
    ignored: list[str] = []
    renamed: dict[str, str] = {}
    note: Callable[[str, str], None] = ignored_log.note if ignored_log else (lambda n, h: None)
    for name, value in fields.items():
        check_utf8(name, name)
        if name in FIELDS:
            values[name] = value
        elif compat == "editthinker" and name in EDITTHINKER_RENAMES:
            target = EDITTHINKER_RENAMES[name]
            if target in fields:  # the proper name wins
                ignored.append(name)
                note(name, f"ignored: '{target}' is also given")
            else:
                values[target], sent_as[target] = value, name
                renamed[name] = target
                note(name, f"read as '{target}'")
        elif compat == "editthinker" and name in EDITTHINKER_IGNORED:
            ignored.append(name)
            note(name, "ignored: it has no meaning for this editor")
        elif name in EDITTHINKER_FIELDS:
            raise RequestError(name, "EditThinker's field, and this server takes only its own (--compat strict)"
                                     + suggest(name) + " (--compat editthinker, the default, takes it)")
        else:
            raise RequestError(name, "unknown field" + suggest(name, compat))

    values = {k: v for k, v in values.items() if v is not None}  # null means "the default"
    typed = {k: _coerce(sent_as.get(k, k), v, FIELDS[k], from_form) for k, v in values.items()}

    prompt = typed.get("prompt")
    if prompt is None or not prompt.strip():
        raise RequestError("prompt", "missing or empty: say what to edit")
    for name in TEXT_FIELDS:
        if name in typed and len(typed[name]) > limits.max_prompt_chars:
            raise RequestError(name, f"is {len(typed[name])} characters; the limit is {limits.max_prompt_chars}")
    steps = typed.get("num_inference_steps", limits.default_steps)
    if steps > limits.max_steps:
        raise RequestError(sent_as.get("num_inference_steps", "num_inference_steps"),
                           f"must be at most {limits.max_steps}, got {steps}")
    rounds = typed.get("rounds", 3)
    if rounds > limits.max_rounds:
        raise RequestError("rounds", f"must be at most {limits.max_rounds}, got {rounds}")

    if image_bytes is not None:
        image = read_image(image_bytes, limits)
    elif "image" in typed:
        if not typed["image"]:
            raise RequestError("image", "is empty")
        try:
            raw = decode_base64(typed["image"])
        except ValueError as e:
            raise RequestError("image", str(e)) from None
        image = read_image(raw, limits)
    else:
        raise RequestError("image", "missing: send a base64 PNG in 'image' (or upload a file as multipart)")

    request = EditRequest(image=image, prompt=prompt, seed=typed.get("seed", 0),
                          guidance_scale=typed.get("guidance_scale", 4.0), num_inference_steps=steps,
                          negative_prompt=typed.get("negative_prompt", " "))
    return ParsedEdit(request, think=typed.get("think", False), reflect=typed.get("reflect", False), rounds=rounds,
                      ignored=ignored, renamed=renamed)


__all__ = ["COMPAT_MODES", "DEFAULT_COMPAT", "EDITTHINKER_FIELDS", "EDITTHINKER_IGNORED", "EDITTHINKER_RENAMES",
           "FIELDS", "IgnoredFieldLog", "Limits", "ParsedEdit", "RequestError", "TEXT_FIELDS", "accepted_shapes",
           "check_utf8", "field_label", "parse_edit", "read_image", "suggest"]
