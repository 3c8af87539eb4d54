"""Reuse the reasoner's vision-tower embeddings of an image across the calls of the loop.

One round asks the reasoner about the same source image up to three times (think, describe, decide), and
every round asks about it again. `VisionCache` keeps each image's merged vision embeddings, keyed by the
image's content, and `cached_generate` hands them to `transformers`' generate as precomputed
`mm_encoder_outputs`, so the vision tower runs once per distinct image. The text is the same as
`Reasoner.generate`'s: greedy decoding, cut at `<|im_end|>`, decision tokens kept. The built-in thinker's
default is the stronger `prefix_cache` (the language model's KV over system prompt + image); this is its
`cache="vision"` option.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from reasonedit.inference.lru import LRU
from reasonedit.models.processor import Messages, image_parts

if TYPE_CHECKING:
    from reasonedit.models.reasoner import Reasoner


def image_key(image) -> bytes:
    """A digest of an image's pixels, shape and dtype: equal images share their embeddings."""
    a = np.ascontiguousarray(np.asarray(image))
    h = hashlib.blake2b(a.tobytes(), digest_size=16)
    h.update(repr((a.shape, a.dtype.str)).encode())
    return h.digest()


class VisionCache(LRU[bytes, torch.Tensor]):
    """Least-recently-used store of per-image vision embeddings ((tokens, hidden) tensors)."""

    def __init__(self, capacity: int = 32):
        super().__init__(capacity, "VisionCache")
        self.hits = self.misses = 0


def image_embeddings(reasoner: "Reasoner", images: Sequence, pixel_values: torch.Tensor, grid: torch.Tensor,
                     cache: VisionCache) -> tuple[torch.Tensor, ...]:
    """Each image's merged vision embeddings, from the cache or from one vision-tower call for the rest."""
    keys = [image_key(im) for im in images]
    chunks = torch.split(pixel_values, grid.prod(-1).tolist())  # each image's patches
    found = {k: cache.get(k) for k in dict.fromkeys(keys)}
    todo = [keys.index(k) for k, v in found.items() if v is None]  # first occurrence of each new image
    cache.hits += len(keys) - len(todo)
    cache.misses += len(todo)
    if todo:
        model = reasoner.model
        pixels = torch.cat([chunks[i] for i in todo]).to(reasoner.device)
        out = model.model.get_image_features(pixels, grid[todo].to(reasoner.device), return_dict=True)
        for i, embeds in zip(todo, out.pooler_output):
            found[keys[i]] = embeds.detach()
            cache.put(keys[i], embeds.detach())
    return tuple(found[k] for k in keys)


@torch.no_grad()
def cached_generate(reasoner: "Reasoner", conversations: Sequence[Messages], cache: VisionCache,
                    max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to a batch of conversations, with their images' embeddings taken from `cache`."""
    conversations = list(conversations)
    batch = reasoner.processor(conversations, add_generation_prompt=True, padding_side="left")
    tok = reasoner.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    extra = {}
    if "pixel_values" in batch:
        images = [im for c in conversations for im in image_parts(c)]
        pixels, grid = batch.pop("pixel_values"), batch["image_grid_thw"]
        embeds = image_embeddings(reasoner, images, pixels, grid, cache)
        extra["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=embeds)}
    batch = batch.to(reasoner.device)
    out = reasoner.model.generate(**batch, **extra, generation_config=config)
    return reasoner.decode_answers(out[:, batch["input_ids"].shape[1]:])


__all__ = ["VisionCache", "cached_generate", "image_embeddings", "image_key"]
