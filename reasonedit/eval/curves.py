"""Learning curves of a run: every stage's losses and held-out figures against one global step axis.

Reads `<stage>/history.json` (per-step losses, written by the trainer) and `<stage>/evals.json` (the
held-out figures of `train.eval_every`) of each stage folder present, in stage order, and draws one PNG:
losses on top (log scale), the oracle figures below (copy, concrete success, think accuracy, reflection
decision accuracy), with a dotted line where each stage starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

STAGE_FOLDERS = ("pretrain", "stage1", "stage2", "stage3")
CURVE_FIGURES = {"copy": "copy (all unchanged cells)", "concrete": "concrete edits exact", "think": "think right",
                 "decision": "reflection decision right"}


def _read(path: Path) -> list:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return doc if isinstance(doc, list) else []


def collect(run_dir: str | Path) -> list[dict]:
    """Per stage present: {"stage", "offset", "history", "evals"}; offsets lay the stages end to end."""
    run_dir, offset, stages = Path(run_dir), 0, []
    for name in STAGE_FOLDERS:
        history, evals = _read(run_dir / name / "history.json"), _read(run_dir / name / "evals.json")
        if not history and not evals:
            continue
        stages.append({"stage": name, "offset": offset, "history": history, "evals": evals})
        offset += max(len(history), max((e.get("step", 0) for e in evals), default=0))
    return stages


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the run's learning curves (default `<run_dir>/curves.png`); None when no stage has trained."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reasonedit.publish import atomic_write_bytes

    stages = collect(run_dir)
    if not stages:
        return None
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    palette, colours = plt.get_cmap("tab20").colors, {}  # one colour per figure across stages, one marker per stage

    def colour(label: str):
        return colours.setdefault(label, palette[len(colours) % len(palette)])

    for n, st in enumerate(stages):
        marker = "os^Dvp"[n % 6]
        terms = sorted({k for h in st["history"] for k in h if k not in ("loss", "lr", "grad_norm")})
        for term in terms:
            xs = [st["offset"] + i + 1 for i, h in enumerate(st["history"]) if term in h]
            ys = [h[term] for h in st["history"] if term in h]
            top.plot(xs, ys, lw=0.8, label=f"{st['stage']} {term}")
        shown = dict(CURVE_FIGURES)
        if not any(k in e for e in st["evals"] for k in CURVE_FIGURES):  # pretrain: reading accuracy per question
            shown = {k: f"reads: {k}" for e in st["evals"] for k, v in e.items()
                     if k not in ("step", "seconds") and isinstance(v, (int, float))}
        for key, label in shown.items():
            points = [(st["offset"] + e["step"], 100 * e[key]) for e in st["evals"] if key in e]
            if points:
                bottom.plot(*zip(*points), marker=marker, ms=3.5, color=colour(label), label=f"{st['stage']} {label}")
        for ax in (top, bottom):
            ax.axvline(st["offset"], color="grey", ls=":", lw=0.8)
    top.set_yscale("log")
    top.set_ylabel("training loss")
    top.legend(fontsize=7, ncol=3)
    bottom.set_ylabel("held-out, % (exact oracle)")
    bottom.set_xlabel("optimiser step (stages end to end)")
    bottom.set_ylim(-2, 102)
    if bottom.lines:
        bottom.legend(fontsize=7, ncol=2)
    fig.suptitle(f"learning curves: {Path(run_dir).name}")
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    log.info("curves: %s", out)
    return out


__all__ = ["CURVE_FIGURES", "collect", "plot_curves"]
