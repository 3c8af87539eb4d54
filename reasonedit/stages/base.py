"""What a stage is: what it loads and trains, its data mix, how it packs, and its loss terms.

A stage never owns the loop: the trainer asks it for a packer and segments, the token counts a
batch will contribute to each loss term (known before any forward), and the (sum, count) of each
term for one micro-batch. `Stage.normalised_loss` turns those into what a micro-batch backpropagates
and `LossTotals` adds them up into per-token means: the training step, the benchmark and the
validation loss all go through these two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch

from reasonedit.data.packing import Packer, PackedBatch
from reasonedit.models.preprocess import Preprocessor
from reasonedit.data.segments import GeneratorSegment, ReasonerSegment
from reasonedit.losses import (FlowMatchingConfig, LossSum, flow_matching_loss, normalise, sample_timesteps,
                               timestep_weights)

if TYPE_CHECKING:
    from reasonedit.config import ExperimentConfig, StageConfig
    from reasonedit.models.model import ReasonEditModel


@dataclass
class StageContext:
    """What a stage's loss needs besides the model and the batch."""

    flow_matching: FlowMatchingConfig
    generator: torch.Generator  # noise and timesteps: seeded per (step, micro-batch), so resume is exact
    device: torch.device
    condition_cache: Any = None  # a ConditionCache for a stage that `uses_condition_cache`, or None
    # several ranks: each runs the same modules every step whatever its batch holds (FSDP2 and ZeRO-3 gather and
    # reduce per module, and ZeRO-3 checks that the ranks' module orders agree)
    same_modules: bool = False
    micro: int = 0  # this micro-batch's index in the rank's step
    # the update over this step's micro-batches (a stage's `updates_per_batch`): 0 is the first; a stage that
    # samples (rl) samples on it and reuses what it sampled on the later ones
    update: int = 0


