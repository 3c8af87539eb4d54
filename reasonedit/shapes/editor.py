"""The exact shapes editor: concrete instructions of the shapes world's grammar, executed on the scene.

`ShapesEditor(world)` is an `Editor` (reasonedit.inference.types) that reads the source scene back from
its pixels with the exact oracle, parses the instruction into atomic edits (`parse_instruction`), applies
them and renders the result. It does nothing it cannot parse: an unknown phrasing or word, a reference
that picks out no shape or several, or an edit that does not apply returns the source unchanged, and
the reason is counted in `editor.stats`. With a perfect executor, what think and reflect add to a
reasoner is measurable on its own; with `error_rate=p` it makes one of the reflection error types of
`synth.make_candidate` on a share p of the requests it parsed (a draw that is a pure function of the
editor's seed and the request), the offline stand-in for an imperfect generator.

The grammar is exactly what the synthesizer writes for concrete edits (`language.phrase`,
`language.join_steps`): one sentence per step, either as "Step 1: ... Step 2: ..." or as plain sentences
one after another; case and whitespace around sentences are free, nothing else is.
Steps are resolved in order, each against the scene the previous steps left, and applied all or nothing.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from reasonedit.shapes.language import TEMPLATES
from reasonedit.shapes.oracle import Oracle, scene_errors
from reasonedit.shapes.world import KINDS, PALETTE, SIZES, Cell, Edit, EditError, Scene, ShapesWorld, WorldConfig, apply_edit
from reasonedit.shapes.synth import ERROR_TYPES, make_candidate

log = logging.getLogger(__name__)

# Why an instruction did not parse, from the least to the furthest a parse got (the furthest is reported).
PARSE_FAILURES = ("unknown_phrasing", "unknown_word", "outside_world", "no_such_cell", "no_such_shape",
                  "ambiguous_reference", "invalid_edit")
UNREADABLE_SOURCE = "unreadable_source"  # the oracle could not read a cell of the source image
# The error types the editor injects by default: the reflection error types the brief names (wrong colour,
# wrong object, nothing done, a step skipped, one extra change, several); any of synth's may be chosen.
INJECTED_ERRORS = ("wrong_color", "wrong_object", "missing", "incomplete", "extra_change", "over_editing")
INJECTABLE = tuple(t for types in ERROR_TYPES.values() for t in types if t != "correct")

_CORNERS = {"top-left": (0, 0), "top-right": (0, -1), "bottom-left": (-1, 0), "bottom-right": (-1, -1)}
_CORNER_RE = re.compile(r"the (top|bottom)-(left|right) corner")
_ROW_COL_RE = re.compile(r"row ([1-9][0-9]*), column ([1-9][0-9]*)")
_STEP_RE = re.compile(r"(?:^|\s+)step ([1-9][0-9]*):\s+")
_SLOT_RE = re.compile(r"\{(\w+)\}")


class InstructionParseError(ValueError):
    """An instruction the shapes editor cannot execute; `reason` is one of PARSE_FAILURES."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _rank(e: InstructionParseError) -> int:
    return PARSE_FAILURES.index(e.reason)


# -- the grammar's pieces -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ref:
    """A referring expression: 'the kind', 'the colour kind', 'the size colour kind', 'the colour kind AT'."""

    kind: str
    color: Optional[str] = None
    size: Optional[str] = None
    cell: Optional[Cell] = None


def _word(value: str, vocabulary: Sequence[str], what: str) -> str:
    if value not in vocabulary:
        raise InstructionParseError("unknown_word", f"{value!r} is not a {what} ({', '.join(vocabulary)})")
    return value


def _in_world(value: str, allowed: Sequence[str], key: str) -> str:
    if value not in allowed:
        raise InstructionParseError("outside_world", f"{value!r} is not in this world's world.{key} "
                                                     f"({', '.join(allowed)})")
    return value


