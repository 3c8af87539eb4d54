"""What the rl stage added: the reasoner before and after it, on the same held-out samples, with binomial noise.

`compare_reasoners({"sft": DIR, "rl": DIR}, data_dir, world, out_dir)` measures each model folder's reasoner on
the first `n` held-out records of each kind (the test split of a `reasonedit data synth` dataset):

| figure | what | on |
| --- | --- | --- |
| think | thoughts that, executed exactly by the shapes editor on the source, give the target scene | thinking pairs |
| decide | decisions right when the decide role is given the sample's expected description, score and reason (what the rl stage's decide prompts hold) | reflection samples |
| decision | decisions right from the reasoner's own describe, score and decide (the loop's reflection) | reflection samples |
| think_reflect | the loop's result is exactly the target, with the shapes editor wrong on purpose on `error_rate` of its edits | abstract instructions |
| think_reflect_concrete | the same | concrete instructions |

Each figure is a count of n, reported with its Wilson 95 % interval; the change between the first model and each
later one with the two-proportion z statistic. |z| > 1.96 is a change outside binomial noise at 95 % (the
samples are the same for both models, so the test is conservative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .heldout import HeldOut, reflect_figures, think_figures

FIGURES = ("think", "decide", "decision", "think_reflect", "think_reflect_concrete")
LABELS = {"think": "thoughts that execute to the target", "decide": "decide role right (true description, score)",
          "decision": "reflection decisions right (own describe, score, decide)",
          "think_reflect": "think_reflect success on abstract edits",
          "think_reflect_concrete": "think_reflect success on concrete edits"}


@dataclass(frozen=True)
class Count:
    """`right` of `n` samples."""

    right: int
    n: int

    @property
    def rate(self) -> float:
        return self.right / self.n if self.n else 0.0

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson's score interval of the rate."""
        if not self.n:
            return 0.0, 1.0
        p, n = self.rate, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z(before: Count, after: Count) -> float:
    """z of the change in rate, pooled variance; 0 when neither varies."""
    if not before.n or not after.n:
        return 0.0
    pooled = (before.right + after.right) / (before.n + after.n)
    var = pooled * (1 - pooled) * (1 / before.n + 1 / after.n)
    return (after.rate - before.rate) / math.sqrt(var) if var > 0 else 0.0


def decide_count(thinker, samples: Sequence) -> Count:
    """Decisions of the decide role alone, given each reflection sample's expected description, score and reason."""
    from reasonedit.models import prompts
    from reasonedit.models.prompts import ThinkerReplyError

    conversations = [prompts.decide(s.source, s.instruction, s.target_description, int(s.score), s.reason)
                     for s in samples]
    replies = thinker.generate(conversations) if conversations else []
    right = 0
    for s, reply in zip(samples, replies):
        try:
            right += prompts.parse_decision(reply).kind == s.decision.lower()
        except ThinkerReplyError:
            pass
    return Count(right, len(samples))


def reasoner_counts(model_dir: Path, heldout: HeldOut, world: Any, data_dir: Path, out_dir: Path, *,
                    error_rate: float, rounds: int, seed: int, device: Optional[str] = None) -> dict[str, Count]:
    """The four figures of one model folder's reasoner (its generator is not used: the shapes editor edits);
    `world` is the data's `ShapesWorld` (the caller builds it: only the top layer and the world's users import it)."""
    from ..inference.pipeline import Pipeline
    from .ablation import run_shapes_ablation

    pipeline = Pipeline.load(model_dir, components=("reasoner",), device=device)
    thinker = pipeline.thinker()
    model = pipeline.model
    was_training = model.training
    model.eval()
    try:
        think = think_figures(thinker, heldout.thinking, world)["think"] if heldout.thinking else 0.0
        chain = reflect_figures(thinker, heldout.reflections)["decision"] if heldout.reflections else 0.0
        decide = decide_count(thinker, heldout.reflections)
    finally:
        model.train(was_training)
    ablation = run_shapes_ablation(None, data_dir, out_dir, modes=["think_reflect"], limit=len(heldout.thinking) or 1,
                                   rounds=rounds, seed=seed, editor="shapes", error_rate=error_rate,
                                   thinker_model=model_dir, device=device)
    by_category = ablation.reports["think_reflect"]["sections"]["all"]["by_category"]

    def success(category: str) -> Count:
        row = by_category.get(category, {})
        n = int(row.get("ok", 0))
        return Count(round((row.get("success") or 0.0) / 100 * n), n)

    return {
        "think": Count(round(think * len(heldout.thinking)), len(heldout.thinking)),
        "decide": decide,
        "decision": Count(round(chain * len(heldout.reflections)), len(heldout.reflections)),
        "think_reflect": success("abstract"),
        "think_reflect_concrete": success("concrete"),
    }


def compare_reasoners(models: Mapping[str, str | Path], data_dir: str | Path, world: Any,
                      out_dir: str | Path, *, n: int = 400, error_rate: float = 0.3, rounds: int = 3, seed: int = 0,
                      device: Optional[str] = None) -> dict:
    """Each model's figures on the same `n` held-out samples of each kind (the test split), and each later model's
    change over the first: {"models": {name: {figure: {right, n, rate, low, high}}}, "changes": {name: {figure:
    {delta, z, outside_noise}}}, "n", "error_rate"}."""
    if not models:
        raise ValueError("compare_reasoners: no models to compare")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    heldout = HeldOut.load(data_dir, split="test", n=n)
    counts = {name: reasoner_counts(Path(path), heldout, world, data_dir, out_dir / name, error_rate=error_rate,
                                    rounds=rounds, seed=seed, device=device)
              for name, path in models.items()}
    first = next(iter(counts))
    doc: dict = {"n": n, "error_rate": error_rate, "rounds": rounds, "split": "test",
                 "paths": {k: str(v) for k, v in models.items()}, "models": {}, "changes": {}}
    for name, figures in counts.items():
        doc["models"][name] = {f: {"right": c.right, "n": c.n, "rate": c.rate, "low": c.interval()[0],
                                   "high": c.interval()[1]} for f, c in figures.items()}
        if name != first:
            doc["changes"][name] = {}
            for f, c in figures.items():
                z = two_proportion_z(counts[first][f], c)
                doc["changes"][name][f] = {"delta": c.rate - counts[first][f].rate, "z": z,
                                           "outside_noise": abs(z) > 1.96}
    return doc


def gain_table(doc: dict) -> str:
    """A markdown table: each figure per model with its 95 % interval, and the change with z."""
    names = list(doc["models"])
    head = "| figure | " + " | ".join(names) + " | change | z |"
    lines = [head, "| " + " | ".join(["---"] * (len(names) + 3)) + " |"]
    for f in FIGURES:
        cells = []
        for name in names:
            m = doc["models"][name][f]
            cells.append(f"{100 * m['rate']:.1f} % [{100 * m['low']:.1f}, {100 * m['high']:.1f}] ({m['right']}/{m['n']})")
        if len(names) > 1:
            ch = doc["changes"][names[-1]][f]
            mark = " (outside noise)" if ch["outside_noise"] else ""
            change, z = f"{100 * ch['delta']:+.1f} pt{mark}", f"{ch['z']:+.2f}"
        else:
            change = z = ""
        lines.append(f"| {LABELS[f]} | " + " | ".join(cells) + f" | {change} | {z} |")
    return "\n".join(lines)


__all__ = ["Count", "FIGURES", "compare_reasoners", "decide_count", "gain_table", "reasoner_counts",
           "two_proportion_z"]
