"""Latent codecs: the real Qwen-Image VAE and a parameter-free patch codec for the shapes world.

Both map pixels in [-1, 1], shape (B, 3, H, W), to normalised latents (B, C, H/f, W/f) and back.
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reasonedit.publish import atomic_write_text

PATCH_CONFIG = "patch_codec.json"


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded and clamped."""
    return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def encode_image(codec: torch.nn.Module, image: np.ndarray | torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
    """One uint8 (H, W, 3) image -> its (C, H / f, W / f) float32 latent, encoded alone on the codec's device and
    dtype (the patch codec, which has no parameters, on the CPU); moved to the CPU unless `to_cpu=False`."""
    weights = next(iter(codec.parameters()), None)
    device, dtype = (weights.device, weights.dtype) if weights is not None else (torch.device("cpu"), None)
    pixels = to_pixels(torch.as_tensor(np.ascontiguousarray(image))[None]).to(device, dtype)  # (1, 3, H, W)
    with torch.no_grad():
        latent = codec.encode(pixels)[0].float()
    return latent.cpu() if to_cpu else latent


class PatchCodec(torch.nn.Module):
    """Each p x p block of RGB pixels becomes one 3*p*p-channel latent: exact, no parameters."""

    def __init__(self, patch_size: int = 8):
        super().__init__()
        if patch_size <= 0:
            raise ValueError(f"vae.patch_size must be positive, got {patch_size}")
        self.patch_size = patch_size

    @property
    def latent_channels(self) -> int:
        return 3 * self.patch_size ** 2

    @property
    def downsample(self) -> int:
        return self.patch_size

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        if c != 3 or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image of shape {tuple(pixels.shape)} does not split into "
                             f"{self.patch_size}x{self.patch_size} patches of RGB")
        return F.pixel_unshuffle(pixels, self.patch_size)  # (B, 3*p*p, H/p, W/p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.patch_size)  # (B, 3, H, W)

    def save_pretrained(self, path: str | Path) -> None:
        atomic_write_text(Path(path) / PATCH_CONFIG, json.dumps({"kind": "patch", "patch_size": self.patch_size}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PatchCodec":
        doc = json.loads((Path(path) / PATCH_CONFIG).read_text())
        return cls(int(doc["patch_size"]))


def _single_frame_conv(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """QwenImageCausalConv3d.forward for one uncached frame: its causal padding puts zero frames before the
    frame, so only the kernel's last temporal slice meets data, and a 2-D convolution with it is the same
    result at a third of the work."""
    if x.shape[2] != 1 or cache_x is not None:
        return type(self).forward(self, x, cache_x)
    left, right, top, bottom = self._padding[:4]
    y = F.conv2d(F.pad(x[:, :, 0], (left, right, top, bottom)), self.weight[:, :, -1], self.bias, self.stride[1:])
    return y[:, :, None]  # (B, C, 1, H', W')


@contextlib.contextmanager
def single_frame(vae: torch.nn.Module) -> Iterator[None]:
    """Run an AutoencoderKLQwenImage's causal 3-D convolutions as 2-D ones on one-frame inputs (images);
    equal to the stock forward to float rounding, about twice as fast on a CPU. Nests; videos keep the stock path."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
    convs = [m for m in vae.modules() if isinstance(m, QwenImageCausalConv3d) and "forward" not in m.__dict__]
    for m in convs:
        m.forward = types.MethodType(_single_frame_conv, m)
    try:
        yield
    finally:
        for m in convs:
            del m.forward  # back to the class's own method


def init_for_images(vae: torch.nn.Module, seed: int = 0, logvar: float = -10.0) -> None:
    """Re-initialise a freshly built AutoencoderKLQwenImage so it trains quickly on images:
    - each causal 3-D kernel gets a 2-D kernel's initialisation in its last temporal slice and zeros elsewhere
      (a 2-D network inflated into the video layout: the stock init counts the zero-padded frames in its fan-in,
      so single frames lose signal layer after layer and a deep random VAE outputs a constant);
    - every residual branch (residual blocks' second conv, attention output) starts at zero, so the network
      starts as a short path of shortcuts;
    - the posterior's log-variance starts at `logvar`, nearly deterministic: with unit variance its noise would
      drown the small initial latents, and a small KL weight takes a long time to undo that."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (QwenImageAttentionBlock,
                                                                        QwenImageCausalConv3d,
                                                                        QwenImageResidualBlock)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, QwenImageCausalConv3d) and m.weight.shape[2] > 1:
                bound = 1.0 / math.sqrt(m.weight.shape[1] * m.weight.shape[3] * m.weight.shape[4])  # 2-D fan-in
                m.weight.zero_()
                m.weight[:, :, -1].uniform_(-bound, bound, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=g)
        for m in vae.modules():
            branch_out = (m.conv2 if isinstance(m, QwenImageResidualBlock)
                          else m.proj if isinstance(m, QwenImageAttentionBlock) else None)
            if branch_out is not None:
                branch_out.weight.zero_()
                branch_out.bias.zero_()
        z = vae.config.z_dim
        vae.quant_conv.weight[z:].zero_()  # (2 z, 2 z, 1, 1, 1): the second half of the outputs is the log-variance
        vae.quant_conv.bias[z:].fill_(logvar)


class QwenImageVAE(torch.nn.Module):
    """diffusers' AutoencoderKLQwenImage on single frames, latents normalised per channel."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self._stats_from_config()

    def _stats_from_config(self) -> None:
        """The normalisation buffers from the diffusers config's latents_mean / latents_std."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        if mean.shape[1] != cfg.z_dim or std.shape[1] != cfg.z_dim:
            raise ValueError(f"vae config: latents_mean/latents_std have {mean.shape[1]}/{std.shape[1]} "
                             f"entries, z_dim is {cfg.z_dim}")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def downsample(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def encode(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        with single_frame(self.vae):
            dist = self.vae.encode(pixels[:, :, None]).latent_dist  # a one-frame video: (B, 3, 1, H, W)
        z = dist.sample(generator) if sample else dist.mode()
        return (z[:, :, 0] - self.mean.to(z)) / self.std.to(z)  # (B, C, H/8, W/8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.std.to(latents) + self.mean.to(latents)
        with single_frame(self.vae):
            return self.vae.decode(z[:, :, None]).sample[:, :, 0]

    def set_latent_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the per-channel normalisation (diffusers' latents_mean / latents_std, saved with the config)."""
        z = self.latent_channels
        if len(mean) != z or len(std) != z or not all(s > 0 for s in std):
            raise ValueError(f"latent stats: need {z} means and {z} positive stds, got {len(mean)} and {list(std)}")
        self.vae.register_to_config(latents_mean=[float(m) for m in mean], latents_std=[float(s) for s in std])
        self._stats_from_config()

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "QwenImageVAE":
        from diffusers import AutoencoderKLQwenImage
        return cls(AutoencoderKLQwenImage.from_pretrained(path, local_files_only=True, **kwargs))

    @classmethod
    def random(cls, z_dim: int = 16, base_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
               num_res_blocks: int = 1, temperal_downsample: Sequence[bool] = (False, True, True),
               seed: int = 0) -> "QwenImageVAE":
        """A random Qwen-Image VAE of the given geometry, initialised for training on images (init_for_images);
        its latents are left unnormalised (mean 0, std 1) until set_latent_stats."""
        from diffusers import AutoencoderKLQwenImage
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(base_dim=base_dim, z_dim=z_dim, dim_mult=list(dim_mult),
                                         num_res_blocks=num_res_blocks,
                                         temperal_downsample=[bool(t) for t in temperal_downsample],
                                         latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
        init_for_images(vae, seed)
        return cls(vae.eval())

    @classmethod
    def tiny(cls, z_dim: int = 4, base_dim: int = 8, seed: int = 0) -> "QwenImageVAE":
        """A small random Qwen-Image VAE for tests (8x spatial downsampling like the real one)."""
        from diffusers import AutoencoderKLQwenImage
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                         temperal_downsample=[False, True, True],
                                         latents_mean=[0.1 * i for i in range(z_dim)],
                                         latents_std=[1.0 + 0.1 * i for i in range(z_dim)])
        return cls(vae.eval())


def load_codec(path: str | Path) -> PatchCodec | QwenImageVAE:
    """Whichever codec a folder holds."""
    path = Path(path)
    if (path / PATCH_CONFIG).is_file():
        return PatchCodec.from_pretrained(path)
    if (path / "config.json").is_file():
        return QwenImageVAE.from_pretrained(path)
    raise FileNotFoundError(f"{path} holds neither {PATCH_CONFIG} nor a diffusers VAE config.json")


__all__ = ["PatchCodec", "QwenImageVAE", "encode_image", "init_for_images", "load_codec", "single_frame", "to_pixels",
           "to_uint8"]
