"""Collect loop trajectories over a dataset: run think -> edit -> reflect on each record, score every round with a
teacher (the exact oracle on shapes data, else a judge), and record it (`reasonedit.data.trajectories`).

Layout under OUT: `images/<key>/source.png` and `round_<k>.png`, and one JSON line per trajectory in
`trajectories.jsonl` (`--shard i/n` with n > 1: `trajectories.part-i-of-n.jsonl`, so processes never share a file).
A trajectory's images are written first (each atomically), then its line is appended with one write and an
fsync, so a killed run leaves each trajectory recorded whole or not at all; a rerun cuts off a torn last line,
skips every key already in any part file of OUT and goes on. `collect.json` holds the settings the first run
used; a rerun with other settings is refused rather than mixing two kinds of trajectory.

The teacher is a `Scorer`: `(source record, edited image) -> (score 0-10 or None, reason)`. This module knows no
world: the oracle scorer is built by the caller that may import the shapes world (the CLI); `JudgeScorer` asks
an OpenAI-compatible vision judge (`eval.judge`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from reasonedit.data.samples import EditPair, ThinkingPair
from reasonedit.data.shards import read_records
from reasonedit.data.trajectories import (Trajectory, TrajectoryRound, append_trajectory, best_index, merge,
                                          recover)
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.paths import output_file, safe_name
from reasonedit.progress import Progress
from reasonedit.publish import atomic_write_text

from .runner import Shard, sample_seed, write_image

log = logging.getLogger(__name__)

KINDS = ("edit_pair", "thinking_pair")
SETTINGS_FILE = "collect.json"


@dataclass
class TrajectorySource:
    """What one trajectory starts from: a dataset record's key, source image and instruction."""

    key: str
    image: np.ndarray
    instruction: str
    category: str
    meta: dict = field(default_factory=dict)


class Scorer(Protocol):
    def __call__(self, source: TrajectorySource, edited: np.ndarray) -> tuple[Optional[float], str]:
        """The teacher's score (0-10, None when it gave none) of `edited` for `source`, and its reason."""