class Stage:
    """A training stage (0 pretrain on tiny presets, then the three); subclasses fill in the class attributes
    and the methods."""

    number: ClassVar[int]
    name: ClassVar[str]
    components: ClassVar[tuple[str, ...]]  # what ReasonEditModel.from_pretrained loads for training
    trains: ClassVar[str]  # a line for people: what gets gradients
    from_previous: ClassVar[str]  # a line for people: what comes from the previous stage's checkpoint
    default_mix: ClassVar[dict[str, float]]
    terms: ClassVar[tuple[str, ...]]  # loss terms, in log order
    uses_condition_cache: ClassVar[bool] = False  # its reasoner is frozen: the trainer may cache condition states
    # figures a stage measures besides its losses (the rl stage: rewards, KL, reply lengths), in log order; the
    # trainer reads them with `take_figures` after each step and logs and keeps them with the losses
    figures: ClassVar[tuple[str, ...]] = ()
    needs_reward: ClassVar[bool] = False  # the trainer must be handed a reward (the top layer builds it)
    reward: Any = None  # set by the trainer from its caller: what scores the stage's rollouts

    def __init__(self, config: "StageConfig"):
        self.config = config

    @classmethod
    def from_experiment(cls, cfg: "ExperimentConfig") -> "Stage":
        """The stage built from the experiment config's section named after it (`stage1`, `pretrain`...)."""
        return cls(getattr(cfg, cls.name))

    @property
    def mix(self) -> dict[str, float]:
        return dict(self.config.mix) or dict(self.default_mix)

    @property
    def updates_per_batch(self) -> int:
        """Optimiser updates the trainer makes over each step's micro-batches (the rl stage's PPO epochs)."""
        return int(getattr(self.config, "updates_per_batch", 1))

    # -- model ----------------------------------------------------------------------------------
    def prepare(self, model: "ReasonEditModel") -> None:
        """Set requires_grad on exactly the parameters this stage trains (and add adapters)."""
        raise NotImplementedError

    # -- data -----------------------------------------------------------------------------------
    def packer(self, window: int) -> Packer:
        return Packer(self.config.reasoner_budget, window=window, name=self.name)

    def segments(self, pre: Preprocessor, record: Any) -> list:
        """The record's training segments; a generator segment's latents are encoded here when `pre` encodes
        them (`PreprocessConfig.encode_latents`), else left to `Preprocessor.encode_latents` (the trainer
        preprocesses in the loader workers and encodes in the main process, on the VAE's device)."""
        raise NotImplementedError

    def counts(self, batch: PackedBatch) -> dict[str, int]:
        """Tokens each loss term covers in this batch, before any forward."""
        raise NotImplementedError

    # -- loss -----------------------------------------------------------------------------------
    def loss_sums(self, model: "ReasonEditModel", batch: PackedBatch, ctx: StageContext) -> dict[str, LossSum]:
        raise NotImplementedError

    def take_figures(self) -> dict[str, LossSum]:
        """Each of `figures` as (sum, count) over the micro-batches since the last call, then forgotten."""
        return {}

    def combine(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(normalised.values())

    def normalised_loss(self, sums: Mapping[str, LossSum], counts: Mapping[str, float],
                        world_size: int = 1) -> torch.Tensor:
        """What one micro-batch backpropagates: each term's sum over `counts`, the term's tokens in the whole
        step (every micro-batch, every rank), then `combine`d."""
        return self.combine({t: normalise(sums[t].sum, counts[t], world_size) for t in self.terms})


@dataclass
class LossTotals:
    """Each term's loss sum and token count added up over micro-batches, in float64 where the losses are (a
    0-dim CPU start adds to a device tensor without a copy), so adding never waits for the device."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor | float]

    @classmethod
    def zeros(cls, terms: Sequence[str]) -> "LossTotals":
        return cls({t: torch.zeros((), dtype=torch.float64) for t in terms},
                   {t: torch.zeros((), dtype=torch.float64) for t in terms})

    def add(self, sums: Mapping[str, LossSum]) -> None:
        for t, s in sums.items():
            self.sums[t] = self.sums[t] + s.sum.detach().double()
            self.counts[t] = self.counts[t] + s.count.detach().double()

    def means(self, empty: float) -> dict[str, torch.Tensor]:
        """Each term's loss per token (0-dim float64 tensors, where the sums are); `empty` for a term that
        covered no token."""
        out = {}
        for t, s in self.sums.items():
            c = self.counts[t]
            if isinstance(c, torch.Tensor):  # where it lies (the device, after the all-reduce): never read
                out[t] = torch.where(c > 0, s / c, torch.full_like(s, empty))
            else:  # a count on the host: reading it costs nothing
                out[t] = s / c if c > 0 else torch.full_like(s, empty)
        return out


def answer_tokens(segments: Sequence[ReasonerSegment]) -> int:
    """Labelled next-token positions: the first label of each sample never counts (it is -100 packed)."""
    return int(sum((s.labels[0, 1:] != -100).sum() for s in segments))


def generator_flow_matching(model: "ReasonEditModel", segments: Sequence[GeneratorSegment],
                            states: Sequence[torch.Tensor], ctx: StageContext) -> LossSum:
    """Noise the segments' targets at logit-normal shifted timesteps, predict the velocity, sum the loss."""
    from reasonedit.models.inputs import generator_inputs

    gen = model.generator
    s = sample_timesteps([seg.target_tokens for seg in segments], ctx.flow_matching, ctx.generator)  # (B,)
    noise = [torch.randn(seg.target_latent.shape, generator=ctx.generator) for seg in segments]
    inputs = generator_inputs(segments, [x.float() for x in states], s, gen, noise=noise)
    batch = inputs.batch.to(ctx.device)
    out = gen(batch)  # (N_img, p * p * C)
    pred = out[batch.target_index]  # (N_target, p * p * C): loss on noisy target tokens only
    target = inputs.velocity_tokens.to(pred.device)  # (N_target, p * p * C)
    per_sample = torch.cat([torch.full((seg.target_tokens,), float(w))
                            for seg, w in zip(segments, timestep_weights(s, ctx.flow_matching.weighting))])
    weights = None if ctx.flow_matching.weighting == "none" else per_sample
    return flow_matching_loss(pred, target, weights)


def idle_generator_term(model: "ReasonEditModel", ctx: StageContext,
                        text_states: torch.Tensor | None = None) -> LossSum:
    """A zero loss through one generator forward on a one-token dummy sample. A rank whose batch holds no
    generator sample still runs the generator's forward and backward, as every other rank does: FSDP2 and
    ZeRO-3 gather the generator's shards in the forward and reduce its gradients in the backward, one collective
    per unit on every rank, and DDP expects a gradient for every parameter. text_states: (T, hidden) reasoner
    states the dummy reads (zeroed), so the backward also runs through the reasoner's state output as it does
    where the generator reads real states (stage 3)."""
    from reasonedit.models.generator import GeneratorSample

    gen = model.generator
    cfg, p = gen.config, gen.config.patch_size
    text = torch.zeros(1, cfg.joint_attention_dim) if text_states is None else text_states[:1].float() * 0.0
    dummy = GeneratorSample(text_states=text, target=torch.zeros(cfg.out_channels, p, p), timestep=1.0)
    out = gen(gen.pack([dummy]).to(ctx.device))
    return LossSum(out.float().sum() * 0.0, torch.zeros(()))


__all__ = ["LossTotals", "Stage", "StageContext", "answer_tokens", "generator_flow_matching", "idle_generator_term"]
