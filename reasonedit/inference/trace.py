"""The record of one think -> edit -> reflect run: every round's instruction, image and verdict, and timings.

`Trace.to_dict()` is what `trace.json` holds (images as file names, given by the writer in `report.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from reasonedit.inference.types import Reflection

PHASES = ("think", "edit", "describe", "score", "decide")
TRACE_VERSION = 1


@dataclass
class Round:
    """One edit and, when the loop reflects, its verdict."""

    index: int  # 1-based
    instruction: str  # what the editor was asked to do
    edited_from: str  # "source" | "previous": the image this round edited
    image: np.ndarray  # uint8 (H, W, 3)
    seed: int
    reflection: Optional[Reflection] = None
    timings: dict[str, float] = field(default_factory=dict)  # edit, describe, score, decide (seconds)

    @property
    def score(self) -> Optional[float]:
        return None if self.reflection is None else self.reflection.score

    @property
    def decision(self) -> Optional[str]:
        return None if self.reflection is None else self.reflection.decision


@dataclass
class Trace:
    """One sample's run. `best` indexes `rounds` (0-based): the result round, which the loop's rules (`loop`)
    pick: the best-scored, ties going to Success ("reasonedit"), or the last ("editthinker")."""

    source: np.ndarray
    instruction: str  # the user's
    thought: Optional[str]  # the concrete instruction from think, when it ran
    rounds: list[Round] = field(default_factory=list)
    best: int = 0
    stopped: str = ""  # why the loop ended: success | round_limit | no_reflection
    timings: dict[str, float] = field(default_factory=dict)  # think (this sample's share)
    editor: str = ""
    thinker: str = ""
    loop: str = "reasonedit"  # the loop's rules (reasonedit.inference.loop.LOOP_RULES)

    @property
    def image(self) -> np.ndarray:
        """The result: the image of round `best`."""
        return self.rounds[self.best].image

    @property
    def parse_errors(self) -> int:
        return sum(1 for r in self.rounds if r.reflection is not None and r.reflection.parse_error)

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase summed over the rounds (this sample's share of each batched call)."""
        total = {p: 0.0 for p in PHASES}
        total["think"] += self.timings.get("think", 0.0)
        for r in self.rounds:
            for p, s in r.timings.items():
                total[p] = total.get(p, 0.0) + s
        return total

    def to_dict(self, images: Optional[dict[str, str]] = None) -> dict:
        """A JSON-ready dict; `images` maps "source" and "round_<k>" to the file names the writer used."""
        images = images or {}
        rounds = []
        for r in self.rounds:
            entry = {"round": r.index, "instruction": r.instruction, "edited_from": r.edited_from, "seed": r.seed,
                     "image": images.get(f"round_{r.index}"), "timings": dict(r.timings)}
            if r.reflection is not None:
                f = r.reflection
                entry.update(description=f.description, score=f.score, reason=f.reason, thought=f.thought,
                             decision=f.decision, next_instruction=f.instruction, restart=f.restart,
                             parse_error=f.parse_error, raw=dict(f.raw))
            rounds.append(entry)
        return {"version": TRACE_VERSION, "instruction": self.instruction, "thought": self.thought,
                "editor": self.editor, "thinker": self.thinker, "loop": self.loop, "source": images.get("source"),
                "final": images.get("final"), "best_round": self.rounds[self.best].index if self.rounds else None,
                "stopped": self.stopped, "parse_errors": self.parse_errors, "timings": self.phase_seconds(),
                "rounds": rounds}


__all__ = ["PHASES", "Round", "TRACE_VERSION", "Trace"]