def _where(text: str, grid: int) -> Cell:
    """'the top-left corner' or 'row R, column C' (1-based) -> a cell."""
    m = _CORNER_RE.fullmatch(text)
    if m:
        r, c = _CORNERS[f"{m.group(1)}-{m.group(2)}"]
        return (r % grid, c % grid)
    m = _ROW_COL_RE.fullmatch(text)
    if m is None:
        raise InstructionParseError("unknown_phrasing", f"{text!r} is not a place ('the top-left corner', "
                                                        "'row 2, column 3')")
    r, c = int(m.group(1)), int(m.group(2))
    if r > grid or c > grid:
        raise InstructionParseError("no_such_cell", f"{text!r} lies outside the {grid}x{grid} grid")
    return (r - 1, c - 1)


def _at(text: str, grid: int) -> Cell:
    """'in the top-left corner' or 'at row R, column C' -> a cell."""
    for prep, corner in (("in ", True), ("at ", False)):
        if text.startswith(prep):
            place = text[len(prep):]
            if (_CORNER_RE.fullmatch(place) is not None) == corner:
                return _where(place, grid)
    raise InstructionParseError("unknown_phrasing", f"{text!r} is not 'in the <corner> corner' or "
                                                    "'at row R, column C'")


def _ref(text: str, grid: int) -> _Ref:
    if not text.startswith("the "):
        raise InstructionParseError("unknown_phrasing", f"{text!r} does not name a shape ('the red circle')")
    words = text[4:].split(" ")
    if len(words) == 1:
        return _Ref(_word(words[0], KINDS, "shape kind"))
    if len(words) == 2:
        return _Ref(_word(words[1], KINDS, "shape kind"), color=_word(words[0], tuple(PALETTE), "colour"))
    if len(words) == 3:
        return _Ref(_word(words[2], KINDS, "shape kind"), color=_word(words[1], tuple(PALETTE), "colour"),
                    size=_word(words[0], SIZES, "size"))
    return _Ref(_word(words[1], KINDS, "shape kind"), color=_word(words[0], tuple(PALETTE), "colour"),
                cell=_at(" ".join(words[2:]), grid))


def _resolve(ref: _Ref, scene: Scene, text: str) -> Cell:
    """The cell of the one shape `ref` picks out in `scene`."""
    hits = [s for s in scene.shapes
            if s.kind == ref.kind and ref.color in (None, s.color) and ref.size in (None, s.size)
            and ref.cell in (None, s.cell)]
    if not hits:
        raise InstructionParseError("no_such_shape", f"{text!r}: the scene has no such shape")
    if len(hits) > 1:
        raise InstructionParseError("ambiguous_reference", f"{text!r} fits {len(hits)} shapes, at "
                                    + ", ".join(f"row {s.row + 1}, column {s.col + 1}" for s in hits))
    return hits[0].cell


def _parts(template: str) -> list[tuple[bool, str]]:
    """(is_slot, text) pieces of a lower-cased template."""
    out, pos = [], 0
    for m in _SLOT_RE.finditer(template):
        if m.start() > pos:
            out.append((False, template[pos:m.start()]))
        out.append((True, m.group(1)))
        pos = m.end()
    if pos < len(template):
        out.append((False, template[pos:]))
    return out


_PARTS = {op: [_parts(t.lower()) for t in ts] for op, ts in TEMPLATES.items()}


def _fillings(parts: list[tuple[bool, str]], text: str, pos: int = 0) -> Iterator[dict[str, str]]:
    """Every way the template's slots can be filled to spell `text` (slots are non-empty)."""
    if not parts:
        if pos == len(text):
            yield {}
        return
    (is_slot, piece), rest = parts[0], parts[1:]
    if not is_slot:
        if text.startswith(piece, pos):
            yield from _fillings(rest, text, pos + len(piece))
        return
    if not rest:
        if pos < len(text):
            yield {piece: text[pos:]}
        return
    literal = rest[0][1]  # a slot is always followed by literal text in these templates
    end = text.find(literal, pos + 1)
    while end != -1:
        for filled in _fillings(rest, text, end):
            yield {piece: text[pos:end], **filled}
        end = text.find(literal, end + 1)


