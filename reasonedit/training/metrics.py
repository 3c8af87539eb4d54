"""Where step metrics go: the console progress line (logging), and optionally wandb and tensorboard.

Only the main rank builds a live sink. wandb runs offline when no WANDB_API_KEY is set (sync later with
`wandb sync`) and takes the usual WANDB_PROJECT, WANDB_NAME, WANDB_DIR, WANDB_MODE from the environment;
without them the project is "reasonedit", the run is named `<experiment>-<stage>` and its files go under
the stage folder. Tensorboard writes `<stage folder>/tensorboard/`. Both get the same scalar keys:
`loss/<term>`, `loss/total`, `lr`, `grad_norm`, `tokens_per_s`, `packing`, `skipped`, and a stage's own figures
as `<stage>/<figure>` (the rl stage: `rl/reward`, `rl/reward_std`, `rl/score`, `rl/parse_rate`, `rl/kl`,
`rl/clip_fraction`, `rl/reply_length`). `plot_figures` draws a stage's history as a PNG of small panels.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("reasonedit.train")


class MetricsSink:
    def __init__(self, out: Path, name: str, config: dict[str, Any], wandb: bool, tensorboard: bool, enabled: bool):
        self.wandb = self.tb = None
        if not enabled:
            return
        if wandb:
            import wandb as wandb_lib

            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # no key: log locally, sync later with `wandb sync`
            # explicit arguments beat wandb's own WANDB_* variables, so pass ours only where none is set
            self.wandb = wandb_lib.init(project=os.environ.get("WANDB_PROJECT") or "reasonedit",
                                        name=os.environ.get("WANDB_NAME") or name,
                                        dir=os.environ.get("WANDB_DIR") or str(out), config=config,
                                        reinit="finish_previous")
            log.info("wandb: run %s (%s) in %s", self.wandb.name, os.environ.get("WANDB_MODE", "online"),
                     self.wandb.dir)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
            log.info("tensorboard: %s", out / "tensorboard")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


@dataclass
class ProgressWindow:
    """The steps since the last console line: the line shows their means (less noise than one step), the
    tokens per second over their wall time, and an ETA from the mean step time so far."""

    stage: str
    total_steps: int
    terms: tuple[str, ...]
    figures: tuple[str, ...] = ()  # the stage's own figures (`Stage.figures`), shown after the losses
    started: float = field(default_factory=time.perf_counter)
    steps: list[dict[str, float]] = field(default_factory=list)
    tokens: float = 0.0
    window_started: float = field(default_factory=time.perf_counter)
    steps_done_here: int = 0  # steps this process ran (a resumed run starts its clock again)

    def add(self, record: dict[str, float], tokens: float) -> None:
        self.steps.append(record)
        self.tokens += tokens
        self.steps_done_here += 1

    def line(self, step: int, lr: float, packing: float, skipped: int) -> str:
        now = time.perf_counter()
        n = max(1, len(self.steps))
        losses = {t: sum(r[t] for r in self.steps) / n for t in self.terms}
        total = sum(r["loss"] for r in self.steps) / n
        grad = sum(r.get("grad_norm", 0.0) for r in self.steps) / n
        figures = {f: sum(r[f] for r in self.steps if f in r) / n for f in self.figures}
        tokens_per_s = self.tokens / max(now - self.window_started, 1e-9)
        eta = (now - self.started) / max(self.steps_done_here, 1) * (self.total_steps - step)
        self.steps, self.tokens, self.window_started = [], 0.0, now
        return progress_line(self.stage, step, self.total_steps, losses, lr, tokens_per_s, packing, skipped,
                             loss=total if len(self.terms) > 1 else None, grad_norm=grad, eta_s=eta,
                             figures=figures)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(stage: str, step: int, steps: int, losses: dict[str, float], lr: float, tokens_per_s: float,
                  utilisation: float, skipped: int, loss: float | None = None, grad_norm: float | None = None,
                  eta_s: float | None = None, figures: dict[str, float] | None = None) -> str:
    """`stage2 step 3/10 | fm 1.6279 | lr 9.75e-04 | grad 0.489 | 6,545 tok/s | packing 0.966 | eta 0:00:05`;
    with several terms their weighted total follows them (`loss 1.8312`); a stage's own figures follow the losses
    (`reward 0.412 reward_std 0.13 ...`); `skipped N` once steps were skipped."""
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    if loss is not None:
        terms += f" loss {loss:.4f}"
    parts = [f"{stage} step {step}/{steps}", terms]
    if figures:
        parts.append(" ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    parts.append(f"lr {lr:.2e}")
    if grad_norm is not None:
        parts.append(f"grad {grad_norm:.3g}")
    parts += [f"{tokens_per_s:,.0f} tok/s", f"packing {utilisation:.3f}"]
    if eta_s is not None:
        parts.append(f"eta {_clock(eta_s)}")
    if skipped:
        parts.append(f"skipped {skipped}")
    return " | ".join(parts)


def plot_figures(history: list[dict[str, float]], keys: tuple[str, ...], out: Path, title: str = "") -> Path | None:
    """One small panel per key of `history` (the trainer's per-step entries) against the step, as a PNG at `out`;
    None when no entry holds any of the keys."""
    keys = tuple(k for k in keys if any(k in h for h in history))
    if not keys:
        return None
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reasonedit.publish import atomic_write_bytes

    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(i + 1, h[key]) for i, h in enumerate(history) if key in h]
        ax.plot(*zip(*points), lw=0.9, marker="o" if len(points) < 30 else None, ms=2.5)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


__all__ = ["MetricsSink", "ProgressWindow", "plot_figures", "progress_line"]