def read_sources(data: str | Path, split: str = "train", kinds: Sequence[str] = KINDS,
                 limit: Optional[int] = None) -> list[TrajectorySource]:
    """The edit pairs (concrete instructions) and thinking pairs (abstract ones) of `split`, `limit` of each kind."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds {','.join(kinds)}: choose among {','.join(KINDS)}")
    out = []
    for kind in kinds:
        n = 0
        for rec in read_records(data, split=split, kind=kind):
            if limit is not None and n >= limit:
                break
            if isinstance(rec, EditPair):
                out.append(TrajectorySource(rec.key, rec.source, rec.instruction, "concrete", dict(rec.meta)))
            elif isinstance(rec, ThinkingPair):
                out.append(TrajectorySource(rec.key, rec.image, rec.abstract_instruction, rec.category,
                                            dict(rec.meta)))
            n += 1
    keys = [s.key for s in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--data {data}: keys repeat across kinds; a trajectory is named by its record's key")
    for key in keys:
        safe_name(key, f"--data {data}: record key")
    return out


JUDGE_PROMPT = ("The first image is the source, the second the result of editing it with this instruction:\n"
                "{instruction}\nHow well does the result carry out the instruction while keeping the rest of the "
                "source? Answer as:\nscore: N (0-10)\nreason: why")
_SCORE = re.compile(r"score\s*[:=]\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)
_REASON = re.compile(r"reason\s*[:=]\s*(.*)", re.IGNORECASE | re.DOTALL)


class JudgeScorer:
    """A judge (`eval.judge.Judge`) as the teacher: one request per round, its `score: N` read back."""

    def __init__(self, judge, prompt: str = JUDGE_PROMPT):
        self.judge, self.prompt = judge, prompt

    def __call__(self, source: TrajectorySource, edited: np.ndarray) -> tuple[Optional[float], str]:
        [(score, reason, error)] = self.score_all([(source.instruction, source.image, edited)])
        return (None, f"no judge reply ({error})") if error is not None else (score, reason)

    def score_all(self, asks: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> list[
            tuple[Optional[float], str, Optional[str]]]:
        """(score 0-10 or None, reason, error) for each (instruction, source, edited), asked in one call (the
        judge's `concurrency` bounds what is in flight); `error` is set, and the score None, when no reply came."""
        from .judge import JudgeRequest

        replies = self.judge.ask([JudgeRequest(self.prompt.format(instruction=instruction), [source, edited])
                                  for instruction, source, edited in asks])
        out = []
        for reply in replies:
            if not reply.ok:
                out.append((None, "", reply.error or "no reply"))
                continue
            m = _SCORE.search(reply.text or "")
            if m is None or not 0 <= float(m.group(1)) <= 10:
                out.append((None, f"judge reply without a score 0-10: {(reply.text or '')[:80]!r}", None))
                continue
            reason = _REASON.search(reply.text or "")
            out.append((float(m.group(1)), reason.group(1).strip() if reason else "", None))
        return out


def part_file(out: Path, shard: Shard) -> Path:
    return out / ("trajectories.jsonl" if shard.count == 1 else
                  f"trajectories.part-{shard.index}-of-{shard.count}.jsonl")


def part_files(out: Path) -> list[Path]:
    return sorted(Path(out).glob("trajectories*.jsonl"))


def check_settings(out: Path, settings: dict) -> None:
    """Record the run's settings on the first run; refuse a rerun (a resume or another shard) with others."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"--out {out}: holds trajectories collected with other settings ({', '.join(diff)}: "
                             f"{', '.join(f'{before.get(k)!r} then {settings.get(k)!r}' for k in diff)}; see {path}); "
                             "give another --out or the same settings")
        return
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


@dataclass
class CollectStats:
    total: int = 0  # this shard's records
    done_before: int = 0
    collected: int = 0


def collect(sources: Sequence[TrajectorySource], editor, thinker, scorer: Scorer, out: str | Path, *,
            rounds: int = 3, seed: int = 0, shard: Shard = Shard(), batch_size: int = 4, think: bool = True,
            loop: Optional[str] = None, steps: int = 28, guidance: float = 4.0,
            progress: Optional[Progress] = None) -> CollectStats:
    """Run the loop on this shard's share of `sources` (every n-th), skipping keys already recorded under `out`,
    and record each trajectory (the module docstring's layout)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = part_file(out, shard)
    recover(mine)
    done = {t.key for t in merge(part_files(out))}
    share = [s for k, s in enumerate(sources) if k % shard.count == shard.index]
    todo = [s for s in share if s.key not in done]
    stats = CollectStats(total=len(share), done_before=len(share) - len(todo))
    if progress is not None and share:
        progress("trajectories", stats.done_before, stats.total)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        traces = edit_with_reasoning(editor, thinker, [s.image for s in batch], [s.instruction for s in batch],
                                     think=think, reflect=True, rounds=rounds,
                                     seed=[sample_seed(seed, s.key) for s in batch], guidance_scale=guidance,
                                     num_inference_steps=steps, loop=loop)
        for source, trace in zip(batch, traces):
            append_trajectory(mine, record(out, source, trace, scorer))
            stats.collected += 1
            if progress is not None:
                progress("trajectories", stats.done_before + stats.collected, stats.total)
    return stats


def record(out: Path, source: TrajectorySource, trace, scorer: Scorer) -> Trajectory:
    """Score every round of `trace`, write its images under OUT/images/<key>/, and return its trajectory."""
    folder = f"images/{source.key}"
    write_image(output_file(out, "images", source.key, "source.png"), source.image)
    rounds = []
    for r in trace.rounds:
        name = f"round_{r.index}.png"
        write_image(output_file(out, "images", source.key, name), r.image)
        score, reason = scorer(source, r.image)
        f = r.reflection
        rounds.append(TrajectoryRound(
            index=r.index, instruction=r.instruction, image=f"{folder}/{name}", edited_from=r.edited_from,
            score=score, reason=reason, decision=f.decision if f else None, thinker_score=f.score if f else None,
            description=(f.description or "") if f else "", thought=f.thought if f else "",
            next_instruction=f.instruction if f else None, restart=bool(f.restart) if f else False))
    return Trajectory(source.key, source.instruction, trace.thought, f"{folder}/source.png", rounds,
                      best_index([r.score for r in rounds]), source.category, source.meta)


def image_loader(out: str | Path) -> Callable[[str], np.ndarray]:
    """Reads a trajectory's image file (a name relative to OUT, as the lines hold them)."""
    from .images import read_rgb

    root = Path(out)

    def load(name: str) -> np.ndarray:
        return read_rgb(output_file(root, *name.split("/")))
    return load


__all__ = ["CollectStats", "JUDGE_PROMPT", "JudgeScorer", "KINDS", "Scorer", "TrajectorySource", "check_settings",
           "collect", "image_loader", "part_file", "part_files", "read_sources", "record"]
