"""Image size policies: how big each source is for the reasoner and for the VAE, and how big the edit is.

One `ImagePolicy` serves preprocessing (training), training and inference alike, so a model is trained on the
sizes it edits at. `native` keeps a tiny world's images as they are; the Qwen-Image-Edit policies size images
as diffusers' pipelines do for the released weights (facts read from diffusers 0.42's pipelines):

    qwen-image-edit       QwenImageEditPipeline: the source resized to about 1024 * 1024 pixels, aspect kept,
                          sides rounded to multiples of 32; that one image is what the vision encoder and the
                          VAE see, and the edit is made at that size.
    qwen-image-edit-plus  QwenImageEditPlusPipeline (2509, 2511): each source at about 384 * 384 pixels for the
                          vision encoder and 1024 * 1024 for the VAE; the edit at about 1024 * 1024 pixels in
                          the aspect of the last source. Several sources are labelled "Picture N:" in the prompt.

Resizing is Lanczos on 8-bit RGB, as diffusers' `VaeImageProcessor.resize` does for PIL images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image as PILImage

from reasonedit.config.model import ImagesConfig, ModelConfig

QWEN_AREA = 1024 * 1024  # the VAE's and the edit's pixels in both Qwen-Image-Edit pipelines
QWEN_PLUS_CONDITION_AREA = 384 * 384  # the vision encoder's pixels per source in QwenImageEditPlusPipeline
SIDE_MULTIPLE = 32  # both pipelines round each side to a multiple of 32
RESAMPLE = {"lanczos": PILImage.LANCZOS, "bicubic": PILImage.BICUBIC}


def fit_area(height: int, width: int, area: int, multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """(height, width) of about `area` pixels in the aspect of height x width, each side rounded to the nearest
    multiple of `multiple` (at least one multiple), as the pipelines' `calculate_dimensions` computes it."""
    if height <= 0 or width <= 0:
        raise ValueError(f"an image of {height}x{width} pixels has no aspect ratio")
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)


def resize(image: np.ndarray, height: int, width: int, resample: str = "lanczos") -> np.ndarray:
    """A uint8 (H, W, 3) image at height x width (the same array when it is that size already)."""
    image = np.asarray(image)
    if image.shape[:2] == (height, width):
        return image
    return np.array(PILImage.fromarray(image).resize((width, height), RESAMPLE[resample]))


@dataclass(frozen=True)
class SizePlan:
    """The sizes for one edit: each source for the reasoner and for the VAE, the edit made, the edit returned."""

    condition: tuple[tuple[int, int], ...]
    vae: tuple[tuple[int, int], ...]
    output: tuple[int, int]  # the size the generator makes
    returned: tuple[int, int]  # the size given back (native: the first source's; qwen: the output)


@dataclass(frozen=True)
class ImagePolicy:
    """One sizing rule (see the module docstring). `grid`: pixels per generator token side (VAE downsampling x
    patch size); every VAE image and output has sides that are multiples of it."""

    name: str
    area: Optional[int] = None  # None: native sizes
    condition_area: Optional[int] = None  # None: the reasoner sees the VAE image
    size_from: str = "first"  # which source's aspect the edit takes: first | last
    max_sources: Optional[int] = None
    resample: str = "lanczos"

    @property
    def native(self) -> bool:
        return self.area is None

    def check_sources(self, count: int, where: str = "edit") -> None:
        at = f"{where}: " if where else ""
        if count < 1:
            raise ValueError(f"{at}an edit needs at least one source image")
        if self.max_sources is not None and count > self.max_sources:
            raise ValueError(f"{at}{count} source images, but the {self.name} image policy takes at most "
                             f"{self.max_sources} (QwenImageEditPlusPipeline models, policy qwen-image-edit-plus, "
                             "take several)")

    def multiple(self, grid: int) -> int:
        return math.lcm(SIDE_MULTIPLE, grid)

    def plan(self, sizes: Sequence[tuple[int, int]], grid: int, where: str = "edit") -> SizePlan:
        """The sizes for an edit of sources of `sizes` ((height, width) each)."""
        self.check_sources(len(sizes), where)
        if self.native:
            on_grid = tuple((max(grid, round(h / grid) * grid), max(grid, round(w / grid) * grid)) for h, w in sizes)
            return SizePlan(condition=on_grid, vae=on_grid, output=on_grid[0], returned=tuple(sizes[0]))
        m = self.multiple(grid)
        vae = tuple(fit_area(h, w, self.area, m) for h, w in sizes)
        condition = vae if self.condition_area is None else tuple(
            fit_area(h, w, self.condition_area, SIDE_MULTIPLE) for h, w in sizes)
        output = fit_area(*sizes[-1 if self.size_from == "last" else 0], self.area, m)
        return SizePlan(condition=condition, vae=vae, output=output, returned=output)

    def target_size(self, height: int, width: int, grid: int) -> tuple[int, int]:
        """A text-to-image target's size (no source): about `area` pixels in its own aspect."""
        if self.native:
            raise ValueError("the native policy sizes targets by the training buckets")
        return fit_area(height, width, self.area, self.multiple(grid))

    def prepare(self, images: Sequence[np.ndarray], grid: int, where: str = "edit"
                ) -> tuple[list[np.ndarray], list[np.ndarray], SizePlan]:
        """The sources resized for the reasoner and for the VAE, and the plan."""
        plan = self.plan([np.asarray(i).shape[:2] for i in images], grid, where)
        condition = [resize(i, *s, self.resample) for i, s in zip(images, plan.condition)]
        vae = [resize(i, *s, self.resample) for i, s in zip(images, plan.vae)]
        return condition, vae, plan


def policy_for(config: ModelConfig | None = None, images: ImagesConfig | None = None,
               pipeline: Optional[str] = None) -> ImagePolicy:
    """The policy of a model config (`model.images`, `auto` resolved by `model.pipeline`)."""
    if config is not None:
        images, pipeline = config.images, config.pipeline
    images = images or ImagesConfig()
    name = images.resolved(pipeline)
    if name == "native":
        return ImagePolicy("native", resample="bicubic")
    area = images.area or QWEN_AREA
    if name == "qwen-image-edit":
        return ImagePolicy(name, area=area, max_sources=1)
    if name == "qwen-image-edit-plus":
        return ImagePolicy(name, area=area, condition_area=images.condition_area or QWEN_PLUS_CONDITION_AREA,
                           size_from="last")
    raise ValueError(f"model.images.policy: {name!r} is not an image policy")


__all__ = ["ImagePolicy", "QWEN_AREA", "QWEN_PLUS_CONDITION_AREA", "SizePlan", "fit_area", "policy_for", "resize"]