def _edit(op: str, slots: dict[str, str], scene: Scene, cfg: WorldConfig) -> Edit:
    """The atomic edit a template's filled slots mean on `scene`; InstructionParseError when they mean none."""
    grid = cfg.grid
    # read every word before looking at the scene, so an unknown word outranks a missing shape
    color = _word(slots["color"], tuple(PALETTE), "colour") if "color" in slots else None
    size = _word(slots["size"], SIZES, "size") if "size" in slots else None
    kind = _word(slots["kind"], KINDS, "shape kind") if "kind" in slots else None
    refs = {k: _ref(slots[k], grid) for k in ("ref", "ref2") if k in slots}
    at = _at(slots["at"], grid) if "at" in slots else None
    to = _where(slots["to"], grid) if "to" in slots else _at(slots["at_to"], grid) if "at_to" in slots else None
    if op == "background":
        return Edit("background", color=_in_world(color, cfg.backgrounds, "backgrounds"))
    if op == "add":
        return Edit("add", cell=at, kind=_in_world(kind, cfg.kinds, "kinds"),
                    color=_in_world(color, cfg.colors, "colors"), size=_in_world(size, cfg.sizes, "sizes"))
    if color is not None:
        _in_world(color, cfg.colors, "colors")
    if size is not None:
        _in_world(size, cfg.sizes, "sizes")
    cell = _resolve(refs["ref"], scene, slots["ref"])
    if op == "recolor":
        return Edit("recolor", cell=cell, color=color)
    if op == "resize":
        return Edit("resize", cell=cell, size=size)
    if op == "remove":
        return Edit("remove", cell=cell)
    if op == "move":
        return Edit("move", cell=cell, to=to)
    if op == "swap":
        return Edit("swap", cell=cell, to=_resolve(refs["ref2"], scene, slots["ref2"]))
    raise AssertionError(f"no edit for op {op!r}")


def parse_sentence(sentence: str, scene: Scene, world: ShapesWorld | WorldConfig) -> Edit:
    """One concrete step (a lower-case sentence with its full stop) -> the edit it means on `scene`.

    The edit is checked to apply (an EditError is an `invalid_edit`). Raises InstructionParseError.
    """
    cfg = world.config if isinstance(world, ShapesWorld) else world
    found: list[Edit] = []
    best: Optional[InstructionParseError] = None
    for op, templates in _PARTS.items():
        for parts in templates:
            for slots in _fillings(parts, sentence):
                try:
                    edit = _edit(op, slots, scene, cfg)
                    apply_edit(scene, edit)
                except EditError as e:
                    err = InstructionParseError("invalid_edit", f"{sentence!r} does not apply here: {e}")
                except InstructionParseError as e:
                    err = e
                else:
                    if edit not in found:
                        found.append(edit)
                    continue
                if best is None or _rank(err) > _rank(best):
                    best = err
    if len(found) == 1:
        return found[0]
    if found:  # no two templates of the grammar read the same sentence two ways; guard it anyway
        raise InstructionParseError("ambiguous_reference", f"{sentence!r} reads as {len(found)} different edits")
    if best is None:
        raise InstructionParseError("unknown_phrasing", f"{sentence!r} is not a phrasing of any concrete edit")
    raise best


def split_steps(text: str) -> list[str]:
    """An instruction -> its steps, lower-cased, one sentence each ('Step 1: ... Step 2: ...' or sentences)."""
    text = text.strip().lower()
    if not text:
        raise InstructionParseError("unknown_phrasing", "the instruction is empty")
    if text.startswith("step "):
        pieces = _STEP_RE.split(text)
        numbers, bodies = pieces[1::2], [b.strip() for b in pieces[2::2]]
        if pieces[0] or numbers != [str(i) for i in range(1, len(numbers) + 1)]:
            raise InstructionParseError("unknown_phrasing", f"steps are not numbered 1, 2, ... in {text!r}")
        for body in bodies:
            if not body.endswith(".") or "." in body[:-1]:
                raise InstructionParseError("unknown_phrasing", f"step {body!r} is not one sentence ending in '.'")
        return bodies
    sentences = re.split(r"(?<=\.)\s+", text)
    for s in sentences:
        if not s.endswith(".") or "." in s[:-1]:
            raise InstructionParseError("unknown_phrasing", f"{s!r} is not a sentence ending in '.'")
    return sentences


