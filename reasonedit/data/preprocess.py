"""Records to model-ready segments: what the packer packs and the models read.

A record becomes one or more *segments*:

- `ReasonerSegment` (stage 1 and 3, next-token loss): one chat conversation with its answer, as the
  reasoner's processor encodes it, labels -100 on everything but the answer and its `<|im_end|>`.
  A `ThinkingPair` gives one (`think`: abstract instruction -> concrete steps); a `ReflectionSample`
  gives three (`describe` -> target description, `score` -> "score: N\\nreason: ...", `decide` ->
  "<#Think> thought <#Tag> [new instruction]").
- `GeneratorSegment` (stage 2 and 3, flow matching): the condition prompt for the reasoner (source
  image(s) + instruction, or a caption and no image), the bucketed target and source images, their
  latents, and the token count of each span of the generator's row, known before anything heavy
  runs. `EditPair`, `TextToImage` and the target of a `ThinkingPair` (conditioned on its concrete
  instruction, the text the generator is asked to carry out) give one each.

Every image first goes to the nearest size bucket (`BucketConfig`), so the generator's latents split
into whole patches and, by default, the reasoner's processor sees the very same pixels. Condition
dropout for classifier-free guidance is drawn here (not in the trainer) because it changes the token
counts the packer budgets with; it is a pure function of (seed, record key).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image as PILImage

from reasonedit.data.oracle import RECORD_DECISIONS
from reasonedit.data.samples import EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.models import prompts
from reasonedit.models.processor import Messages, ReasonerProcessor
from reasonedit.models.tokenizer import IM_END_TOKEN, IMAGE_PAD_TOKEN, single_token_id

if TYPE_CHECKING:  # the model object pulls in the generator and diffusers; only needed for hints
    from reasonedit.data.latent_cache import LatentCache
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.models.vae import PatchCodec, QwenImageVAE

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label transformers' cross-entropy skips
DEFAULT_ASPECT_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # width / height


# ---------------------------------------------------------------------------------------------------
# Size buckets


@dataclass
class BucketConfig:
    """The image sizes training uses: for each aspect ratio, one (height, width) within the pixel budget.

    Sides are multiples of `multiple`, the least common multiple of what the models need: the VAE's
    downsampling times the generator's patch size (whole latent patches) and, unless `reasoner_patch`
    is 1, the reasoner's merged patch (14-px patches merged 2x2 = 28 px), so the reasoner's processor
    keeps the bucket's pixels instead of resizing them again. Real Qwen-Image-Edit feeds the reasoner
    a smaller copy of the image; set reasoner_patch=1 to let its processor do that resize instead.
    """

    pixel_budget: int = 1024 * 1024
    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
    vae_downsample: int = 8
    generator_patch: int = 2
    reasoner_patch: int = 28
    # a bucket's area is at least this share of the budget when any size of that area exists, so a
    # bucket never trades most of its pixels for an exact aspect ratio
    min_area_fraction: float = 0.75

    @property
    def multiple(self) -> int:
        return math.lcm(self.vae_downsample * self.generator_patch, self.reasoner_patch)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("pixel_budget", "vae_downsample", "generator_patch", "reasoner_patch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"buckets.{name}: must be positive, got {getattr(self, name)}")
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise ValueError(f"buckets.aspect_ratios: need positive width/height ratios, got {self.aspect_ratios}")
        if not 0.0 <= self.min_area_fraction <= 1.0:
            raise ValueError(f"buckets.min_area_fraction: must lie in [0, 1], got {self.min_area_fraction}")
        if self.pixel_budget < self.multiple ** 2:
            raise ValueError(f"buckets.pixel_budget: {self.pixel_budget} is below one {self.multiple}x{self.multiple} "
                             f"image, the smallest size whose sides are multiples of {self.multiple}")

    def sizes(self) -> list[tuple[int, int]]:
        """The distinct (height, width) buckets, in the order of `aspect_ratios`."""
        self.validate()
        m, budget = self.multiple, self.pixel_budget
        # every (h, w) on the grid whose w is one of the two grid points around h * ratio
        out: list[tuple[int, int]] = []
        for ratio in self.aspect_ratios:
            candidates = []
            for h in range(m, budget // m + 1, m):
                w_max = budget // h // m * m
                if w_max < m:
                    break
                w_lo = min(max(int(h * ratio) // m * m, m), w_max)
                candidates += [(h, w) for w in {w_lo, min(w_lo + m, w_max)}]
            big = [c for c in candidates if c[0] * c[1] >= self.min_area_fraction * budget] or candidates
            best = min(big, key=lambda c: (abs(math.log(c[1] / c[0] / ratio)), -c[0] * c[1], c[0]))
            if best not in out:
                out.append(best)
        return out

    def nearest(self, height: int, width: int, sizes: Optional[Sequence[tuple[int, int]]] = None) -> tuple[int, int]:
        """The bucket closest to the image's aspect ratio (in log ratio; ties go to the larger bucket)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image of size {height}x{width} has no pixels")
        sizes = self.sizes() if sizes is None else sizes
        aspect = math.log(width / height)
        return min(sizes, key=lambda s: (abs(math.log(s[1] / s[0]) - aspect), -s[0] * s[1]))


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3): scaled to cover the size, then centre-cropped. Exact when sizes agree."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    h, w = size
    height, width = image.shape[:2]
    if (height, width) == (h, w):
        return image
    scale = max(h / height, w / width)
    new_h, new_w = max(h, round(height * scale)), max(w, round(width * scale))
    resized = PILImage.fromarray(image).resize((new_w, new_h), PILImage.Resampling.LANCZOS)
    top, left = (new_h - h) // 2, (new_w - w) // 2
    return np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------------
