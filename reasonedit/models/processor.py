"""Chat messages and images to Qwen2.5-VL model inputs, without torchvision.

The pixels go through transformers' PIL/numpy `Qwen2VLImageProcessorPil` (the torchvision one is
not needed): resize to multiples of 28 inside [min_pixels, max_pixels], CLIP mean/std, and the
(grid_t * grid_h * grid_w, 3 * 2 * 14 * 14) patch layout the vision tower reads. The text goes
through the tokenizer's chat template, with every `<|image_pad|>` expanded to one token per
merged 2x2 patch group. `mm_token_type_ids` is always returned: without it transformers 5
silently gives image tokens 1-D positions instead of Qwen2.5-VL's 3-axis RoPE.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from reasonedit.models.tokenizer import IMAGE_PAD_TOKEN, single_token_id

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]  # one conversation: [{"role": ..., "content": str | [parts]}]
Image = Union[np.ndarray, "PIL.Image.Image"]  # noqa: F821  (H, W, 3) uint8 RGB, or a PIL image

# Qwen2.5-VL's released preprocessor settings.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGE_TOKEN_TYPE = 1  # transformers' mm_token_type_ids: 0 text, 1 image, 2 video


def build_image_processor(
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> Qwen2VLImageProcessorPil:
    """The Qwen2.5-VL image processor (PIL backend) with the given pixel bounds and vision geometry."""
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"image processor: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )


def processor_min_pixels(image_processor) -> int:
    """The image processor's lower pixel bound (transformers 5 keeps it as size.shortest_edge)."""
    size = getattr(image_processor, "size", None)
    value = getattr(size, "shortest_edge", None) if size is not None else None
    if value is None and isinstance(size, dict):
        value = size.get("shortest_edge")
    return int(value or getattr(image_processor, "min_pixels", None) or MIN_PIXELS)


def image_parts(messages: Messages) -> list[Image]:
    """The images of a conversation, in the order the chat template renders their placeholders."""
    images = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            continue
        for part in content:
            if part.get("type") == "video" or "video" in part:
                raise ValueError("ReasonerProcessor handles images only; found a video part in the messages")
            if part.get("type") == "image" or "image" in part or "image_url" in part:
                if part.get("image") is None:
                    raise ValueError(
                        "an image part has no 'image' array: give {'type': 'image', 'image': array} so the "
                        "processor can make its pixels"
                    )
                images.append(part["image"])
    return images


class ReasonerProcessor:
    """Tokenizer plus image processor: conversations in, Qwen2.5-VL model inputs out."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Qwen2VLImageProcessorPil):
        if tokenizer.chat_template is None:
            raise ValueError("ReasonerProcessor: the tokenizer has no chat_template; Qwen2.5-VL prompts need one")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = single_token_id(tokenizer, IMAGE_PAD_TOKEN)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def render(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """The chat template's text for one conversation, image placeholders not yet expanded."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_one(self, messages: Messages, *, add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
        """Unpadded inputs of one conversation: ids (1, T) and, when it has images, their patches."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        images = image_parts(messages)
        if text.count(IMAGE_PAD_TOKEN) != len(images):
            raise ValueError(
                f"the rendered prompt has {text.count(IMAGE_PAD_TOKEN)} {IMAGE_PAD_TOKEN} placeholders but the "
                f"messages carry {len(images)} images; do not write {IMAGE_PAD_TOKEN} in message text"
            )
        out: dict[str, torch.Tensor] = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            grid = pixels["image_grid_thw"]  # (n_images, 3) patches along t, h, w
            # Split on the placeholder and rejoin with each image's run of pad tokens.
            pieces = text.split(IMAGE_PAD_TOKEN)
            counts = (grid.prod(-1) // self.merge_size**2).tolist()
            text = pieces[0] + "".join(IMAGE_PAD_TOKEN * n + rest for n, rest in zip(counts, pieces[1:]))
            out["pixel_values"] = pixels["pixel_values"]  # (sum t*h*w, 3 * 2 * 14 * 14)
            out["image_grid_thw"] = grid
        input_ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)])  # (1, T)
        out["input_ids"] = input_ids
        out["attention_mask"] = torch.ones_like(input_ids)
        out["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32) * IMAGE_TOKEN_TYPE
        return out

    def __call__(
        self,
        conversations: Messages | Sequence[Messages],
        *,
        add_generation_prompt: bool = True,
        padding_side: str = "left",
    ) -> BatchFeature:
        """Batch inputs for one conversation or several, padded on `padding_side` (left to generate).

        Keys: input_ids, attention_mask, mm_token_type_ids (B, T) and, when any image is present,
        pixel_values (all images' patches, in order) and image_grid_thw (n_images, 3).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not conversations:
            raise ValueError("ReasonerProcessor: no conversations to encode")
        samples = [self.encode_one(c, add_generation_prompt=add_generation_prompt) for c in conversations]
        return collate(samples, pad_id=self.tokenizer.pad_token_id, padding_side=padding_side)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files and preprocessor_config.json into `path`."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None, **image_defaults: int
    ) -> "ReasonerProcessor":
        """Load from a local directory (`tokenizer`, when given, is used instead of reading it again).
        Without preprocessor_config.json, `image_defaults` (or Qwen2.5-VL's defaults) build the image processor."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"processor directory {path} does not exist")
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if (path / PREPROCESSOR_FILE).is_file():
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        else:
            logger.info("%s has no %s; using the Qwen2.5-VL image defaults", path, PREPROCESSOR_FILE)
            image_processor = build_image_processor(**image_defaults)
        return cls(tokenizer, image_processor)


def collate(samples: Sequence[dict[str, torch.Tensor]], *, pad_id: int, padding_side: str = "left") -> BatchFeature:
    """Pad per-sample inputs (each (1, T_i)) into one batch; images are concatenated in sample order."""
    length = max(s["input_ids"].shape[1] for s in samples)
    batch: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
    for s in samples:
        pad = length - s["input_ids"].shape[1]
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            filler = torch.full((1, pad), fill, dtype=s[key].dtype, device=s[key].device)
            pair = (filler, s[key]) if padding_side == "left" else (s[key], filler)
            batch[key].append(torch.cat(pair, dim=1))
    out: dict[str, torch.Tensor] = {key: torch.cat(rows) for key, rows in batch.items()}
    with_images = [s for s in samples if "pixel_values" in s]
    if with_images:
        out["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
        out["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
    return BatchFeature(out)


__all__ = ["Image", "MAX_PIXELS", "MIN_PIXELS", "Messages", "ReasonerProcessor", "build_image_processor", "collate",
           "image_parts"]