def parse_instruction(text: str, scene: Scene, world: ShapesWorld | WorldConfig) -> list[Edit]:
    """A concrete instruction -> its atomic edits on `scene`, in order; raises InstructionParseError.

    Each step is resolved against the scene the steps before it leave, as the synthesizer phrases them,
    and every step must apply.
    """
    steps, edits = split_steps(text), []
    for k, sentence in enumerate(steps, 1):
        try:
            edit = parse_sentence(sentence, scene, world)
        except InstructionParseError as e:
            if len(steps) == 1:
                raise
            raise InstructionParseError(e.reason, f"step {k}: {e}") from None
        edits.append(edit)
        scene = apply_edit(scene, edit)
    return edits


# -- the editor ----------------------------------------------------------------------------------------
@dataclass
class EditorStats:
    """What the editor did: requests parsed, not parsed (by reason), and errors injected (by type)."""

    requests: int = 0
    parsed: int = 0
    unparsed: Counter = field(default_factory=Counter)  # reason -> requests
    injected: Counter = field(default_factory=Counter)  # error type -> requests
    no_error_possible: int = 0  # drawn for an error, but no error type fits the edit: done correctly

    def to_dict(self) -> dict:
        return {"requests": self.requests, "parsed": self.parsed, "unparsed": dict(self.unparsed),
                "injected": dict(self.injected), "no_error_possible": self.no_error_possible}

    def summary(self) -> str:
        """One line for people: '12 requests: 10 executed, 2 not parsed (unknown_word 2); 3 errors made on purpose'."""
        def counts(c: Counter) -> str:
            return ", ".join(f"{k} {n}" for k, n in c.most_common())

        text = f"{self.requests} requests: {self.parsed} executed, {sum(self.unparsed.values())} not parsed"
        if self.unparsed:
            text += f" ({counts(self.unparsed)})"
        if self.injected:
            text += f"; {sum(self.injected.values())} errors made on purpose ({counts(self.injected)})"
        return text


@dataclass
class EditOutcome:
    """One request's course: the scenes, the parsed edits, and what went wrong on purpose or by parse."""

    source: Scene
    result: Scene  # what was rendered
    edits: list[Edit] = field(default_factory=list)  # empty when the instruction did not parse
    target: Optional[Scene] = None  # the correct result; None when the instruction did not parse
    unparsed: Optional[str] = None  # the reason (PARSE_FAILURES or UNREADABLE_SOURCE)
    message: str = ""
    injected: Optional[str] = None  # the error type made on purpose


