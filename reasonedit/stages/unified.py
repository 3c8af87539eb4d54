"""Stage 3, unified: reasoner (its LoRA) and generator train together on mixed packed batches with
L = L_FM + w * L_NTP. One reasoner forward over a row holding both the next-token segments and the
generator segments' condition prompts gives the logits and, with gradients, the condition states."""

from __future__ import annotations

import torch

from reasonedit.data.packing import PackedBatch, Packer
from reasonedit.data.segments import GeneratorSegment, ReasonerSegment, stage3_lengths
from reasonedit.losses import LossSum, joint_loss, next_token_loss
from reasonedit.models.inputs import mixed_inputs
from reasonedit.models.model import ReasonEditModel

from .base import Stage, StageContext, answer_tokens, generator_flow_matching, idle_generator_term
from .reasoning import train_only_lora


class UnifiedStage(Stage):
    number, name = 3, "stage3"
    components = ("reasoner", "generator", "vae")
    trains = "the reasoner's LoRA adapters and every generator parameter"
    from_previous = "stage 2's whole model (stage 1's LoRA, made trainable again, and stage 2's generator)"
    default_mix = {"thinking_pair": 0.25, "reflection": 0.25, "edit_pair": 0.25, "text_to_image": 0.25}
    terms = ("fm", "ntp")

    def prepare(self, model: ReasonEditModel) -> None:
        train_only_lora(model)
        for p in model.generator.parameters():
            p.requires_grad_(True)

    def packer(self, window: int) -> Packer:
        return Packer((self.config.reasoner_budget, self.config.generator_budget), window=window,
                      length=stage3_lengths, name=self.name)

    def segments(self, pre, record) -> list:
        return pre.reasoner_segments(record) + pre.generator_segments(record)

    def counts(self, batch: PackedBatch) -> dict[str, int]:
        return {"fm": sum(s.target_tokens for s in batch.items if isinstance(s, GeneratorSegment)),
                "ntp": answer_tokens([s for s in batch.items if isinstance(s, ReasonerSegment)])}

    def loss_sums(self, model: ReasonEditModel, batch: PackedBatch, ctx: StageContext) -> dict[str, LossSum]:
        mixed = mixed_inputs(batch.items, model.reasoner, with_image=ctx.same_modules)
        row = mixed.row.to(ctx.device)
        out = model.reasoner.forward_packed(row, backend=model.config.attention_backend, with_loss=False,
                                            output_hidden_states=True)
        sums = {"ntp": next_token_loss(out.logits, row.labels)}
        if mixed.generator_segments:
            states = mixed.split_condition_states(out.hidden_states[-1])  # with gradients into the reasoner
            sums["fm"] = generator_flow_matching(model, mixed.generator_segments, states, ctx)
        else:  # no generator sample on this rank: the same forward and backward as the others, adding zero
            sums["fm"] = idle_generator_term(model, ctx, out.hidden_states[-1][0])
        return sums

    def combine(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        return joint_loss(normalised["fm"], normalised["ntp"], self.config.ntp_weight)


__all__ = ["UnifiedStage"]
