"""Records to segments for one model: its processor tokenises the conversations, its VAE encodes the latents.

A `ThinkingPair` gives one reasoner segment (`think`: abstract instruction -> concrete steps); a
`ReflectionSample` gives three (`describe` -> target description, `score` -> "score: N\nreason: ...",
`decide` -> "<#Think> thought <#Tag> [restart:] [new instruction]"), or only `decide` when it carries no target
description (an imported one: describe would train an empty answer, and score is against that description).
A record trains only the roles it carries (`reasoner_roles`); no segment has an empty answer. `EditPair`,
`TextToImage` and the target of a
`ThinkingPair` (conditioned on its concrete instruction, the text the generator is asked to carry out) give
one generator segment each. The segment types, buckets and condition dropout are `reasonedit.data.segments`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from reasonedit.data.samples import RECORD_DECISIONS, EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.data.segments import (IGNORE_INDEX, BucketConfig, ConditionDropout, GeneratorSegment, ReasonerSegment,
                                      Segment, resize_to)

from . import prompts
from .image_policy import ImagePolicy, policy_for, resize
from .processor import Messages, ReasonerProcessor
from .tokenizer import IM_END_TOKEN, IMAGE_PAD_TOKEN, single_token_id

if TYPE_CHECKING:  # the model object pulls in the generator and diffusers; only needed for hints
    from .latent_cache import LatentCache
    from .model import ReasonEditModel
    from .vae import PatchCodec, QwenImageVAE

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# The preprocessor


@dataclass
class PreprocessConfig:
    buckets: BucketConfig = field(default_factory=BucketConfig)
    dropout: ConditionDropout = field(default_factory=ConditionDropout)
    seed: int = 0  # condition dropout draws from (seed, record key); change it per epoch for fresh draws
    encode_latents: bool = True  # False: leave latents to `encode_latents` (e.g. batched on the accelerator)


def _with_answer(messages: Messages, answer: str) -> Messages:
    return [*messages, {"role": "assistant", "content": answer}]


def reasoner_roles(record: Record) -> tuple[str, ...]:
    """The reasoner roles a record carries, so trains: a reflection without a target description (imported from
    a format that has none) carries only its decision, since the describe answer would be empty and the score
    prompt judges the edit against that description."""
    if isinstance(record, ThinkingPair):
        return ("think",)
    if isinstance(record, ReflectionSample):
        return ("describe", "score", "decide") if record.target_description.strip() else ("decide",)
    return ()


class Preprocessor:
    """Records to `ReasonerSegment`s and `GeneratorSegment`s for one model's processor and latent codec."""

    def __init__(
        self,
        processor: ReasonerProcessor,
        codec: Optional["PatchCodec | QwenImageVAE"] = None,
        config: Optional[PreprocessConfig] = None,
        template: prompts.ConditionTemplate = prompts.OWN_TEMPLATE,
        policy: Optional[ImagePolicy] = None,
    ):
        """template: the condition prompt (the model's, `Reasoner.condition_template`); policy: how the generator's
        images are sized (the model's `image_policy`; default native: every image bucketed)."""
        self.processor = processor
        self.template = template
        self.policy = policy or policy_for()
        self.codec = codec
        self.latent_cache: Optional["LatentCache"] = None  # a frozen codec's latents from disk (stages 2 and 3)
        self.config = config or PreprocessConfig()
        self.config.dropout.validate()
        self.sizes = self.config.buckets.sizes()  # validates the buckets too
        tokenizer = processor.tokenizer
        self.im_end_id = single_token_id(tokenizer, IM_END_TOKEN)
        self.prefix_ids = prompts.condition_prefix_ids(tokenizer, template)
        if codec is not None and codec.downsample != self.config.buckets.vae_downsample:
            raise ValueError(f"buckets.vae_downsample={self.config.buckets.vae_downsample} but the codec "
                             f"downsamples by {codec.downsample}; build the buckets with `buckets_for(model, ...)`")

    @classmethod
    def from_model(cls, model: "ReasonEditModel", config: Optional[PreprocessConfig] = None) -> "Preprocessor":
        """For `model`'s processor and VAE; the bucket geometry is checked against the model's."""
        config = config or PreprocessConfig(buckets=buckets_for(model))
        expected = buckets_for(model, config.buckets.pixel_budget)
        b = config.buckets
        if model.generator is not None and b.generator_patch != expected.generator_patch:
            raise ValueError(f"buckets.generator_patch={b.generator_patch}, the generator's patch_size is "
                             f"{expected.generator_patch}")
        if b.reasoner_patch not in (1, expected.reasoner_patch):
            raise ValueError(f"buckets.reasoner_patch={b.reasoner_patch}: the reasoner's merged patch is "
                             f"{expected.reasoner_patch} px (or 1 to let its processor resize)")
        return cls(model.reasoner.processor, model.vae, config, model.reasoner.condition_template, model.image_policy)

    # -- images ---------------------------------------------------------------------------------

    def bucket(self, image: np.ndarray) -> np.ndarray:
        """The image resized to its nearest bucket."""
        return resize_to(image, self.config.buckets.nearest(image.shape[0], image.shape[1], self.sizes))

    def latent_tokens(self, image: np.ndarray) -> int:
        """Generator tokens of a bucketed image: (H / (f * p)) * (W / (f * p)), no VAE needed."""
        b = self.config.buckets
        side = b.vae_downsample * b.generator_patch
        h, w = image.shape[:2]
        if h % side or w % side:
            raise ValueError(f"image of size {h}x{w} does not split into {side}-px latent patches; bucket it first")
        return (h // side) * (w // side)

    # -- reasoner segments ----------------------------------------------------------------------

    def answer_segment(self, key: str, role: str, messages: Messages, answer: str) -> ReasonerSegment:
        """Encode `messages` + the assistant's `answer`; labels only on the answer and its <|im_end|>.

        The answer span is found on token ids, not characters: the prompt with its generation prompt
        must tokenize to a prefix of the whole conversation, so a tokenizer that merges across the
        boundary is caught here rather than giving labels shifted by a token.
        """
        if IM_END_TOKEN in answer:
            raise ValueError(f"{key}: the {role} answer contains {IM_END_TOKEN}; it would end the turn early")
        if not answer.strip():  # it would teach the role to answer nothing
            raise ValueError(f"{key}: the {role} answer is empty; a record that does not carry this role must not "
                             "train it (see `reasoner_roles`)")
        full = self.processor.encode_one(_with_answer(messages, answer), add_generation_prompt=False)
        ids = full["input_ids"][0].tolist()  # (T,)
        prompt = self._prompt_ids(messages, full.get("image_grid_thw"))
        if ids[: len(prompt)] != prompt:
            at = next(i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b) if len(ids) >= len(prompt) else len(ids)
            raise ValueError(f"{key}: the {role} prompt's tokens are not a prefix of the conversation's (they "
                             f"differ at token {at}); the chat template or tokenizer merges across the answer boundary")
        try:
            end = ids.index(self.im_end_id, len(prompt))  # the answer's closing <|im_end|>
        except ValueError:
            raise ValueError(f"{key}: no {IM_END_TOKEN} after the {role} answer; the chat template must close "
                             "the assistant turn") from None
        # the template's trailing newline after <|im_end|> is dropped: it is never a label and
        # generation stops before it, so it would only cost a token
        input_ids = full["input_ids"][:, : end + 1]  # (1, T)
        labels = input_ids.clone()
        labels[:, : len(prompt)] = IGNORE_INDEX
        return ReasonerSegment(
            key=key, role=role, answer=answer, input_ids=input_ids, labels=labels,
            mm_token_type_ids=full["mm_token_type_ids"][:, : end + 1],
            pixel_values=full.get("pixel_values"), image_grid_thw=full.get("image_grid_thw"),
        )

    def _prompt_ids(self, messages: Messages, grid: Optional[torch.Tensor]) -> list[int]:
        """Token ids of the prompt with its generation prompt, image placeholders expanded by `grid`.

        The same expansion as `ReasonerProcessor.encode_one`, reusing the full conversation's image
        grid so the pixels are processed once per segment, not twice.
        """
        text = self.processor.render(messages, add_generation_prompt=True)
        pieces = text.split(IMAGE_PAD_TOKEN)
        counts = [] if grid is None else (grid.prod(-1) // self.processor.merge_size ** 2).tolist()
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"the prompt has {len(pieces) - 1} images but the conversation {len(counts)}")
        text = pieces[0] + "".join(IMAGE_PAD_TOKEN * n + rest for n, rest in zip(counts, pieces[1:]))
        return self.processor.tokenizer.encode(text, add_special_tokens=False)

    def reasoner_turns(self, record: Record) -> list[tuple[str, str, Messages, str]]:
        """(segment key, role, prompt, answer) for each role the record carries (`reasoner_roles`), images bucketed."""
        roles = reasoner_roles(record)
        if isinstance(record, ThinkingPair):
            image = self.bucket(record.image)
            return [(f"{record.key}/think", "think", prompts.think(image, record.abstract_instruction),
                     record.concrete_instruction)]
        if not isinstance(record, ReflectionSample):
            return []
        source = self.bucket(record.source)
        kind = record.decision.lower()
        if kind not in prompts.DECISION_KINDS.values():
            raise ValueError(f"record {record.key}: field 'decision' is {record.decision!r}, not one of "
                             f"{', '.join(RECORD_DECISIONS)}")
        problem = record.problem()  # a restart on anything but a Reflection with an instruction
        if problem is not None:
            raise ValueError(f"record {record.key}: {problem}")
        decision = prompts.Decision(kind, record.thought, record.new_instruction if kind == "reflection" else None,
                                    record.restart)  # restart: the Reflection is for the source (EditThinker's)
        turns = []
        if "describe" in roles:
            turns.append((f"{record.key}/describe", "describe", prompts.describe_target(source, record.instruction),
                          record.target_description))
        if "score" in roles:
            turns.append((f"{record.key}/score", "score",
                          prompts.score(self.bucket(record.candidate), record.target_description),
                          prompts.format_score(record.score, record.reason)))
        turns.append((f"{record.key}/decide", "decide",
                      prompts.decide(source, record.instruction, record.target_description, record.score,
                                     record.reason),
                      prompts.format_decision(decision)))
        return turns

    def reasoner_segments(self, record: Record) -> list[ReasonerSegment]:
        """The next-token segments of a record, one per role it carries: think for a ThinkingPair; describe, score
        and decide for a ReflectionSample (decide alone without a target description); none for the others."""
        return [self.answer_segment(key, role, messages, answer)
                for key, role, messages, answer in self.reasoner_turns(record)]

    # -- generator segments ---------------------------------------------------------------------

    def generator_segment(self, key: str, sources: Sequence[np.ndarray], instruction: str,
                          target: np.ndarray) -> GeneratorSegment:
        """One generator example, condition dropout applied; latents encoded when the config says so."""
        drop_text, drop_image = self.config.dropout.draw(key, self.config.seed)
        drop_image = drop_image and bool(sources)  # a caption has no image to drop
        try:
            seen, sources, target = self.sized(sources, target)  # the sizes do not depend on the dropout
            if drop_image:
                seen, sources = [], []
            instruction = "" if drop_text else instruction
            condition = prompts.encode_condition(self.processor, seen, instruction, self.template)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        segment = GeneratorSegment(
            key=key, instruction=instruction, condition=condition, target_image=target, source_images=sources,
            prefix_tokens=len(self.prefix_ids), target_tokens=self.latent_tokens(target),
            source_tokens=sum(self.latent_tokens(s) for s in sources),
            dropped_text=drop_text, dropped_image=drop_image,
        )
        if self.config.encode_latents:
            self.encode_latents([segment])
        return segment

    def sized(self, sources: Sequence[np.ndarray], target: np.ndarray, key: str = ""
              ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """The sources as the reasoner sees them, as the VAE encodes them, and the target, sized by the policy as
        an edit of these sources is at inference (native: each image bucketed)."""
        if self.policy.native:
            bucketed = [self.bucket(s) for s in sources]
            return bucketed, bucketed, self.bucket(target)
        grid = self.config.buckets.vae_downsample * self.config.buckets.generator_patch
        if not sources:
            return [], [], resize(target, *self.policy.target_size(*target.shape[:2], grid), self.policy.resample)
        seen, encoded, plan = self.policy.prepare(list(sources), grid, key)
        return seen, encoded, resize(target, *plan.output, self.policy.resample)

    def generator_segments(self, record: Record) -> list[GeneratorSegment]:
        """The generator example of an EditPair, a TextToImage or a ThinkingPair's target; none for reflection."""
        key = f"{record.key}/generate"
        if isinstance(record, EditPair):
            return [self.generator_segment(key, record.sources, record.instruction, record.target)]
        if isinstance(record, TextToImage):
            return [self.generator_segment(key, [], record.caption, record.image)]
        if isinstance(record, ThinkingPair):
            return [self.generator_segment(key, [record.image], record.concrete_instruction, record.target)]
        return []

    def __call__(self, record: Record) -> list[Segment]:
        """Every segment of a record (stage 3's mix): reasoner segments first."""
        return [*self.reasoner_segments(record), *self.generator_segments(record)]

    @torch.no_grad()
    def encode_latents(self, segments: Sequence[GeneratorSegment]) -> None:
        """Fill in the latents of segments that have none, with the codec (through `latent_cache` when set);
        checks them against the counts."""
        if self.codec is None:
            raise ValueError("Preprocessor has no latent codec: build it with `Preprocessor.from_model` or pass codec=")
        if self.latent_cache is not None and self.latent_cache.codec is not self.codec:
            raise ValueError("Preprocessor.latent_cache caches another codec's latents than the preprocessor's")
        from .vae import encode_image

        patch = self.config.buckets.generator_patch
        for seg in segments:
            if seg.has_latents:
                continue
            images = [seg.target_image, *seg.source_images]
            if self.latent_cache is not None:
                latents = self.latent_cache.latents(images)
            else:
                latents = [encode_image(self.codec, image) for image in images]  # each (C, H / f, W / f)
            tokens = [(z.shape[-2] // patch) * (z.shape[-1] // patch) for z in latents]
            if tokens[0] != seg.target_tokens or sum(tokens[1:]) != seg.source_tokens:
                raise ValueError(f"{seg.key}: latents give {tokens} tokens, the segment counted "
                                 f"{seg.target_tokens} + {seg.source_tokens}; buckets.vae_downsample is wrong")
            seg.target_latent, seg.source_latents = latents[0], latents[1:]


def buckets_for(model: "ReasonEditModel", pixel_budget: Optional[int] = None, **overrides: object) -> BucketConfig:
    """A BucketConfig with the model's VAE downsampling, generator patch and reasoner patch geometry."""
    image_processor = model.reasoner.processor.image_processor
    values: dict = {
        "vae_downsample": model.vae.downsample if model.vae is not None else BucketConfig.vae_downsample,
        "generator_patch": (model.generator.config.patch_size if model.generator is not None
                            else BucketConfig.generator_patch),
        "reasoner_patch": int(image_processor.patch_size) * int(image_processor.merge_size),
    }
    from .processor import MIN_PIXELS, processor_min_pixels
    if processor_min_pixels(image_processor) > MIN_PIXELS:
        # the reasoner upscales small images itself (model.reasoner.image_min_pixels): aligning the buckets to its
        # 28-px grid would only resize the generator's images too
        values["reasoner_patch"] = 1
    if pixel_budget is not None:
        values["pixel_budget"] = pixel_budget
    values.update(overrides)
    return BucketConfig(**values)


__all__ = ["PreprocessConfig", "Preprocessor", "buckets_for", "reasoner_roles"]
