"""Words for the shapes world: referring expressions, edit phrasings, descriptions, captions."""

from __future__ import annotations

import random

from reasonedit.shapes.world import Cell, Edit, Scene, Shape

# Everyday descriptions that name exactly one palette colour: what "thinking" has to resolve.
COLOR_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "red": ("the colour of a ripe tomato", "the colour of a fire engine", "the colour of a strawberry"),
    "orange": ("the colour of a pumpkin", "the colour of a carrot"),
    "yellow": ("the colour of a ripe banana", "the colour of a lemon", "the colour of a sunflower"),
    "green": ("the colour of fresh grass", "the colour of a frog"),
    "blue": ("the colour of a clear daytime sky", "the colour of a sapphire"),
    "purple": ("the colour of an aubergine", "the colour of an amethyst"),
    "pink": ("the colour of a flamingo", "the colour of bubble gum"),
    "brown": ("the colour of chocolate", "the colour of tree bark"),
    "cyan": ("the colour of a tropical lagoon", "the colour of turquoise"),
    "grey": ("the colour of an elephant", "the colour of a rain cloud"),
    "white": ("the colour of fresh snow", "the colour of milk"),
    "black": ("the colour of coal", "as dark as night"),
    "beige": ("the colour of sand",),
    "navy": ("the colour of a sailor's uniform",),
}

_ROW_WORDS = {0: "top", -1: "bottom"}
_COL_WORDS = {0: "left", -1: "right"}


def where(cell: Cell, grid: int) -> str:
    """'row 2, column 3' (1-based), or a corner's name when the cell is a corner."""
    r, c = cell
    rw = _ROW_WORDS.get(r if r == 0 else r - grid)
    cw = _COL_WORDS.get(c if c == 0 else c - grid)
    if rw and cw:
        return f"the {rw}-{cw} corner"
    return f"row {r + 1}, column {c + 1}"


def at(cell: Cell, grid: int) -> str:
    place = where(cell, grid)
    return f"in {place}" if place.startswith("the ") else f"at {place}"


def shape_words(s: Shape, with_size: bool = True) -> str:
    return f"{s.size} {s.color} {s.kind}" if with_size else f"{s.color} {s.kind}"


def refer(scene: Scene, cell: Cell, grid: int, rng: random.Random | None = None) -> str:
    """A phrase that picks out the shape at `cell` and no other shape in `scene`."""
    s = scene.shape_at(cell)
    if s is None:
        raise ValueError(f"no shape at {cell}")
    others = [o for o in scene.shapes if o.cell != cell]
    forms = []
    if all(o.kind != s.kind for o in others):
        forms.append(f"the {s.kind}")
    if all((o.kind, o.color) != (s.kind, s.color) for o in others):
        forms.append(f"the {s.color} {s.kind}")
    if all((o.kind, o.color, o.size) != (s.kind, s.color, s.size) for o in others):
        forms.append(f"the {s.size} {s.color} {s.kind}")
    forms.append(f"the {s.color} {s.kind} {at(cell, grid)}")
    if rng is None:
        return forms[0]
    return rng.choice(forms[:2])  # the shortest unique phrase, or the next one up


# Every phrasing of each concrete edit op; the exact shapes editor parses exactly these.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": ("Make {ref} {color}.", "Change the colour of {ref} to {color}.",
                "Recolour {ref} {color}.", "Paint {ref} {color}."),
    "add": ("Add a {size} {color} {kind} {at}.", "Draw a {size} {color} {kind} {at}.",
            "Put a {size} {color} {kind} {at}."),
    "remove": ("Remove {ref}.", "Delete {ref}.", "Take away {ref}.", "Erase {ref}."),
    "move": ("Move {ref} to {to}.", "Shift {ref} to {to}.", "Place {ref} {at_to} instead."),
    "resize": ("Make {ref} {size}.", "Resize {ref} to {size}.", "Change {ref} to {size} size."),
    "swap": ("Swap {ref} and {ref2}.", "Exchange the positions of {ref} and {ref2}.",
             "Let {ref} and {ref2} trade places."),
    "background": ("Change the background to {color}.", "Make the background {color}.",
                   "Set the background colour to {color}."),
}


def phrase(edit: Edit, scene: Scene, grid: int, rng: random.Random | None = None) -> str:
    """A concrete instruction for `edit` on `scene` (the scene before the edit)."""
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    words = {"color": edit.color, "size": edit.size, "kind": edit.kind}
    if edit.cell is not None and edit.op != "add":
        words["ref"] = refer(scene, edit.cell, grid, rng)
    if edit.op == "add":
        words["at"] = at(edit.cell, grid)
    if edit.op == "move":
        words["to"], words["at_to"] = where(edit.to, grid), at(edit.to, grid)
    if edit.op == "swap":
        words["ref2"] = refer(scene, edit.to, grid, rng)
    text = pick(TEMPLATES[edit.op]).format(**words)
    return text[0].upper() + text[1:]


def join_steps(steps: list[str]) -> str:
    """Concrete steps as one instruction, in the order they are to be carried out."""
    if len(steps) == 1:
        return steps[0]
    return " ".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))


def describe(scene: Scene, grid: int) -> str:
    """A complete description of a scene, in reading order: the expected-target text."""
    if not scene.shapes:
        return f"An empty {scene.background} background."
    parts = [f"a {shape_words(s)} {at(s.cell, grid)}" for s in scene.shapes]
    noun = "shape" if len(parts) == 1 else "shapes"
    return f"A {scene.background} background with {len(parts)} {noun}: " + "; ".join(parts) + "."


def captions(scene: Scene, grid: int) -> tuple[str, ...]:
    """Every phrasing a text-to-image caption of `scene` may take: each is the full description."""
    if not scene.shapes:
        return (describe(scene, grid),)
    parts = [f"a {shape_words(s)} {at(s.cell, grid)}" for s in scene.shapes]
    listing = "; ".join(parts)
    n = len(parts)
    count = "one shape" if n == 1 else f"{n} shapes"
    return (
        f"{count.capitalize()} on a {scene.background} background: {listing}.",
        f"A {scene.background} canvas showing {listing}.",
        describe(scene, grid),
    )


def caption(scene: Scene, grid: int, rng: random.Random) -> str:
    """A text-to-image caption: the full description in one of a few phrasings."""
    if not scene.shapes:
        return describe(scene, grid)
    return rng.choice(captions(scene, grid))


__all__ = ["COLOR_DESCRIPTIONS", "TEMPLATES", "at", "caption", "captions", "describe", "join_steps", "phrase", "refer",
           "shape_words", "where"]
