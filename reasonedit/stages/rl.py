"""The GRPO stage (`rl`): LoRA on the reasoner, trained on its own sampled replies, rewarded in the loop.

Each record gives one segment per rewarded role (think for a thinking pair, decide for a reflection sample), made
by the preprocessor as for stage 1, so packing, the loader and its exact resume are unchanged; the segment keeps
what the reward needs of its record (`rollout_meta`, plain data, so a checkpoint of the packer's window holds it).
With `rl.prompts` the records are the thinking pairs the top layer derives from an rl_prompts.jsonl
(`experiment.rl_prompt_dataset`), so the mix is thinking pairs alone. A micro-batch's prompts (each segment's
tokens before its answer) get `group_size` sampled replies each, drawn from the step's generator (seeded per
step and micro-batch, so a resumed run samples what the uninterrupted run did). The reward, built by the top
layer and handed to the trainer, scores all the micro-batch's replies at once (an editor executes think replies; the oracle or a judge
scores them); a parsing reply earns `format_weight` more. Advantages are normalised within each group; the loss
is GRPO's clipped surrogate with a k3 KL to the reference (the reasoner with its adapter disabled), over
`updates_per_batch` updates per batch of rollouts: the first samples, rewards and scores them (the ratio is 1 there,
its gradient not), the later ones reuse them with the first's log-probs as the sampling policy's, so the ratio moves
and the clip acts (PPO's epochs). Its count is the number of replies, known before the forward, so the trainer normalises
across micro-batches and ranks as for any other loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from reasonedit.data.packing import PackedBatch
from reasonedit.data.samples import ReflectionSample, ThinkingPair
from reasonedit.losses import LossSum, group_advantages, grpo_loss_sum
from reasonedit.models.model import ReasonEditModel
from reasonedit.models.rollout import rollout_logprobs, sample_replies, stop_ids

from .base import LossTotals, Stage, StageContext
from .reasoning import train_only_lora

if TYPE_CHECKING:
    from reasonedit.config import RLConfig

# the record kind each role's prompts come from
ROLE_KINDS = {"think": "thinking_pair", "describe": "reflection", "score": "reflection", "decide": "reflection"}


@dataclass
class Rollout:
    """One sampled reply, as a reward sees it."""

    role: str  # think | describe | score | decide
    key: str  # the segment's key, "<record key>/<role>"
    meta: dict  # `rollout_meta` of the record the prompt came from
    reply: str  # the decoded reply, its stop token cut


@dataclass
class Reward:
    value: float  # the task reward in [0, 1] (think: oracle score / 10; decide: 1 for the record's decision...)
    parsed: bool  # the reply has the role's format (the editor could execute it; the decision parsed)


RewardFn = Callable[[Sequence[Rollout]], Sequence[Reward]]


def rollout_meta(record: ThinkingPair | ReflectionSample) -> dict:
    """What a reward may read of a record: its key, images, instructions, decision and its own meta (the shapes
    world's source_scene / target_scene)."""
    if isinstance(record, ThinkingPair):
        return {"key": record.key, "kind": record.KIND, "image": record.image, "target": record.target,
                "instruction": record.abstract_instruction, "concrete_instruction": record.concrete_instruction,
                "meta": dict(record.meta)}
    return {"key": record.key, "kind": record.KIND, "image": record.source, "candidate": record.candidate,
            "instruction": record.instruction, "decision": record.decision.lower(),
            "target_description": record.target_description, "score": record.score, "meta": dict(record.meta)}


def reply_text(tokenizer, reply: torch.Tensor, stops: Sequence[int]) -> str:
    """A sampled reply's text: its stop token cut, special tokens kept (the decision tags are special tokens)."""
    ids = reply.tolist()
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


class RLStage(Stage):
    number, name = 4, "rl"
    components = ("reasoner",)
    trains = "LoRA adapters on the reasoner's language-model q/k/v/o projections, by GRPO on its own replies"
    from_previous = "the stage-3 model (else stage 1's); its generator and VAE are carried over untouched"
    default_mix = {"thinking_pair": 0.5, "reflection": 0.5}
    terms = ("grpo",)
    figures = ("reward", "reward_std", "score", "parse_rate", "kl", "clip_fraction", "reply_length")
    needs_reward = True

    def __init__(self, config: "RLConfig"):
        super().__init__(config)
        self._figures = LossTotals.zeros(self.figures)  # each figure's (sum, count) since the last take_figures
        self._rollouts: dict[int, BatchRollouts] = {}  # micro-batch index -> its rollouts, while updates remain

    @property
    def mix(self) -> dict[str, float]:
        if self.config.mix:
            return dict(self.config.mix)
        if self.config.prompts:  # rl.prompts: its think prompts, as thinking pairs, and nothing else
            return {"thinking_pair": 1.0}
        kinds = {ROLE_KINDS[r] for r in self.config.roles}
        return {k: w for k, w in self.default_mix.items() if k in kinds}

    def prepare(self, model: ReasonEditModel) -> None:
        if self.config.reference == "start" and model.reasoner.peft_model is not None:
            # the KL's reference is the reasoner with its adapter disabled: merge the start model's adapter and
            # train a fresh one, so that reference is the start (SFT) model and the policy starts equal to it
            model.reasoner.merge_lora()
            model.changed("reasoner")
        train_only_lora(model)

    def segments(self, pre, record) -> list:
        if not isinstance(record, (ThinkingPair, ReflectionSample)):
            return []
        out = []
        for key, role, messages, answer in pre.reasoner_turns(record):
            if role in self.config.roles:
                segment = pre.answer_segment(key, role, messages, answer)
                segment.meta["rollout"] = rollout_meta(record)
                out.append(segment)
        return out

    def counts(self, batch: PackedBatch) -> dict[str, int]:
        return {"grpo": len(batch.items) * self.config.group_size}  # replies: each has at least one token

    def take_figures(self) -> dict[str, LossSum]:
        # every figure on every rank, so the trainer's all-reduce of them lines up
        taken, self._figures = self._figures, LossTotals.zeros(self.figures)
        return {f: LossSum(taken.sums[f], taken.counts[f]) for f in self.figures}

    def _add_figures(self, **figures: tuple) -> None:
        """(sum, count) per figure, on the host: the rewards are there already, and the trainer stacks them."""
        host = lambda x: torch.as_tensor(x, dtype=torch.float64).detach().cpu()  # noqa: E731
        self._figures.add({f: LossSum(host(total), host(count)) for f, (total, count) in figures.items()})

    def rewards(self, segments: Sequence, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total reward, task reward, parsed) per reply (B * G,), from the reward the trainer was handed."""
        if self.reward is None:
            raise ValueError("the rl stage has no reward: the top layer builds one (reasonedit.experiment.rl_reward) "
                             "and hands it to train_stage(..., reward=...)")
        g = self.config.group_size
        rollouts = [Rollout(seg.role, seg.key, seg.meta.get("rollout", {}), text)
                    for i, seg in enumerate(segments) for text in texts[i * g:(i + 1) * g]]
        scored = list(self.reward(rollouts))
        if len(scored) != len(rollouts):
            raise ValueError(f"the rl stage's reward gave {len(scored)} rewards for {len(rollouts)} replies")
        value = torch.tensor([float(r.value) for r in scored], dtype=torch.float64)
        parsed = torch.tensor([bool(r.parsed) for r in scored], dtype=torch.float64)
        return value + self.config.format_weight * parsed, value, parsed

    def loss_sums(self, model: ReasonEditModel, batch: PackedBatch, ctx: StageContext) -> dict[str, LossSum]:
        c, reasoner = self.config, model.reasoner
        g, last = c.group_size, ctx.update == self.updates_per_batch - 1
        prompts = [seg.prompt() for seg in batch.items]
        if ctx.update == 0:
            batch_rollouts = self._roll_out(reasoner, batch, prompts, ctx.generator)
            if not last:  # the later updates of this step reuse them
                self._rollouts[ctx.micro] = batch_rollouts
        else:
            batch_rollouts = self._rollouts.pop(ctx.micro) if last else self._rollouts[ctx.micro]
        replies, advantages, ref, old = (batch_rollouts.replies, batch_rollouts.advantages, batch_rollouts.ref,
                                         batch_rollouts.old)
        logp, mask = rollout_logprobs(reasoner, prompts, replies, g, temperature=c.temperature)  # (B * G, T)
        if ctx.update == 0 and not last:
            batch_rollouts.old = logp.detach()  # the sampling policy's: the ratio's denominator from now on
        total, stats = grpo_loss_sum(logp, advantages.to(logp.device), mask, old_logp=old, ref_logp=ref,
                                     clip_low=c.clip_low, clip_high=c.clip_high, beta=c.beta, loss_mean=c.loss_mean)
        n = len(replies)
        if c.loss_mean == "token":  # DAPO's token mean within the micro-batch, weighted by its replies beyond it
            total = LossSum(total.sum * (n / total.count.clamp_min(1.0)), torch.full_like(total.count, n))
        tokens = mask.sum()
        if ctx.update == 0:  # what the rollouts earned, once per batch of them
            rewards, value, parsed = batch_rollouts.rewards, batch_rollouts.value, batch_rollouts.parsed
            self._add_figures(reward=(rewards.sum(), n),
                              reward_std=(rewards.view(-1, g).std(dim=1, correction=0).sum(), n // g),  # GRPO's signal
                              score=(value.sum(), n), parse_rate=(parsed.sum(), n), reply_length=(tokens, n))
        # the policy's drift: over every update (the clip acts from the second on)
        self._add_figures(kl=(stats["kl"] * tokens, tokens), clip_fraction=(stats["clip_fraction"] * tokens, tokens))
        return {"grpo": total}

    def _roll_out(self, reasoner, batch: PackedBatch, prompts: list, generator: torch.Generator) -> "BatchRollouts":
        """Sample G replies per prompt (no dropout: the replies come from the policy itself), reward them, and
        score them under the reference when the KL needs it."""
        c, g = self.config, self.config.group_size
        training = reasoner.model.training
        reasoner.model.eval()
        try:
            replies = sample_replies(reasoner, prompts, g, generator, c.temperature, c.max_new_tokens)
        finally:
            reasoner.model.train(training)
        stops = stop_ids(reasoner)
        texts = [reply_text(reasoner.tokenizer, r, stops) for r in replies]
        rewards, value, parsed = self.rewards(batch.items, texts)  # (B * G,) each
        ref = None
        if c.beta > 0:
            ref, _ = rollout_logprobs(reasoner, prompts, replies, g, reference=True, temperature=c.temperature)
        return BatchRollouts(replies, rewards, value, parsed, group_advantages(rewards, g), ref)


@dataclass
class BatchRollouts:
    """A micro-batch's rollouts, kept over its step's updates (`rl.updates_per_batch`)."""

    replies: list  # (B * G) token tensors
    rewards: torch.Tensor  # (B * G,) total: task reward + format_weight when it parsed
    value: torch.Tensor  # (B * G,) the task reward
    parsed: torch.Tensor  # (B * G,)
    advantages: torch.Tensor  # (B * G,) normalised within each group
    ref: torch.Tensor | None  # (B * G, T) the reference's log-probs, when beta > 0
    old: torch.Tensor | None = None  # (B * G, T) the sampling policy's, set by the first update


__all__ = ["BatchRollouts", "ROLE_KINDS", "RLStage", "Reward", "RewardFn", "Rollout", "reply_text",
           "rollout_meta"]
