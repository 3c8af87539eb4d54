"""Loop trajectories as data: their JSONL record, and the filter that turns them into training samples.

A trajectory is one run of think -> edit -> reflect on one dataset record: per round the instruction, the image
file, the score a teacher gave it (the exact oracle or a judge, 0-10), the thinker's verdict. The collector
(`reasonedit.eval.trajectories`) writes one JSON line per trajectory; this module knows no model and reads them.

The filter, ThinkEdit's rules with our choices where they are silent:
1. split: a trajectory whose round scores spread (max - min) more than `rl_spread` is high-variance: its prompt
   goes to the RL stage, not to SFT (the outcome depends on the draw; a group of rollouts learns from it).
2. keep (stable ones): some later round scores at least as well as the first; a one-round trajectory (the thinker
   stopped at once) is kept too, there being no later round to do worse.
3. truncate after the best round (highest teacher score, the earliest on a tie).
4. unroll: each round left becomes a reflection sample labelled by the teacher, not by the thinker: Success when
   the round scores >= `success_score`; else Reflection when the next round scored higher (its instruction is the
   new one; `restart` when it edited the source with an instruction other than the first); else Failed. The first
   round's thought becomes a thinking pair when that round is right.
5. balance the reflection samples to `ratio` (Success:Reflection:Failed, default 1:1:1) by dropping samples of
   the larger classes, chosen by a seeded shuffle; a class with no samples is left out of the ratio.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .samples import RECORD_DECISIONS, ReflectionSample, ThinkingPair

log = logging.getLogger(__name__)

TRAJECTORY_VERSION = 1
RL_PROMPTS_FILE = "rl_prompts.jsonl"  # `write_outputs`' high-variance prompts, one JSON object a line
DEFAULT_RATIO = (1, 1, 1)  # Success : Reflection : Failed


class TrajectoryError(ValueError):
    """A trajectory line or file that cannot be read; the message names the file and line."""


@dataclass
class TrajectoryRound:
    """One edit of a trajectory: what was asked, the image file (relative to the collection folder), the
    teacher's score and reason, and the thinker's verdict."""

    index: int  # 1-based
    instruction: str
    image: str
    edited_from: str  # "source" | "previous"
    score: Optional[float]  # the teacher's (oracle or judge), 0-10; None when it gave none
    reason: str = ""  # the teacher's
    decision: Optional[str] = None  # the thinker's: success | reflection | failed
    thinker_score: Optional[float] = None
    description: str = ""
    thought: str = ""
    next_instruction: Optional[str] = None
    restart: bool = False


@dataclass
class Trajectory:
    """One record's run; `best` (0-based) is the round the teacher scored highest, the earliest on a tie."""

    key: str
    instruction: str
    thought: Optional[str]
    source: str  # the source image's file, relative to the collection folder
    rounds: list[TrajectoryRound]
    best: int = 0
    category: str = ""
    meta: dict = field(default_factory=dict)

    def to_line(self) -> str:
        doc = {"version": TRAJECTORY_VERSION, **asdict(self)}
        return json.dumps(doc, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, doc: dict, where: str = "") -> "Trajectory":
        try:
            if doc.get("version") != TRAJECTORY_VERSION:
                raise TrajectoryError(f"version {doc.get('version')!r}, this reader knows {TRAJECTORY_VERSION}")
            rounds = [TrajectoryRound(**r) for r in doc["rounds"]]
            if not rounds:
                raise TrajectoryError("field 'rounds' is empty")
            values = {k: doc[k] for k in ("key", "instruction", "thought", "source", "best")}
            return cls(rounds=rounds, category=doc.get("category", ""), meta=doc.get("meta", {}), **values)
        except (KeyError, TypeError) as e:
            raise TrajectoryError(f"{where}: not a trajectory ({type(e).__name__}: {e})") from None
        except TrajectoryError as e:
            raise TrajectoryError(f"{where}: {e}") from None

    @property
    def scores(self) -> list[Optional[float]]:
        return [r.score for r in self.rounds]


