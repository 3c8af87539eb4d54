"""A stage's loss on held-out data with fixed noise and timesteps, so two models compare on equal terms.

Training losses are noisy (each step draws its own timesteps, noise and records), so a short run can fall
by less than that noise. The validation loss reads the same held-out records, packs them the same way and
draws the same noise and timesteps for every model it scores: the difference between the model a stage
started from and the one it ended with is the stage's progress on unseen data.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from reasonedit.data.loader import Sources, as_sources, kind_specs, make_loader
from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
from reasonedit.data.segments import ConditionDropout

from .base import LossTotals, Stage, StageContext

if TYPE_CHECKING:
    from reasonedit.config import ExperimentConfig
    from reasonedit.models.model import ReasonEditModel


def validation_batches(stage: Stage, model: "ReasonEditModel", cfg: "ExperimentConfig",
                       data: Sources, split: str = "val", records_per_kind: int = 16) -> list:
    """Packed batches of the first `records_per_kind` records of each kind in the stage's mix (read in order,
    no condition dropout), so every kind counts whatever its weight. `data` is one dataset directory, or the
    stage's (directory, weight) sources: then each kind is read from the sources whose split holds it, in order."""
    b = cfg.batches
    pre = Preprocessor.from_model(model, PreprocessConfig(buckets=buckets_for(model, b.pixel_budget),
                                                          dropout=ConditionDropout(0.0, 0.0), seed=cfg.seed))
    packer = stage.packer(b.window)
    batches: list = []
    for kind in stage.mix:
        specs = kind_specs(data, kind, split)
        if not specs:
            continue
        loader = make_loader(specs, seed=cfg.seed, rank=0, world_size=1, shuffle_buffer=1, epochs=1)
        for n, sample in enumerate(loader):
            if n == records_per_kind:
                break
            for segment in stage.segments(pre, sample.record):
                batches.extend(packer.add(segment))
    batches.extend(packer.flush())
    if not batches:
        raise ValueError(f"{[str(p) for p, _ in as_sources(data)]}: split {split!r} holds no records of "
                         f"{sorted(stage.mix)}; validation needs some (data.splits)")
    return batches


def _batch_generator(seed: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"validation/{seed}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@torch.no_grad()
def validation_losses(stage: Stage, model: "ReasonEditModel", batches: list, cfg: "ExperimentConfig",
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """Each loss term over all `batches`, token-weighted, with noise and timesteps fixed per batch index."""
    was_training = model.training
    model.eval()
    totals = LossTotals.zeros(stage.terms)
    try:
        for i, batch in enumerate(batches):
            ctx = StageContext(cfg.flow_matching, _batch_generator(cfg.seed, i), torch.device(device))
            totals.add(stage.loss_sums(model, batch, ctx))
    finally:
        model.train(was_training)
    means = totals.means(empty=float("nan"))
    return dict(zip(means, torch.stack(list(means.values())).tolist()))  # one host read for every term


__all__ = ["validation_batches", "validation_losses"]
