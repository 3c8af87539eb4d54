"""A disk cache of a frozen VAE's latents, for the stages that train the generator (2 and 3).

Stages 2 and 3 never train the VAE, and its encoding is deterministic (the posterior's mode), so a latent
computed once per image is exactly the latent computed again: caching it changes no number of the run.
Each entry is keyed by the codec's **fingerprint** (every parameter and buffer, its class and config) and
the **image** (its uint8 bytes and shape). A changed VAE or image is simply not found; entries are written
atomically, so concurrent ranks can share one folder, each proved to resolve inside `root` first.

    root/<fingerprint>/<key[:2]>/<key>.safetensors    {"latents": (C, h, w) float32}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reasonedit.data.condition_cache import CacheStats, TensorFiles, hash_tensors


def codec_fingerprint(codec: torch.nn.Module) -> str:
    """A hash of everything that decides a latent except the image: weights, buffers, class and config."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(codec).__qualname__.encode())
    hash_tensors(h, [*sorted(codec.named_parameters()), *sorted(codec.named_buffers())])
    config = getattr(getattr(codec, "vae", None), "config", None)
    h.update(json.dumps(dict(config) if config is not None else {"patch_size": getattr(codec, "patch_size", None)},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def image_key(image: np.ndarray) -> str:
    """A hash of one uint8 (H, W, 3) image."""
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype}:{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


class LatentCache:
    """Latents of a frozen codec, encoded once per image and read back after."""

    def __init__(self, root: str | os.PathLike, codec: torch.nn.Module):
        self.codec = codec
        self.fingerprint = codec_fingerprint(codec)
        self.files = TensorFiles(Path(root) / self.fingerprint, "latents", "latent cache", root=Path(root))
        self.stats: CacheStats = self.files.stats

    @torch.no_grad()
    def latents(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """One (C, h, w) float32 CPU tensor per uint8 (H, W, 3) image: from disk where cached, else encoded."""
        from reasonedit.models.vae import encode_image

        keys = [image_key(im) for im in images]
        out: list[torch.Tensor | None] = [self.files.read(k) for k in keys]
        missing = [i for i, z in enumerate(out) if z is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        for i in missing:  # one image at a time, as without the cache: the same numbers to the last bit
            out[i] = encode_image(self.codec, images[i])
            self.files.write(keys[i], out[i])
        return out  # type: ignore[return-value]


__all__ = ["LatentCache", "codec_fingerprint", "image_key"]