# -- the JSONL file: append whole lines, resume after a kill --------------------------------------------------
def recover(path: str | os.PathLike) -> int:
    """Cut a trailing partial line (a writer killed mid-line) off `path`; returns the bytes dropped (0: none)."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: dropped a partial last line (%d bytes) left by an interrupted run", path, len(data) - end)
    return len(data) - end


def read_trajectories(path: str | os.PathLike) -> list[Trajectory]:
    """Every complete line of `path`; a partial last line (no newline: its writer is still at it or was killed)
    is skipped, any other bad line is a TrajectoryError naming the file and line."""
    path = Path(path)
    out = []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1], 1):  # lines[-1] is "" or the partial line
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrajectoryError(f"{path}:{number}: not JSON ({e}); remove the line and run again") from None
        out.append(Trajectory.from_dict(doc, f"{path}:{number}"))
    return out


def append_trajectory(path: str | os.PathLike, trajectory: Trajectory) -> None:
    """Append one whole line with a single write, then fsync: after a kill the line is there whole or not at all
    (a torn write leaves a partial last line, which `recover` cuts off)."""
    data = trajectory.to_line().encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def merge(files: Iterable[str | os.PathLike]) -> list[Trajectory]:
    """The trajectories of several part files, one per key (the first file's on a duplicate), sorted by key."""
    seen: dict[str, Trajectory] = {}
    for path in files:
        for t in read_trajectories(path):
            if t.key in seen:
                log.warning("%s: key %s recorded twice; keeping the first", path, t.key)
                continue
            seen[t.key] = t
    return [seen[k] for k in sorted(seen)]


# -- the filter -------------------------------------------------------------------------------------------------
def _score(s: Optional[float]) -> float:
    return float("-inf") if s is None else float(s)


def best_index(scores: Sequence[Optional[float]]) -> int:
    """The highest score's index, the earliest on a tie; an unscored round ranks last."""
    return max(range(len(scores)), key=lambda i: (_score(scores[i]), -i))


def spread(t: Trajectory) -> float:
    """max - min of the scored rounds (0 with fewer than two)."""
    scored = [s for s in t.scores if s is not None]
    return max(scored) - min(scored) if len(scored) > 1 else 0.0


def is_high_variance(t: Trajectory, rl_spread: float) -> bool:
    return spread(t) > rl_spread


def keep(t: Trajectory) -> bool:
    """A later round scores at least as well as the first, or there is no later round."""
    if len(t.rounds) == 1:
        return True
    first = _score(t.rounds[0].score)
    return any(r.score is not None and _score(r.score) >= first for r in t.rounds[1:])


def truncate(t: Trajectory) -> Trajectory:
    """The trajectory up to and with its best round."""
    b = best_index(t.scores)
    return Trajectory(t.key, t.instruction, t.thought, t.source, list(t.rounds[:b + 1]), b, t.category, dict(t.meta))


@dataclass(frozen=True)
class UnrolledSample:
    """One training sample a trajectory gives, before its images are read: a reflection sample on round
    `round` (1-based) with its label, or (kind "thinking_pair") the first round's thought."""

    key: str
    trajectory: str
    kind: str  # "reflection" | "thinking_pair"
    round: int
    decision: str = ""  # reflection: one of RECORD_DECISIONS
    new_instruction: str = ""
    restart: bool = False


def unroll(t: Trajectory, success_score: float = 10.0) -> list[UnrolledSample]:
    """The samples of a (truncated) trajectory, labelled by the teacher's scores (module docstring, step 4)."""
    out = []
    first = t.rounds[0]
    for i, r in enumerate(t.rounds):
        nxt = t.rounds[i + 1] if i + 1 < len(t.rounds) else None
        decision, new, restart = "Failed", "", False
        if r.score is not None and r.score >= success_score:
            decision = "Success"
        elif nxt is not None and _score(nxt.score) > _score(r.score):
            if nxt.edited_from == "previous":
                decision, new = "Reflection", nxt.instruction
            elif nxt.instruction != first.instruction:  # a new instruction for the source: a restart
                decision, new, restart = "Reflection", nxt.instruction, True
        out.append(UnrolledSample(f"{t.key}_r{r.index}", t.key, "reflection", r.index, decision, new, restart))
    if t.thought and first.score is not None and first.score >= success_score:
        out.append(UnrolledSample(f"{t.key}_think", t.key, "thinking_pair", first.index))
    return out


def balance(samples: Sequence[UnrolledSample], ratio: Sequence[float] = DEFAULT_RATIO,
            seed: int = 0) -> list[UnrolledSample]:
    """Reflection samples cut down to `ratio` of Success:Reflection:Failed (classes with none left out), the
    dropped ones picked by a shuffle seeded by `seed`; thinking pairs pass untouched; the order is kept."""
    if len(ratio) != len(RECORD_DECISIONS) or any(w <= 0 for w in ratio):
        raise ValueError(f"ratio {tuple(ratio)}: give three positive weights for {':'.join(RECORD_DECISIONS)}")
    by_class = {d: [s for s in samples if s.kind == "reflection" and s.decision == d] for d in RECORD_DECISIONS}
    weight = dict(zip(RECORD_DECISIONS, ratio))
    present = [d for d in RECORD_DECISIONS if by_class[d]]
    if not present:
        return list(samples)
    unit = min(len(by_class[d]) / weight[d] for d in present)
    chosen: set[str] = set()
    for d in present:
        n = int(unit * weight[d] + 1e-9)
        keys = sorted(s.key for s in by_class[d])
        random.Random(f"{seed}:{d}").shuffle(keys)
        chosen.update(keys[:n])
    return [s for s in samples if s.kind != "reflection" or s.key in chosen]


def parse_ratio(text: str) -> tuple[float, float, float]:
    """'3:1:1' -> (3.0, 1.0, 1.0)."""
    try:
        parts = tuple(float(p) for p in text.split(":"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(not p > 0 for p in parts):
        raise ValueError(f"--balance {text!r}: expected three positive numbers S:R:F, e.g. 1:1:1 or 3:1:1")
    return parts  # type: ignore[return-value]


@dataclass
class FilterSettings:
    rl_spread: float = 5.0  # a score spread above this: an RL prompt
    success_score: float = 10.0  # a round scoring at least this is right (the oracle's exact match)
    ratio: tuple[float, float, float] = DEFAULT_RATIO
    seed: int = 0
    balance: bool = True


@dataclass
class FilterResult:
    """What the filter made of a set of trajectories, with the keys at each step for the report."""

    rl: list[Trajectory]
    kept: list[Trajectory]
    dropped: list[str]
    truncated: list[Trajectory]
    unrolled: list[UnrolledSample]
    samples: list[UnrolledSample]  # balanced

    def counts(self) -> dict:
        def by_decision(samples):
            return {d: sum(1 for s in samples if s.kind == "reflection" and s.decision == d) for d in RECORD_DECISIONS}
        return {"rl_prompts": len(self.rl), "stable": len(self.kept) + len(self.dropped), "kept": len(self.kept),
                "dropped": len(self.dropped), "unrolled": by_decision(self.unrolled),
                "balanced": by_decision(self.samples),
                "thinking_pairs": sum(1 for s in self.samples if s.kind == "thinking_pair")}


def filter_trajectories(trajectories: Sequence[Trajectory], settings: FilterSettings = FilterSettings()) -> FilterResult:
    """Split, keep, truncate, unroll and balance (the module docstring's steps 1-5)."""
    rl = [t for t in trajectories if is_high_variance(t, settings.rl_spread)]
    stable = [t for t in trajectories if not is_high_variance(t, settings.rl_spread)]
    kept = [t for t in stable if keep(t)]
    dropped = [t.key for t in stable if not keep(t)]
    truncated = [truncate(t) for t in kept]
    unrolled = [s for t in truncated for s in unroll(t, settings.success_score)]
    samples = balance(unrolled, settings.ratio, settings.seed) if settings.balance else list(unrolled)
    return FilterResult(rl, kept, dropped, truncated, unrolled, samples)


# -- the samples as records -------------------------------------------------------------------------------------
_STEP = re.compile(r"\s*step [0-9]+:\s*", re.IGNORECASE)


def _steps(thought: str) -> list[str]:
    parts = [p.strip() for p in _STEP.split(thought) if p.strip()]
    return parts or [thought.strip()]


def to_records(samples: Sequence[UnrolledSample], trajectories: Sequence[Trajectory],
               load_image: Callable[[str], np.ndarray]) -> Iterable[ReflectionSample | ThinkingPair]:
    """The records of `samples` in the reflection-sample and thinking-pair schema; `load_image(name)` reads a
    trajectory's image file. The thinker's reflection thought is kept when its decision agrees with the label,
    else the teacher's reason stands in for it."""
    by_key = {t.key: t for t in trajectories}
    for s in samples:
        t = by_key[s.trajectory]
        r = next(x for x in t.rounds if x.index == s.round)
        meta = {"trajectory": t.key, "round": r.index, "thinker_decision": r.decision, **t.meta}
        if s.kind == "thinking_pair":
            yield ThinkingPair(s.key, load_image(t.source), t.instruction, t.thought or "", _steps(t.thought or ""),
                               t.category or "trajectory", load_image(r.image), meta=meta)
            continue
        agrees = (r.decision or "").capitalize() == s.decision and r.thought
        yield ReflectionSample(s.key, load_image(t.source), t.instruction, load_image(r.image), r.description or "",
                               int(round(r.score or 0)), r.reason, r.thought if agrees else (r.reason or s.decision),
                               s.decision, s.new_instruction, "trajectory", meta=meta, restart=s.restart)


def write_outputs(folder: str | os.PathLike, result: FilterResult, load_image: Callable[[str], np.ndarray],
                  *, shard_size: int = 1000, split: str = "train", settings: Optional[FilterSettings] = None) -> dict:
    """Write what `result` holds under `folder`: `sft/` (a dataset of reflection samples and thinking pairs in
    `split`, with its manifest: what `reasonedit train --data` reads), `rl_prompts.jsonl` (one high-variance
    prompt a line: key, instruction, source image file, meta, scores, and the best round's instruction as
    `reference`: what `rl.prompts` reads, `read_rl_prompts`) and `filter.json` (the counts). Each
    appears whole or not at all, an older one replaced only once the new one is whole."""
    from ..publish import atomic_write_text
    from .samples import SCHEMA_VERSION
    from .shards import building_dataset, write_manifest, write_records

    folder = Path(folder)
    trajectories = result.truncated
    records = list(to_records(result.samples, trajectories, load_image))
    with building_dataset(folder / "sft", overwrite=True) as tmp:
        (tmp / split).mkdir()
        shards, counts = {}, {}
        for kind in ("reflection", "thinking_pair"):
            mine = [r for r in records if r.KIND == kind]
            if mine:
                shards[kind] = write_records(mine, tmp / split, kind, shard_size)
                counts[kind] = len(mine)
        write_manifest(tmp, {"schema_version": SCHEMA_VERSION, "generator": "reasonedit.data.trajectories",
                             "settings": asdict(settings) if settings is not None else {},
                             "counts": {split: counts}, "shards": {split: shards}})
    lines = [json.dumps({"key": t.key, "instruction": t.instruction, "source": t.source, "category": t.category,
                         "scores": t.scores, "spread": spread(t), "reference": t.rounds[t.best].instruction,
                         "meta": t.meta}, sort_keys=True, allow_nan=False)
             for t in result.rl]
    atomic_write_text(folder / RL_PROMPTS_FILE, "".join(line + "\n" for line in lines))
    counts = result.counts()
    atomic_write_text(folder / "filter.json", json.dumps(counts, indent=2, sort_keys=True) + "\n")
    return counts


# -- the RL prompts, as the rl stage reads them (`rl.prompts`) ---------------------------------------------------
PROMPT_DATASET_VERSION = 1  # of the dataset `write_prompt_dataset` derives; a new one is built when it changes


@dataclass
class RLPrompt:
    """One line of an rl_prompts.jsonl: a source image and the request the rl stage's think rollouts answer."""

    key: str
    instruction: str
    source: Path  # the source image's file, resolved against the folder holding the file
    line: int  # where it was read: errors about it name `file:line`
    reference: str = ""  # the best round's concrete instruction: sizes the packed row, never a label
    category: str = ""
    scores: list = field(default_factory=list)
    spread: float = 0.0
    meta: dict = field(default_factory=dict)  # the source record's (shapes data: source_scene, target_scene, edits)


def rl_prompts_file(path: str | os.PathLike, what: str = "rl.prompts") -> Path:
    """`path` itself when it is a file, else `path`/rl_prompts.jsonl (a `reasonedit data trajectories` folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / RL_PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist; give an rl_prompts.jsonl or the folder "
                                "`reasonedit data trajectories --out` wrote it to")
    return path


_PROMPT_FIELDS = {"key": str, "instruction": str, "source": str}  # required, non-empty
_PROMPT_OPTIONAL = {"reference": (str,), "category": (str,), "scores": (list,), "spread": (int, float),
                    "meta": (dict,)}


def read_rl_prompts(path: str | os.PathLike) -> list[RLPrompt]:
    """Every prompt of an rl_prompts.jsonl, each checked: JSON, the required fields (key, instruction, source)
    non-empty strings, the optional ones of their type, keys unique, the source image present. The first bad line
    is a TrajectoryError naming the file, the line and the field; an empty file is one too."""
    path = Path(path)
    out, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrajectoryError(f"{where}: not JSON ({e}); fix or remove the line") from None
        if not isinstance(doc, dict):
            raise TrajectoryError(f"{where}: a {type(doc).__name__}, not a JSON object with key, instruction, source")
        for name, kind in _PROMPT_FIELDS.items():
            if name not in doc:
                raise TrajectoryError(f"{where}: field {name!r} is missing; each line needs key, instruction and "
                                      "source (what `reasonedit data trajectories` writes)")
            if not isinstance(doc[name], kind) or not doc[name].strip():
                raise TrajectoryError(f"{where}: field {name!r} is {doc[name]!r}; expected a non-empty string")
        for name, kinds in _PROMPT_OPTIONAL.items():
            if name in doc and not isinstance(doc[name], kinds):
                raise TrajectoryError(f"{where}: field {name!r} is {doc[name]!r}; expected a "
                                      f"{' or '.join(k.__name__ for k in kinds)}")
        if doc["key"] in seen:
            raise TrajectoryError(f"{where}: field 'key' {doc['key']!r} repeats line {seen[doc['key']]}; keys name "
                                  "the prompts' records and must be unique")
        seen[doc["key"]] = number
        source = Path(doc["source"])
        source = source if source.is_absolute() else path.parent / source
        if not source.is_file():
            raise TrajectoryError(f"{where}: field 'source': the image {source} does not exist (a relative path is "
                                  f"read from {path.parent}); copy the trajectories' images/ folder with the file")
        out.append(RLPrompt(doc["key"], doc["instruction"], source, number, doc.get("reference", ""),
                            doc.get("category", ""), list(doc.get("scores", [])), float(doc.get("spread", 0.0)),
                            dict(doc.get("meta", {}))))
    if not out:
        raise TrajectoryError(f"{path}: holds no prompts (an empty file: no trajectory's scores spread more than "
                              "--rl-spread); collect more trajectories or lower --rl-spread")
    return out


def prompt_records(prompts: Sequence[RLPrompt], load_image: Callable[[Path], np.ndarray],
                   target_image: Callable[[RLPrompt], Optional[np.ndarray]]) -> Iterable[ThinkingPair]:
    """Each prompt as the thinking pair the rl stage's think role rolls out from: its source image and request,
    the best round's instruction as the reference answer, `target_image(prompt)` as the target (None: the source
    stands in, for rewards that need no target) and the prompt's meta, with where it came from."""
    for p in prompts:
        image = load_image(p.source)
        target = target_image(p)
        reference = p.reference.strip() or p.instruction
        meta = {**p.meta, "rl_prompt": {"line": p.line, "scores": p.scores, "spread": p.spread}}
        yield ThinkingPair(p.key, image, p.instruction, reference, [reference], p.category or "rl_prompt",
                           image if target is None else target, meta=meta)


def write_prompt_dataset(out: str | os.PathLike, records: Iterable[ThinkingPair], manifest: dict,
                         split: str = "train", shard_size: int = 1000) -> Path:
    """Write `records` as a dataset at `out`, built in a hidden sibling and renamed into place whole: a process
    that finds `out` already there (another rank built it first) keeps that one, so ranks may race safely."""
    from ..publish import staged_folder
    from .samples import SCHEMA_VERSION
    from .shards import write_manifest, write_records

    out = Path(out)
    with staged_folder(out, keep_existing=True) as staging:
        (staging / split).mkdir()
        shards = write_records(records, staging / split, ThinkingPair.KIND, shard_size)
        write_manifest(staging, {"schema_version": SCHEMA_VERSION, "generator": "reasonedit.data.trajectories",
                                 **manifest, "counts": {split: {ThinkingPair.KIND: sum(x["count"] for x in shards)}},
                                 "shards": {split: {ThinkingPair.KIND: shards}}})
    return out


__all__ = ["DEFAULT_RATIO", "FilterResult", "FilterSettings", "PROMPT_DATASET_VERSION", "RLPrompt", "RL_PROMPTS_FILE",
           "TRAJECTORY_VERSION", "Trajectory", "TrajectoryError",
           "TrajectoryRound", "UnrolledSample", "append_trajectory", "balance", "best_index", "filter_trajectories",
           "is_high_variance", "keep", "merge", "parse_ratio", "read_trajectories", "recover", "spread", "to_records",
           "truncate", "unroll", "prompt_records", "read_rl_prompts", "rl_prompts_file",
           "write_outputs", "write_prompt_dataset"]