# Condition dropout


@dataclass
class ConditionDropout:
    """Classifier-free-guidance dropout of the generator's condition, drawn per sample.

    text: probability of an empty instruction (caption). image: probability of dropping the source
    image(s) from both the reasoner's prompt and the generator's clean source latents. The two are
    drawn independently, so both go with probability text * image.
    """

    text: float = 0.0
    image: float = 0.0

    def validate(self) -> None:
        for name in ("text", "image"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout.{name}: a probability in [0, 1], got {p}")

    def draw(self, key: str, seed: int) -> tuple[bool, bool]:
        """(drop_text, drop_image) for the sample `key`: the same on every run, rank and worker."""
        # str seeds hash through sha512 in random.Random: stable across processes, unlike hash()
        rng = random.Random(f"{seed}/{key}/condition-dropout")
        return rng.random() < self.text, rng.random() < self.image


# ---------------------------------------------------------------------------------------------------
# Segments


@dataclass(eq=False)
class ReasonerSegment:
    """One conversation with its answer, encoded for the reasoner; loss on the answer tokens only."""

    key: str  # "<record key>/<role>"
    role: str  # think | describe | score | decide
    answer: str
    input_ids: torch.Tensor  # (1, T), ends with the answer's <|im_end|>
    labels: torch.Tensor  # (1, T): -100 but on the answer and its <|im_end|>
    mm_token_type_ids: torch.Tensor  # (1, T): 1 on image tokens
    pixel_values: Optional[torch.Tensor] = None  # (patches, 3 * 2 * 14 * 14)
    image_grid_thw: Optional[torch.Tensor] = None  # (n_images, 3)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def inputs(self) -> dict[str, torch.Tensor]:
        """What `pack_reasoner_inputs` takes for this segment."""
        out = {"input_ids": self.input_ids, "mm_token_type_ids": self.mm_token_type_ids, "labels": self.labels}
        if self.image_grid_thw is not None:
            out["pixel_values"], out["image_grid_thw"] = self.pixel_values, self.image_grid_thw
        return out


@dataclass(eq=False)
class GeneratorSegment:
    """One generator example: its condition prompt, bucketed images, latents and span token counts.

    The generator's row for it is [text_tokens | target_tokens | source_tokens]; the reasoner's row
    for its condition prompt is `condition_tokens` long (the fixed system prefix included).
    """

    key: str  # "<record key>/generate"
    instruction: str  # after dropout ("" when the text was dropped)
    condition: dict[str, torch.Tensor]  # the reasoner's inputs for the condition prompt, each (1, T_c)
    target_image: np.ndarray  # (H, W, 3) uint8, bucketed
    source_images: list[np.ndarray]  # each (H_i, W_i, 3) uint8, bucketed; [] for text-to-image or dropped
    prefix_tokens: int  # tokens of the fixed system prefix, dropped from the text states
    target_tokens: int
    source_tokens: int
    dropped_text: bool = False
    dropped_image: bool = False
    target_latent: Optional[torch.Tensor] = None  # (C, h, w), once encoded
    source_latents: Optional[list[torch.Tensor]] = None  # each (C, h_i, w_i), once encoded
    meta: dict = field(default_factory=dict)

    @property
    def condition_tokens(self) -> int:
        return int(self.condition["input_ids"].shape[1])

    @property
    def text_tokens(self) -> int:
        return self.condition_tokens - self.prefix_tokens

    @property
    def num_tokens(self) -> int:
        """Length of this sample in the generator's packed row."""
        return self.text_tokens + self.target_tokens + self.source_tokens

    @property
    def has_latents(self) -> bool:
        return self.target_latent is not None and self.source_latents is not None


Segment = Union[ReasonerSegment, GeneratorSegment]


def stage3_lengths(item: Segment) -> tuple[int, int]:
    """(reasoner-row tokens, generator-row tokens) of a segment in a stage-3 mixed batch.

    A generator segment costs its condition prompt in the reasoner's row (stage 3 trains the reasoner
    through the condition states, so that prompt runs in the same forward as the next-token segments).
    """
    if isinstance(item, ReasonerSegment):
        return item.num_tokens, 0
    if isinstance(item, GeneratorSegment):
        return item.condition_tokens, item.num_tokens
    raise TypeError(f"stage3_lengths: expected a ReasonerSegment or GeneratorSegment, got {type(item).__name__}")


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


class Preprocessor:
    """Records to `ReasonerSegment`s and `GeneratorSegment`s for one model's processor and latent codec."""

    def __init__(
        self,
        processor: ReasonerProcessor,
        codec: Optional["PatchCodec | QwenImageVAE"] = None,
        config: Optional[PreprocessConfig] = None,
    ):
        self.processor = processor
        self.codec = codec
        self.latent_cache: Optional["LatentCache"] = None  # a frozen codec's latents from disk (stages 2 and 3)
        self.config = config or PreprocessConfig()
        self.config.dropout.validate()
        self.sizes = self.config.buckets.sizes()  # validates the buckets too
        tokenizer = processor.tokenizer
        self.im_end_id = single_token_id(tokenizer, IM_END_TOKEN)
        self.prefix_ids = prompts.condition_prefix_ids(tokenizer)
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
        return cls(model.reasoner.processor, model.vae, config)

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

    def reasoner_segments(self, record: Record) -> list[ReasonerSegment]:
        """The next-token segments of a record: one for a ThinkingPair, three for a ReflectionSample, else none."""
        if isinstance(record, ThinkingPair):
            image = self.bucket(record.image)
            return [self.answer_segment(f"{record.key}/think", "think",
                                        prompts.think(image, record.abstract_instruction),
                                        record.concrete_instruction)]
        if isinstance(record, ReflectionSample):
            source, candidate = self.bucket(record.source), self.bucket(record.candidate)
            kind = record.decision.lower()
            if kind not in prompts.DECISION_KINDS.values():
                raise ValueError(f"record {record.key}: field 'decision' is {record.decision!r}, not one of "
                                 f"{', '.join(RECORD_DECISIONS)}")
            decision = prompts.Decision(kind, record.thought,
                                        record.new_instruction if kind == "reflection" else None)
            return [
                self.answer_segment(f"{record.key}/describe", "describe",
                                    prompts.describe_target(source, record.instruction), record.target_description),
                self.answer_segment(f"{record.key}/score", "score",
                                    prompts.score(candidate, record.target_description),
                                    prompts.format_score(record.score, record.reason)),
                self.answer_segment(f"{record.key}/decide", "decide",
                                    prompts.decide(source, record.instruction, record.target_description,
                                                   record.score, record.reason),
                                    prompts.format_decision(decision)),
            ]
        return []

    # -- generator segments ---------------------------------------------------------------------

    def generator_segment(self, key: str, sources: Sequence[np.ndarray], instruction: str,
                          target: np.ndarray) -> GeneratorSegment:
        """One generator example, condition dropout applied; latents encoded when the config says so."""
        drop_text, drop_image = self.config.dropout.draw(key, self.config.seed)
        drop_image = drop_image and bool(sources)  # a caption has no image to drop
        sources = [] if drop_image else [self.bucket(s) for s in sources]
        instruction = "" if drop_text else instruction
        try:
            condition = prompts.encode_condition(self.processor, list(sources), instruction)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        target = self.bucket(target)
        segment = GeneratorSegment(
            key=key, instruction=instruction, condition=condition, target_image=target, source_images=sources,
            prefix_tokens=len(self.prefix_ids), target_tokens=self.latent_tokens(target),
            source_tokens=sum(self.latent_tokens(s) for s in sources),
            dropped_text=drop_text, dropped_image=drop_image,
        )
        if self.config.encode_latents:
            self.encode_latents([segment])
        return segment

    def generator_segments(self, record: Record) -> list[GeneratorSegment]:
        """The generator example of an EditPair, a TextToImage or a ThinkingPair's target; none for reflection."""
        key = f"{record.key}/generate"
        if isinstance(record, EditPair):
            return [self.generator_segment(key, [record.source], record.instruction, record.target)]
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
        from reasonedit.models.vae import encode_image

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
    from reasonedit.models.processor import MIN_PIXELS, processor_min_pixels
    if processor_min_pixels(image_processor) > MIN_PIXELS:
        # the reasoner upscales small images itself (model.reasoner.image_min_pixels): aligning the buckets to its
        # 28-px grid would only resize the generator's images too
        values["reasoner_patch"] = 1
    if pixel_budget is not None:
        values["pixel_budget"] = pixel_budget
    values.update(overrides)
    return BucketConfig(**values)


__all__ = ["BucketConfig", "ConditionDropout", "GeneratorSegment", "IGNORE_INDEX", "PreprocessConfig", "Preprocessor",
           "ReasonerSegment", "Segment", "buckets_for", "resize_to", "stage3_lengths"]
