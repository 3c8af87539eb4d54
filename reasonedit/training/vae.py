"""Train a tiny Qwen-Image VAE on renders of the shapes world: what a tiny preset has in place of the real
VAE's pretraining, so the generator works in 16-channel latents in 2x2 patches as Qwen-Image's does.

Scenes are drawn fresh for every step (unlimited data, never the same batch twice), from the train split only
(the content hash that splits the dataset), and may hold more shapes than the world's scenes: a dense scene
teaches the same templates at more cells per render. After training, the latent normalisation is set from the
trained VAE's latents over world renders, and held-out scenes (val or test split) are encoded, decoded and read
back by the exact oracle.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from reasonedit.config import VAETrainConfig
from reasonedit.shapes.oracle import Oracle
from reasonedit.shapes.world import PALETTE, Scene, Shape, ShapesWorld
from reasonedit.shapes.synth import Synthesizer, split_of
from reasonedit.models.vae import QwenImageVAE, single_frame, to_pixels, to_uint8

from .schedule import make_scheduler

log = logging.getLogger("reasonedit.train")


@dataclass
class ReadBack:
    """How many held-out scenes the oracle reads back exactly from decode(encode(render))."""

    split: str
    scenes: int
    exact: int
    mean_abs_error: float  # per pixel and channel, in 0-255 levels

    @property
    def rate(self) -> float:
        return self.exact / self.scenes if self.scenes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "rate": self.rate}


@dataclass
class VAETrainReport:
    steps: int
    seconds: float
    parameters: int
    geometry: dict
    loss_first: float  # mean training loss over the first log window
    loss_last: float  # ... and over the last
    read_back: ReadBack
    untrained_mean_abs_error: float
    # held-out scenes with one cell redrawn: the share of the other cells' latent positions that stay put
    locality: float = float("nan")  # the same held-out scenes through the VAE before training
    latents_mean: list[float] = field(default_factory=list)
    latents_std: list[float] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["read_back"] = self.read_back.to_dict()
        d["steps_per_s"] = self.steps_per_s
        return d


# -- scenes and renders ------------------------------------------------------------------------------------
def training_scene(world: ShapesWorld, rng: random.Random, max_shapes: int) -> Scene:
    """A random train-split scene with world.min_shapes..max_shapes shapes."""
    cfg = world.config
    while True:
        scene = world.random_scene(rng, rng.randint(cfg.min_shapes, max_shapes))
        if split_of(scene) == "train":
            return scene


def one_cell_changed(world: ShapesWorld, scene: Scene, rng: random.Random) -> tuple[Scene, tuple[int, int]]:
    """`scene` with the content of one random cell redrawn (a shape added, removed or replaced), and that cell."""
    cfg = world.config
    cell = rng.choice(cfg.cells)
    others = tuple(s for s in scene.shapes if s.cell != cell)
    if scene.shape_at(cell) is not None and (len(others) >= cfg.min_shapes and rng.random() < 0.5):
        return Scene(scene.background, others), cell
    while True:  # a shape the cell did not hold
        new = Shape(cell[0], cell[1], rng.choice(cfg.kinds), world.random_color(rng, scene.background),
                    rng.choice(cfg.sizes))
        if new != scene.shape_at(cell):
            return Scene(scene.background, others + (new,)), cell


def cell_masks(world: ShapesWorld, cells: Sequence[tuple[int, int]], latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) True at the latent positions outside each sample's `cells` entry (its grid cell in latents)."""
    h, w = latent_hw
    g = world.config.grid
    if h % g or w % g:
        raise ValueError(f"vae_train.locality_weight: the {h}x{w} latent does not split into the world's {g}x{g} "
                         "cells; choose world.image_size so that each cell is a whole number of latent positions")
    ch, cw = h // g, w // g
    out = torch.ones(len(cells), h, w, dtype=torch.bool)
    for i, (r, c) in enumerate(cells):
        out[i, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = False
    return out


def locality_loss(mean_a: torch.Tensor, mean_b: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Squared difference of two renders' posterior means where their cells agree (`outside`, (B, h, w)),
    relative to the latents' own spread: an edit of one cell should leave every other cell's latents alone."""
    diff = (mean_a - mean_b).square().mean(dim=1)  # (B, h, w)
    scale = torch.cat([mean_a, mean_b]).detach().var() + 1e-6
    return diff[outside].mean() / scale


def heldout_scenes(world: ShapesWorld, split: str, n: int, seed: int) -> list[Scene]:
    """`n` scenes of `split` as the dataset draws them (the world's shape counts)."""
    synth, rng = Synthesizer(world, seed=seed), random.Random(f"vae/{seed}/{split}")
    return [synth.scene(rng, split) for _ in range(n)]


def render(world: ShapesWorld, scenes: Sequence[Scene]) -> torch.Tensor:
    """uint8 (B, H, W, 3) renders."""
    return torch.from_numpy(np.stack([world.render(s) for s in scenes]))


def ink_mask(images: torch.Tensor, outline: int = 0) -> torch.Tensor:
    """(B, H, W) True where a uint8 image's pixel differs from its dominant colour (the background of a render),
    or lies within `outline` pixels of such a pixel."""
    rgb = images.long()
    packed = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).flatten(1)  # (B, H*W)
    dominant = packed.mode(dim=1).values
    ink = (packed != dominant[:, None]).view(images.shape[:3])
    if outline > 0:
        ink = torch.nn.functional.max_pool2d(ink[:, None].float(), 2 * outline + 1, stride=1, padding=outline)[:, 0] > 0
    return ink


# -- loss --------------------------------------------------------------------------------------------------
def palette_pixels(colors: Sequence[str]) -> torch.Tensor:
    """(P, 3) palette colours in [-1, 1]."""
    return torch.tensor([PALETTE[c] for c in colors], dtype=torch.float32) / 127.5 - 1.0


def reconstruction_loss(decoded: torch.Tensor, target: torch.Tensor, ink: torch.Tensor, mean: torch.Tensor,
                        logvar: torch.Tensor, cfg: VAETrainConfig, palette: torch.Tensor | None = None
                        ) -> dict[str, torch.Tensor]:
    """Pixel MSE and L1, each pixel weighted 1 + ink_weight where `ink` (the weights normalised to mean 1, so the
    shapes' few pixels are not outvoted by the background), the KL to N(0, 1) per latent element, and with a
    palette, a cross-entropy that each decoded pixel's nearest palette colour is its target's (the oracle's
    reading of a pixel): it makes blended edge pixels commit to one side."""
    weight = 1.0 + cfg.ink_weight * ink[:, None].float()  # (B, 1, H, W)
    weight = weight / weight.mean()
    err = decoded - target  # (B, 3, H, W)
    terms = {"mse": (err.square() * weight).mean(), "l1": (err.abs() * weight).mean(),
             "kl": 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()}
    loss = cfg.mse_weight * terms["mse"] + cfg.l1_weight * terms["l1"] + cfg.kl_weight * terms["kl"]
    if palette is not None and cfg.palette_weight > 0:
        pixels = decoded.permute(0, 2, 3, 1).reshape(-1, 3)  # (B*H*W, 3)
        labels = torch.cdist(target.permute(0, 2, 3, 1).reshape(-1, 3), palette).argmin(1)
        logits = -torch.cdist(pixels, palette).square() / cfg.palette_temperature  # (B*H*W, P)
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        terms["palette"] = (ce * weight.flatten()).mean()
        loss = loss + cfg.palette_weight * terms["palette"]
    terms["loss"] = loss
    return terms


# -- measurement -------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(vae: QwenImageVAE, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> decode(encode(images)) as uint8, deterministically (the posterior's mode)."""
    device = next(vae.parameters()).device
    out = [to_uint8(vae.decode(vae.encode(to_pixels(chunk).to(device)))).cpu() for chunk in images.split(batch)]
    return torch.cat(out)


def read_back(world: ShapesWorld, vae: QwenImageVAE, scenes: Sequence[Scene], split: str) -> ReadBack:
    images = render(world, scenes)
    decoded = reconstruct(vae, images)
    oracle = Oracle(world)
    exact = sum(oracle.score(decoded[i].numpy(), s).success for i, s in enumerate(scenes))
    error = (decoded.float() - images.float()).abs().mean().item()
    return ReadBack(split, len(scenes), exact, error)


@torch.no_grad()
def latent_locality(world: ShapesWorld, vae: QwenImageVAE, scenes: Sequence[Scene], seed: int,
                    tolerance: float = 0.1) -> float:
    """The share of latent positions outside a redrawn cell whose normalised latents all move by less than
    `tolerance` when that one cell of the scene changes: 1.0 means edits are local in latent space."""
    rng = random.Random(f"vae/{seed}/locality")
    twins = [one_cell_changed(world, sc, rng) for sc in scenes]
    device = next(iter(vae.parameters()), torch.empty(0)).device  # the patch codec has no parameters
    za = vae.encode(to_pixels(render(world, scenes)).to(device))
    zb = vae.encode(to_pixels(render(world, [t for t, _ in twins])).to(device))
    outside = cell_masks(world, [c for _, c in twins], tuple(za.shape[-2:])).to(device)
    still = (za - zb).abs().amax(dim=1) < tolerance  # (B, h, w)
    return float(still[outside].float().mean())


@torch.no_grad()
def latent_stats(vae: QwenImageVAE, images: torch.Tensor, batch: int = 50) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the VAE's raw latents (the posterior's mode) over uint8 images."""
    device = next(vae.parameters()).device
    zs = []
    with single_frame(vae.vae):
        for chunk in images.split(batch):
            zs.append(vae.vae.encode(to_pixels(chunk).to(device)[:, :, None]).latent_dist.mode()[:, :, 0].cpu())
    z = torch.cat(zs).transpose(0, 1).flatten(1).double()  # (C, N*h*w)
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-6).tolist()


# -- training ----------------------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train_vae(world: ShapesWorld, vae: QwenImageVAE, cfg: VAETrainConfig) -> tuple[QwenImageVAE, VAETrainReport]:
    """Train `vae` in place on fresh world renders; set its latent normalisation; measure the oracle read-back."""
    cfg.validate()
    c = vae.vae.config
    geometry = {"base_dim": c.base_dim, "dim_mult": list(c.dim_mult), "num_res_blocks": c.num_res_blocks,
                "z_dim": c.z_dim, "temperal_downsample": list(c.temperal_downsample)}
    params = list(vae.parameters())
    n_params = sum(p.numel() for p in params)
    cells = world.config.grid ** 2
    max_shapes = cfg.max_shapes or cells
    if not world.config.min_shapes <= max_shapes <= cells:
        raise ValueError(f"vae_train.max_shapes: {max_shapes} must lie in [world.min_shapes="
                         f"{world.config.min_shapes}, world.grid**2={cells}]")
    heldout = heldout_scenes(world, cfg.eval_split, cfg.eval_scenes, cfg.seed)
    vae.eval()
    untrained = read_back(world, vae, heldout, cfg.eval_split).mean_abs_error
    log.info("vae: trains %s (%d parameters) on fresh %dpx renders, up to %d shapes a scene; lr %.1e, %d steps "
             "of %d", geometry, n_params, world.config.image_size, max_shapes, cfg.lr, cfg.steps, cfg.batch)

    rng = random.Random(f"vae/{cfg.seed}/train")
    device = next(vae.parameters()).device
    noise = torch.Generator(device=device).manual_seed(cfg.seed)
    palette = palette_pixels(list(PALETTE)).to(device)  # the oracle reads pixels against the whole palette
    optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=True)  # fused: a tenth of a tiny step's time on a CPU
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    weights = {"mse": cfg.mse_weight, "l1": cfg.l1_weight, "palette": cfg.palette_weight, "kl": cfg.kl_weight,
               "locality": cfg.locality_weight}
    window: list[float] = []  # the losses since the last log line
    loss_first = loss_last = float("nan")
    started = time.perf_counter()
    vae.train()
    with single_frame(vae.vae):
        for step in range(1, cfg.steps + 1):
            scenes = [training_scene(world, rng, max_shapes) for _ in range(cfg.batch)]
            if cfg.locality_weight > 0:  # each scene and its twin with one cell redrawn, in one batch
                twins = [one_cell_changed(world, sc, rng) for sc in scenes]
                scenes = scenes + [t for t, _ in twins]
            images = render(world, scenes)
            target = to_pixels(images).to(device)  # (B, 3, H, W) in [-1, 1]
            posterior = vae.vae.encode(target[:, :, None]).latent_dist  # (B, 2 z, 1, h, w)
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise, device=device)
            decoded = vae.vae.decode(z).sample[:, :, 0]
            ink = ink_mask(images, cfg.ink_outline).to(device)
            terms = reconstruction_loss(decoded, target, ink, posterior.mean, posterior.logvar, cfg, palette)
            if cfg.locality_weight > 0:
                mean = posterior.mean[:, :, 0]
                outside = cell_masks(world, [c for _, c in twins], tuple(mean.shape[-2:])).to(device)
                terms["locality"] = locality_loss(mean[:cfg.batch], mean[cfg.batch:], outside)
                terms["loss"] = terms["loss"] + cfg.locality_weight * terms["locality"]
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            loss = terms["loss"].item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"vae step {step}: the loss is {loss}; lower vae_train.lr={cfg.lr}")
            window.append(loss)
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = sum(window) / len(window)
                loss_first = mean_loss if math.isnan(loss_first) else loss_first
                loss_last, window = mean_loss, []
                elapsed = time.perf_counter() - started
                shown = " ".join(f"{k} {terms[k].item():.4f}" for k, w in weights.items() if w and k in terms)
                log.info("vae step %d/%d | loss %.4f | %s | lr %.2e | %.2f step/s | eta %s", step, cfg.steps,
                         mean_loss, shown, lr, step / elapsed, _clock(elapsed / step * (cfg.steps - step)))
    seconds = time.perf_counter() - started
    vae.eval()

    stats_rng = random.Random(f"vae/{cfg.seed}/stats")
    synth = Synthesizer(world, seed=cfg.seed)
    mean, std = latent_stats(vae, render(world, [synth.scene(stats_rng, "train") for _ in range(cfg.stats_scenes)]))
    vae.set_latent_stats(mean, std)
    result = read_back(world, vae, heldout, cfg.eval_split)
    locality = latent_locality(world, vae, heldout, cfg.seed)
    log.info("vae: one cell of a held-out scene redrawn, %.1f%% of the other cells' latent positions stay within 0.1",
             100 * locality)
    log.info("vae: %d steps in %.1fs (%.2f step/s); held-out %s scenes read back exactly: %d/%d (%.1f%%), mean "
             "pixel error %.2f levels (untrained %.2f)", cfg.steps, seconds, cfg.steps / seconds, cfg.eval_split,
             result.exact, result.scenes, 100 * result.rate, result.mean_abs_error, untrained)
    report = VAETrainReport(cfg.steps, seconds, n_params, geometry, loss_first, loss_last, result, untrained,
                            locality, mean, std)
    return vae, report


__all__ = ["ReadBack", "VAETrainReport", "cell_masks", "heldout_scenes", "ink_mask", "latent_locality", "latent_stats", "locality_loss",
           "one_cell_changed", "palette_pixels", "read_back", "reconstruct", "reconstruction_loss", "render",
           "train_vae", "training_scene"]
