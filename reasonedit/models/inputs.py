"""Model inputs: packed segments (reasonedit.data) become the tensors the reasoner and the generator read.

- `reasoner_inputs`: stage 1's next-token row, each segment its own document with its 3-axis positions;
- `condition_states`: the reasoner's last-layer states over generator segments' condition prompts, the
  generator's text stream (frozen in stage 2, with gradients in stage 3);
- `generator_inputs`: noisy targets x_t = (1 - s) x0 + s noise packed by the generator, with the velocity
  target noise - x0 per sample and patchified once, as the model predicts it;
- `mixed_inputs`: stage 3's single reasoner row, next-token segments then condition prompts.

This is the one place where a sample becomes a tensor a model reads; stages call it and the losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from reasonedit.data.segments import GeneratorSegment, IGNORE_INDEX, ReasonerSegment
from reasonedit.models.generator import GeneratorSample, PackedGeneratorBatch, PackedQwenImageTransformer, patchify
from reasonedit.models.reasoner import PackedReasonerInputs, Reasoner, pack_reasoner_inputs
from reasonedit.models.timesteps import noisy_target


def reasoner_inputs(segments: Sequence[ReasonerSegment], reasoner: Reasoner) -> PackedReasonerInputs:
    """One packed next-token row: the segments in order, each with its own 3-axis positions and labels."""
    return pack_reasoner_inputs([s.inputs() for s in segments], reasoner.model)


def condition_states(segments: Sequence[GeneratorSegment], reasoner: Reasoner,
                     backend: str = "auto") -> list[torch.Tensor]:
    """The generator's text stream per segment: (text_tokens, hidden) last-layer states, prefix dropped, from the
    segments' encoded condition prompts in one packed row (`Reasoner.packed_condition_states`). Gradients flow
    when enabled (stage 3); wrap in no_grad for a frozen reasoner (stage 2)."""
    return reasoner.packed_condition_states([s.condition for s in segments], [s.prefix_tokens for s in segments],
                                            backend=backend)


@dataclass(eq=False)
class GeneratorInputs:
    """A packed generator row and, per sample, what the loss compares its prediction with."""

    batch: PackedGeneratorBatch
    samples: list[GeneratorSample]
    velocity: list[torch.Tensor]  # per sample noise - x0, shaped like its target latent (C, h, w)
    noise: list[torch.Tensor]
    velocity_tokens: torch.Tensor  # (N_target, p * p * C): the velocities patchified as the model predicts them


def generator_inputs(
    segments: Sequence[GeneratorSegment],
    states: Sequence[torch.Tensor],
    timesteps: Sequence[float] | torch.Tensor,
    generator: PackedQwenImageTransformer,
    *,
    noise: Optional[Sequence[torch.Tensor]] = None,
    rng: Optional[torch.Generator] = None,
    sources_at_t0: bool = False,
) -> GeneratorInputs:
    """Noisy targets from latents, noise and one timestep per sample, packed by `generator.pack`.

    noise: one (C, h, w) tensor per segment, or None to draw it from `rng` in segment order.
    """
    s_values = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if not (len(segments) == len(states) == len(s_values)):
        raise ValueError(f"generator_inputs: {len(segments)} segments, {len(states)} states, "
                         f"{len(s_values)} timesteps; give one of each per segment")
    if noise is not None and len(noise) != len(segments):
        raise ValueError(f"generator_inputs: {len(noise)} noise tensors for {len(segments)} segments")
    samples, velocity, noises = [], [], []
    for i, (seg, text, s) in enumerate(zip(segments, states, s_values)):
        if not seg.has_latents:
            raise ValueError(f"{seg.key}: no latents; run Preprocessor.encode_latents on the batch first")
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{seg.key}: timestep {s} is outside [0, 1]")
        if text.shape[0] != seg.text_tokens:
            raise ValueError(f"{seg.key}: {text.shape[0]} text states for {seg.text_tokens} condition tokens")
        x0 = seg.target_latent  # (C, h, w)
        eps = noise[i] if noise is not None else torch.randn(x0.shape, generator=rng, dtype=x0.dtype)
        if eps.shape != x0.shape:
            raise ValueError(f"{seg.key}: noise {tuple(eps.shape)} does not match the target {tuple(x0.shape)}")
        samples.append(GeneratorSample(text_states=text, target=noisy_target(x0, eps, s),
                                       sources=list(seg.source_latents), timestep=s))
        velocity.append(eps - x0)
        noises.append(eps)
    tokens = torch.cat([patchify(v, generator.config.patch_size) for v in velocity])
    return GeneratorInputs(generator.pack(samples, sources_at_t0=sources_at_t0), samples, velocity, noises, tokens)


@dataclass(eq=False)
class MixedInputs:
    """Stage 3's reasoner row: the next-token segments, then the generator segments' condition prompts
    (labels all -100), as documents of one row; `condition_docs` index the latter in `row.lengths`."""

    row: PackedReasonerInputs
    reasoner_segments: list[ReasonerSegment]
    generator_segments: list[GeneratorSegment]
    condition_docs: list[int]

    def split_condition_states(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Each generator segment's text stream, cut out of the row's last-layer states (1, L, hidden) that the
        caller computed (no forward here, unlike `condition_states`)."""
        pieces = self.row.split(hidden)
        return [pieces[d][s.prefix_tokens:] for d, s in zip(self.condition_docs, self.generator_segments)]



def idle_image_document(reasoner: Reasoner) -> dict[str, torch.Tensor]:
    """A document of one blank image at the processor's smallest size, nothing to learn in it (labels -100): a
    row without images that carries it runs the vision tower as every other rank's row does."""
    import numpy as np

    from reasonedit.models.processor import processor_min_pixels
    side = int(np.ceil(processor_min_pixels(reasoner.processor.image_processor) ** 0.5))
    doc = reasoner.processor.encode_one([{"role": "user", "content": [
        {"type": "image", "image": np.zeros((side, side, 3), np.uint8)}]}], add_generation_prompt=False)
    doc["labels"] = torch.full_like(doc["input_ids"], IGNORE_INDEX)
    return doc


def mixed_inputs(items: Sequence[Any], reasoner: Reasoner, with_image: bool = False) -> MixedInputs:
    """A stage-3 batch (reasoner and generator segments, as a two-budget packer emits them) to one row.
    with_image: a row that holds no image gets `idle_image_document` last (under FSDP2 and ZeRO-3 every rank must
    run the same modules each step; its own document, it changes no other document's states)."""
    text = [s for s in items if isinstance(s, ReasonerSegment)]
    gen = [s for s in items if isinstance(s, GeneratorSegment)]
    if len(text) + len(gen) != len(items):
        raise TypeError("mixed_inputs: items must be ReasonerSegments or GeneratorSegments")
    docs = [s.inputs() for s in text]
    for s in gen:
        cond = dict(s.condition)
        cond["labels"] = torch.full_like(cond["input_ids"], IGNORE_INDEX)  # (1, T_c): condition is not a target
        docs.append(cond)
    if with_image and not any("pixel_values" in d for d in docs):
        docs.append(idle_image_document(reasoner))
    row = pack_reasoner_inputs(docs, reasoner.model)
    return MixedInputs(row, text, gen, list(range(len(text), len(text) + len(gen))))


__all__ = ["GeneratorInputs", "MixedInputs", "condition_states", "generator_inputs", "idle_image_document",
           "mixed_inputs", "reasoner_inputs"]
