"""Stage 1, reasoning: LoRA on the reasoner's LM attention, next-token loss on thinking pairs and
reflection samples. The generator is not loaded."""

from __future__ import annotations

from reasonedit.data.packing import PackedBatch
from reasonedit.losses import LossSum, next_token_loss
from reasonedit.models.inputs import reasoner_inputs
from reasonedit.models.model import ReasonEditModel

from .base import Stage, StageContext, answer_tokens


def freeze(module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def train_only_lora(model: ReasonEditModel) -> None:
    """Freeze everything, then make the reasoner's LoRA adapters (added if missing) trainable."""
    freeze(model)
    if model.reasoner.peft_model is None:
        model.reasoner.add_lora(model.config.reasoner.lora)
    for name, p in model.reasoner.model.named_parameters():
        p.requires_grad_("lora_" in name)


class ReasoningStage(Stage):
    number, name = 1, "stage1"
    components = ("reasoner",)
    trains = "LoRA adapters on the reasoner's language-model q/k/v/o projections"
    from_previous = "the initial model's reasoner (its generator and VAE are carried over untouched)"
    default_mix = {"thinking_pair": 0.5, "reflection": 0.5}
    terms = ("ntp",)

    def prepare(self, model: ReasonEditModel) -> None:
        train_only_lora(model)

    def segments(self, pre, record) -> list:
        return pre.reasoner_segments(record)

    def counts(self, batch: PackedBatch) -> dict[str, int]:
        return {"ntp": answer_tokens(batch.items)}

    def loss_sums(self, model: ReasonEditModel, batch: PackedBatch, ctx: StageContext) -> dict[str, LossSum]:
        row = reasoner_inputs(batch.items, model.reasoner).to(ctx.device)
        logits = model.reasoner.forward_packed(row, backend=model.config.attention_backend, with_loss=False).logits
        return {"ntp": next_token_loss(logits, row.labels)}  # logits (1, L, V)


__all__ = ["ReasoningStage", "freeze", "train_only_lora"]