class ShapesEditor:
    """The exact shapes-world editor as an `Editor`; see the module docstring.

    error_rate: the probability that a parsed request gets one of `error_types` instead of the right edit.
    seed: with the request (its seed, prompt and image), fixes every draw: reruns give the same images.
    """

    def __init__(self, world: ShapesWorld | WorldConfig | None = None, error_rate: float = 0.0, seed: int = 0,
                 error_types: Sequence[str] = INJECTED_ERRORS):
        self.world = world if isinstance(world, ShapesWorld) else ShapesWorld(world)
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate: must lie in [0, 1], got {error_rate}")
        unknown = [t for t in error_types if t not in INJECTABLE]
        if unknown or not error_types:
            raise ValueError(f"error_types: {unknown or 'none given'}; choose from {list(INJECTABLE)}")
        self.error_rate, self.seed, self.error_types = float(error_rate), int(seed), tuple(error_types)
        self.oracle = Oracle(self.world)
        self.stats = EditorStats()
        self._lock = threading.Lock()
        self.name = self.describe()

    def describe(self) -> str:
        """'shapes (exact)', or with its error rate: 'shapes (exact, error rate 0.30)'."""
        if self.error_rate == 0:
            return "shapes (exact)"
        extra = "" if self.seed == 0 else f", seed {self.seed}"
        if self.error_types != INJECTED_ERRORS:
            extra += ", errors " + "+".join(self.error_types)
        return f"shapes (exact, error rate {self.error_rate:.2f}{extra})"

    def edit(self, requests: Sequence) -> list[np.ndarray]:
        """One image per `EditRequest` (an object with `image`, `prompt` and `seed`), in order."""
        return [self._render(self.outcome(r, i), r.image) for i, r in enumerate(requests)]

    def _render(self, outcome: EditOutcome, source: np.ndarray) -> np.ndarray:
        if outcome.unparsed is not None:
            return np.array(source, dtype=np.uint8, copy=True)
        return self.world.render(outcome.result)

    def outcome(self, request, index: int = 0) -> EditOutcome:
        """What `edit` does with one request, without rendering it."""
        image = self._check(request.image, index)
        reading = self.oracle.read(image)
        source = reading.scene
        if reading.unreadable:
            cells = ", ".join(f"row {r + 1}, column {c + 1}" for r, c in reading.unreadable)
            return self._unparsed(EditOutcome(source, source), UNREADABLE_SOURCE,
                                  f"the source is not a render of this world (cannot read {cells})", request)
        try:
            edits = parse_instruction(request.prompt, source, self.world)
        except InstructionParseError as e:
            return self._unparsed(EditOutcome(source, source), e.reason, str(e), request)
        target = source
        for e in edits:
            target = apply_edit(target, e)
        outcome = EditOutcome(source, target, edits, target)
        if self.error_rate > 0:
            rng = self._rng(request, image)
            if rng.random() < self.error_rate:
                self._inject(outcome, rng)
        with self._lock:
            self.stats.requests += 1
            self.stats.parsed += 1
            if outcome.injected is not None:
                self.stats.injected[outcome.injected] += 1
        return outcome

    def _check(self, image, index: int) -> np.ndarray:
        image = np.asarray(image)
        size = self.world.config.image_size
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"request {index}: image: expected a uint8 (H, W, 3) RGB array, got "
                             f"{image.dtype} {image.shape}")
        if image.shape[:2] != (size, size):
            raise ValueError(f"request {index}: image is {image.shape[1]}x{image.shape[0]} but this shapes world "
                             f"renders {size}x{size} (world.image_size={size}); send a render of the same world "
                             "or set world.image_size")
        return image

    def _unparsed(self, outcome: EditOutcome, reason: str, message: str, request) -> EditOutcome:
        outcome.unparsed, outcome.message = reason, message
        log.debug("shapes editor: not executed (%s): %s; instruction %r", reason, message, request.prompt)
        with self._lock:
            self.stats.requests += 1
            self.stats.unparsed[reason] += 1
        return outcome

    def _rng(self, request, image: np.ndarray) -> random.Random:
        """A generator fixed by the editor's seed and the whole request, so a rerun draws the same."""
        h = hashlib.sha256(f"{self.seed}\0{int(request.seed)}\0{request.prompt}\0{image.shape}\0".encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return random.Random(int.from_bytes(h.digest()[:8], "big"))

    def _inject(self, outcome: EditOutcome, rng: random.Random) -> None:
        """Replace the result by a candidate of one error type that fits this edit (tried in random order)."""
        for kind in rng.sample(self.error_types, len(self.error_types)):
            candidate = make_candidate(self.world, outcome.source, list(outcome.edits), outcome.target, kind, rng)
            if candidate is None or not scene_errors(candidate, outcome.target):
                continue  # this edit cannot carry that error (or the perturbation undid itself)
            try:
                self.world.check(candidate)
            except ValueError:
                continue
            outcome.result, outcome.injected = candidate, kind
            return
        with self._lock:
            self.stats.no_error_possible += 1


__all__ = ["EditOutcome", "EditorStats", "INJECTABLE", "INJECTED_ERRORS", "InstructionParseError",
           "PARSE_FAILURES", "ShapesEditor", "UNREADABLE_SOURCE", "parse_instruction",
           "parse_sentence", "split_steps"]
