"""Flow-matching sampling: Euler steps over a shifted sigma schedule, true CFG with norm rescale, packed.

The schedule is Qwen-Image's: sigmas linspace(1, 1/steps), shifted by the exponential time shift with
mu linear in the target's token count (0.5 at 256 tokens, 0.9 at 8192: the same `models.timesteps` rule
the training loss uses), optionally stretched to end at `shift_terminal`, then a final 0. Each Euler step is
x <- x + (sigma_next - sigma) * v, in float32, as `diffusers.FlowMatchEulerDiscreteScheduler.step`.

Every sample of a batch has its own size, seed, schedule and guidance: all samples (and, with guidance,
their negative-prompt twins) run as one packed row per step. Noise is drawn per sample from its own seed,
so a sample's result does not depend on what else is in the batch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from reasonedit.config.model import ScheduleConfig
from reasonedit.inference import cancel
from reasonedit.models.generator import GeneratorSample, patchify, unpatchify
from reasonedit.models.timesteps import linear_mu, shift_timesteps

log = logging.getLogger(__name__)

# predict(samples) -> one velocity (C, h, w) per sample: ReasonEditModel.predict has this shape
Predict = Callable[[Sequence[GeneratorSample]], list[torch.Tensor]]


@dataclass
class SamplerConfig(ScheduleConfig):
    """How sigmas are scheduled (the model's `schedule`) and guided; steps and guidance come per request."""

    norm_rescale: bool = True  # rescale the guided velocity to the conditional one's norm, per token

    @classmethod
    def for_model(cls, schedule: ScheduleConfig, **overrides) -> "SamplerConfig":
        """The sampler of a model whose config carries `schedule` (a diffusers folder's scheduler settings)."""
        return cls(**{**asdict(schedule), **overrides})

    def mu(self, tokens: int) -> float:
        """The exponential shift's mu for a target of `tokens` image tokens."""
        if self.shift == "fixed":
            return float(self.fixed_mu)
        return float(linear_mu(tokens, self.base_shift, self.max_shift, self.base_tokens, self.max_tokens))


def sigma_schedule(steps: int, tokens: int, config: SamplerConfig | None = None) -> torch.Tensor:
    """(steps + 1,) float32 sigmas from ~1 down to 0 for a target of `tokens` image tokens."""
    config = config or SamplerConfig()
    if steps < 1:
        raise ValueError(f"num_inference_steps: must be at least 1, got {steps}")
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    sigmas = shift_timesteps(base, torch.tensor(config.mu(tokens), dtype=torch.float64))
    if config.shift_terminal is not None:
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - config.shift_terminal))
    return torch.cat([sigmas.float(), torch.zeros(1)])


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float, patch_size: int,
                    norm_rescale: bool = True) -> torch.Tensor:
    """True CFG, uncond + scale (cond - uncond), then rescaled per token to the conditional prediction's norm
    (as Qwen-Image-Edit does): latents (C, h, w) in and out; tokens are the generator's patches."""
    combined = uncond + scale * (cond - uncond)
    if not norm_rescale:
        return combined
    c, g = patchify(cond.float(), patch_size), patchify(combined.float(), patch_size)  # (N, C * p * p)
    rescaled = g * (c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True))
    return unpatchify(rescaled, tuple(cond.shape), patch_size).to(cond.dtype)


@dataclass
class SampleSpec:
    """One sample to draw: its condition, the clean source latents, the target's latent shape and its options."""

    text_states: torch.Tensor  # (T, hidden)
    sources: Sequence[torch.Tensor]  # clean (C, h, w) latents
    shape: tuple[int, int, int]  # the target latent (C, h, w)
    seed: int = 0
    guidance_scale: float = 1.0
    negative_states: Optional[torch.Tensor] = None  # (T', hidden); true CFG when given and guidance_scale > 1


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting latents of one sample: N(0, 1) from its own seed, on the CPU (same numbers on any device)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)


def sample(predict: Predict, specs: Sequence[SampleSpec], steps: int, patch_size: int,
           config: SamplerConfig | None = None, progress: Callable[[int, int], None] | None = None
           ) -> list[torch.Tensor]:
    """Denoise every spec from its seed's noise in `steps` Euler steps; returns the clean (C, h, w) latents."""
    config = config or SamplerConfig()
    config.validate()
    if not specs:
        return []
    latents = [initial_noise(s.shape, s.seed) for s in specs]
    schedules = [sigma_schedule(steps, (s.shape[-2] // patch_size) * (s.shape[-1] // patch_size), config)
                 for s in specs]
    guided = [s.negative_states is not None and s.guidance_scale > 1.0 for s in specs]
    for i in range(steps):
        cancel.check("sampling")  # work given up by its caller (a timed-out request) stops before the next step
        batch = []
        for s, x, sig in zip(specs, latents, schedules):
            batch.append(GeneratorSample(text_states=s.text_states, target=x, sources=list(s.sources),
                                         timestep=float(sig[i])))
        for s, x, sig, g in zip(specs, latents, schedules, guided):
            if g:  # the negative prompt's twin rides in the same packed row
                batch.append(GeneratorSample(text_states=s.negative_states, target=x, sources=list(s.sources),
                                             timestep=float(sig[i])))
        with torch.no_grad():
            preds = predict(batch)
        uncond = iter(preds[len(specs):])
        for j, (s, sig, g) in enumerate(zip(specs, schedules, guided)):
            v = preds[j].float().cpu()
            if g:
                v = guided_velocity(v, next(uncond).float().cpu(), s.guidance_scale, patch_size, config.norm_rescale)
            latents[j] = latents[j] + (sig[i + 1] - sig[i]) * v  # float32 Euler step, as diffusers
        if progress is not None:
            progress(i + 1, steps)
    return latents


__all__ = ["Predict", "SampleSpec", "SamplerConfig", "guided_velocity", "initial_noise", "sample", "sigma_schedule"]
