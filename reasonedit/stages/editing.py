"""Stage 2, editing: the generator trains with flow matching on text-to-image and edit pairs; the
reasoner is frozen and only supplies condition states (computed without gradients, or read from a
`ConditionCache`)."""

from __future__ import annotations

import torch

from reasonedit.data.packing import PackedBatch, Packer
from reasonedit.losses import LossSum
from reasonedit.models.inputs import condition_states
from reasonedit.models.model import ReasonEditModel

from .base import Stage, StageContext, generator_flow_matching
from .reasoning import freeze


class EditingStage(Stage):
    number, name = 2, "stage2"
    components = ("reasoner", "generator", "vae")
    trains = "every generator parameter"
    from_previous = "stage 1's reasoner with its LoRA (frozen) and the initial generator and VAE"
    default_mix = {"edit_pair": 0.5, "text_to_image": 0.5}
    terms = ("fm",)
    uses_condition_cache = True

    def prepare(self, model: ReasonEditModel) -> None:
        freeze(model)
        model.reasoner.eval()
        for p in model.generator.parameters():
            p.requires_grad_(True)

    def packer(self, window: int) -> Packer:
        return Packer(self.config.generator_budget, window=window, name=self.name)

    def segments(self, pre, record) -> list:
        return pre.generator_segments(record)

    def counts(self, batch: PackedBatch) -> dict[str, int]:
        return {"fm": sum(s.target_tokens for s in batch.items)}

    @torch.no_grad()
    def states(self, model: ReasonEditModel, segments, ctx: StageContext) -> list[torch.Tensor]:
        """The frozen reasoner's condition states; from the cache for every segment, text-to-image and dropped-image
        ones too (an entry is keyed by its prompt's token ids and pixels, none for a text-only prompt)."""
        out = [None] * len(segments)
        cache = ctx.condition_cache
        if cache is not None:
            idx = [i for i, s in enumerate(segments) if s.prefix_tokens == cache.reasoner.condition_prefix_length]
            if idx:
                for i, st in zip(idx, cache.encoded_states([segments[i].condition for i in idx])):
                    out[i] = st
        todo = [i for i, s in enumerate(out) if s is None]
        if todo:
            computed = condition_states([segments[i] for i in todo], model.reasoner, model.config.attention_backend)
            for i, st in zip(todo, computed):
                out[i] = st
        return [s.detach() for s in out]

    def loss_sums(self, model: ReasonEditModel, batch: PackedBatch, ctx: StageContext) -> dict[str, LossSum]:
        states = self.states(model, batch.items, ctx)
        return {"fm": generator_flow_matching(model, batch.items, states, ctx)}


__all__ = ["EditingStage"]
