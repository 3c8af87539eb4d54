"""What the packer packs: segments, the size buckets images go to, condition dropout.

A record becomes one or more *segments* (`reasonedit.models.preprocess.Preprocessor` makes them):

- `ReasonerSegment` (stage 1 and 3, next-token loss): one chat conversation with its answer, as the
  reasoner's processor encodes it, labels -100 on everything but the answer and its `<|im_end|>`.
- `GeneratorSegment` (stage 2 and 3, flow matching): the condition prompt for the reasoner (source
  image(s) + instruction, or a caption and no image), the bucketed target and source images, their
  latents, and the token count of each span of the generator's row, known before anything heavy
  runs.

Every image first goes to the nearest size bucket (`BucketConfig`), so the generator's latents split
into whole patches and, by default, the reasoner's processor sees the very same pixels. Condition
dropout for classifier-free guidance is drawn before packing (not in the trainer) because it changes the
token counts the packer budgets with; it is a pure function of (seed, record key).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image as PILImage

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
    meta: dict = field(default_factory=dict)  # what a stage keeps with it (the rl stage: the record, for its reward)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def prompt_tokens(self) -> int:
        """Tokens before the answer: the conversation up to and including the assistant's generation prompt."""
        answer = (self.labels[0] != IGNORE_INDEX).nonzero()
        return int(answer[0, 0]) if answer.numel() else self.num_tokens

    def prompt(self) -> dict[str, torch.Tensor]:
        """The prompt alone, as `ReasonerProcessor.encode_one` encodes it, for sampling replies to it."""
        n = self.prompt_tokens
        out = {"input_ids": self.input_ids[:, :n], "mm_token_type_ids": self.mm_token_type_ids[:, :n]}
        if self.image_grid_thw is not None:
            out["pixel_values"], out["image_grid_thw"] = self.pixel_values, self.image_grid_thw
        return out

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


__all__ = ["BucketConfig", "ConditionDropout", "GeneratorSegment", "IGNORE_INDEX", "ReasonerSegment", "Segment",
           "resize_to", "stage3_lengths"]
