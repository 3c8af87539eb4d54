"""Latent codecs: the real Qwen-Image VAE and a parameter-free patch codec for the shapes world.

Both map pixels in [-1, 1], shape (B, 3, H, W), to normalised latents (B, C, H/f, W/f) and back.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

PATCH_CONFIG = "patch_codec.json"


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded and clamped."""
    return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


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
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".patch.")
        with os.fdopen(fd, "w") as f:
            json.dump({"kind": "patch", "patch_size": self.patch_size}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / PATCH_CONFIG)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PatchCodec":
        doc = json.loads((Path(path) / PATCH_CONFIG).read_text())
        return cls(int(doc["patch_size"]))


class QwenImageVAE(torch.nn.Module):
    """diffusers' AutoencoderKLQwenImage on single frames, latents normalised per channel."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        cfg = vae.config
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
        dist = self.vae.encode(pixels[:, :, None]).latent_dist  # a one-frame video: (B, 3, 1, H, W)
        z = dist.sample(generator) if sample else dist.mode()
        return (z[:, :, 0] - self.mean.to(z)) / self.std.to(z)  # (B, C, H/8, W/8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.std.to(latents) + self.mean.to(latents)
        return self.vae.decode(z[:, :, None]).sample[:, :, 0]

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "QwenImageVAE":
        from diffusers import AutoencoderKLQwenImage
        return cls(AutoencoderKLQwenImage.from_pretrained(path, local_files_only=True, **kwargs))

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


__all__ = ["PatchCodec", "QwenImageVAE", "load_codec", "to_pixels", "to_uint8"]
