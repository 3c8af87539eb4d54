"""What the loop talks to: an `Editor` turns (image, prompt) into an edited image; a `Thinker` makes an
instruction concrete and reflects on an edit. The built-in generator and reasoner, HTTP editing services
and OpenAI-compatible chat endpoints all implement these, so the loop is one piece of code for every pair.

Images are uint8 numpy arrays of shape (H, W, 3) everywhere in this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np

DECISIONS = ("success", "reflection", "failed")  # a Reflection's; data.samples.RECORD_DECISIONS capitalised
SHAPES_EDITOR = "shapes"  # the exact shapes-world editor, named where an editor URL would go


@dataclass
class EditRequest:
    """One edit. The defaults are the loop's; services may override them per request."""

    image: np.ndarray  # uint8 (H, W, 3)
    prompt: str
    seed: int = 0
    guidance_scale: float = 4.0
    num_inference_steps: int = 28
    negative_prompt: str = " "
    # further source images ("Picture 2", ...) for a model that takes several (image policy qwen-image-edit-plus)
    extra_images: tuple[np.ndarray, ...] = ()

    @property
    def images(self) -> list[np.ndarray]:
        """Every source image, the one edited first."""
        return [self.image, *self.extra_images]


@runtime_checkable
class Editor(Protocol):
    name: str

    def edit(self, requests: Sequence[EditRequest]) -> list[np.ndarray]:
        """One edited uint8 (H, W, 3) image per request, in order (a batch runs at once where it can)."""


@dataclass
class Reflection:
    """A thinker's verdict on one edited image.

    decision: "success" | "reflection" | "failed"; a reply that could not be parsed is recorded in
        `parse_error` and its decision is "failed".
    instruction: the next instruction (for "reflection"; a thinker may also give one for "failed").
    restart: the next round edits the source (True) or the previous output (False). Our decision format
        restarts on "failed" only; EditThinker's contract re-edits the source every round.
    """

    decision: str
    score: Optional[float] = None  # 0-10; None when the thinker gave none or it did not parse
    reason: str = ""
    description: Optional[str] = None  # the expected target, when the thinker writes one
    thought: str = ""
    instruction: Optional[str] = None
    restart: bool = False
    parse_error: Optional[str] = None
    raw: dict[str, str] = field(default_factory=dict)  # the raw reply of each phase
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase


@runtime_checkable
class Thinker(Protocol):
    """May also carry `loop` ("reasonedit" | "editthinker"): the loop's rules it was built for, which
    `edit_with_reasoning` then follows (an optional attribute, so not a member here)."""

    name: str

    def think(self, sources: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
        """A concrete, executable instruction for each (source, abstract instruction)."""

    def reflect(self, sources: Sequence[np.ndarray], edited: Sequence[np.ndarray], instructions: Sequence[str],
                previous: Sequence[Optional[str]]) -> list[Reflection]:
        """A verdict per sample: `instructions` are the user's, `previous` the instruction that produced `edited`."""


def check_reflect_inputs(sources: Sequence, edited: Sequence, instructions: Sequence, previous: Sequence) -> int:
    """The batch size of a `Thinker.reflect` call; a ValueError unless every list has one entry per sample."""
    n = len(sources)
    if not (len(edited) == len(instructions) == len(previous) == n):
        raise ValueError(f"reflect: {n} sources, {len(edited)} edited, {len(instructions)} instructions, "
                         f"{len(previous)} previous; give one of each per sample")
    return n
