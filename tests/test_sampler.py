import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

from reasonedit.inference.builtin import GeneratorEditor
from reasonedit.inference.sampler import (
    SampleSpec,
    SamplerConfig,
    guided_velocity,
    initial_noise,
    sample,
    sigma_schedule,
)
from reasonedit.inference.types import EditRequest
from reasonedit.config.model import ModelConfig
from reasonedit.models.generator import GeneratorSample
from reasonedit.models.model import ReasonEditModel

STEPS = 4


@pytest.fixture(scope="module")
def model():
    return ReasonEditModel.tiny(ModelConfig(), ["make the red circle blue", "remove the star"], seed=0).eval()


@pytest.fixture(scope="module")
def inputs(model):
    """Two sources of different sizes: their condition states, negative states and latents."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)]
    with torch.no_grad():
        states = model.encode_condition(images, ["make the red circle blue", "remove the star"])
        negatives = model.encode_condition(images, [" ", " "])
        latents = model.encode_images(images)
    return states, negatives, latents


def qwen_image_scheduler(**overrides):
    """The scheduler as Qwen-Image's scheduler_config.json sets it up."""
    config = dict(use_dynamic_shifting=True, time_shift_type="exponential", base_shift=0.5, max_shift=0.9,
                  base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02)
    config.update(overrides)
    return FlowMatchEulerDiscreteScheduler(**config)


def reference(model, states, latent, seed, steps, guidance=1.0, negative=None):
    """One sample alone through diffusers' scheduler, as the Qwen-Image-Edit pipeline drives it."""
    scheduler = qwen_image_scheduler()
    tokens = (latent.shape[1] // 2) * (latent.shape[2] // 2)
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    x = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        with torch.no_grad():
            v = model.predict([GeneratorSample(states, x, [latent], timestep=float(t) / 1000)])[0]
            if negative is not None:
                u = model.predict([GeneratorSample(negative, x, [latent], timestep=float(t) / 1000)])[0]
                v = guided_velocity(v, u, guidance, 2)
        x = scheduler.step(v, t, x).prev_sample
    return x


def test_packed_batch_equals_diffusers_scheduler_per_sample(model, inputs):
    states, _, latents = inputs
    specs = [SampleSpec(s, [z], tuple(z.shape), seed=10 + i) for i, (s, z) in enumerate(zip(states, latents))]
    ours = sample(model.predict, specs, STEPS, patch_size=2)
    for i, (s, z) in enumerate(zip(states, latents)):
        ref = reference(model, s, z, 10 + i, STEPS)
        assert (ours[i] - ref).abs().max() < 1e-4


def test_guided_batch_equals_diffusers_scheduler_with_the_same_guidance(model, inputs):
    states, negatives, latents = inputs
    specs = [SampleSpec(s, [z], tuple(z.shape), seed=3, guidance_scale=4.0, negative_states=n)
             for s, n, z in zip(states, negatives, latents)]
    ours = sample(model.predict, specs, STEPS, patch_size=2)
    for i in range(2):
        ref = reference(model, states[i], latents[i], 3, STEPS, guidance=4.0, negative=negatives[i])
        assert (ours[i] - ref).abs().max() < 1e-4


@pytest.mark.parametrize("tokens", [16, 256, 1024, 4096, 8192])
def test_sigma_schedule_equals_diffusers_set_timesteps(tokens):
    scheduler = qwen_image_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 28, 28), mu=calculate_shift(tokens, 256, 8192, 0.5, 0.9))
    assert torch.allclose(sigma_schedule(28, tokens), scheduler.sigmas, atol=1e-6)


def test_fixed_shift_without_terminal_equals_diffusers_static_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 10, 10))
    ours = sigma_schedule(10, 4096, SamplerConfig(shift="fixed", fixed_mu=float(np.log(3.0)), shift_terminal=None))
    assert torch.allclose(ours, scheduler.sigmas, atol=1e-6)


def test_norm_rescale_gives_each_token_the_conditional_norm():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(8, 4, 6, generator=g), torch.randn(8, 4, 6, generator=g)
    out = guided_velocity(cond, uncond, 5.0, patch_size=2)
    tokens = lambda x: x.reshape(8, 2, 2, 3, 2).permute(1, 3, 0, 2, 4).reshape(6, 32)  # noqa: E731
    assert torch.allclose(tokens(out).norm(dim=-1), tokens(cond).norm(dim=-1), atol=1e-5)
    plain = uncond + 5.0 * (cond - uncond)
    cosine = torch.nn.functional.cosine_similarity(tokens(out), tokens(plain), dim=-1)
    assert torch.allclose(cosine, torch.ones(6), atol=1e-5)  # same direction as plain CFG, new length


def test_a_sample_does_not_depend_on_its_batch(model, inputs):
    states, _, latents = inputs
    both = sample(model.predict, [SampleSpec(s, [z], tuple(z.shape), seed=5) for s, z in zip(states, latents)],
                  2, patch_size=2)
    alone = sample(model.predict, [SampleSpec(states[1], [latents[1]], tuple(latents[1].shape), seed=5)], 2, 2)
    assert (both[1] - alone[0]).abs().max() < 1e-5


def test_each_sample_starts_from_its_own_seed():
    assert torch.equal(initial_noise((4, 2, 2), 1), initial_noise((4, 2, 2), 1))
    assert not torch.equal(initial_noise((4, 2, 2), 1), initial_noise((4, 2, 2), 2))


def test_negative_prompt_changes_a_guided_edit(model):
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    editor = GeneratorEditor(model)
    base = dict(image=image, prompt="make the red circle blue", seed=0, num_inference_steps=2)
    a, b, c = editor.edit([EditRequest(**base, guidance_scale=4.0, negative_prompt=" "),
                           EditRequest(**base, guidance_scale=4.0, negative_prompt="remove the star"),
                           EditRequest(**base, guidance_scale=1.0, negative_prompt="remove the star")])
    assert not np.array_equal(a, b) and not np.array_equal(b, c)


def test_editor_keeps_a_size_off_the_latent_grid(model):
    image = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = GeneratorEditor(model).edit([EditRequest(image=image, prompt="remove the star", num_inference_steps=1)])
    assert out[0].shape == (50, 70, 3) and out[0].dtype == np.uint8


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="num_inference_steps"):
        sigma_schedule(0, 256)
    with pytest.raises(ValueError, match="sampler.shift"):
        sample(lambda b: [], [SampleSpec(torch.zeros(1, 4), [], (4, 2, 2))], 1, 2, SamplerConfig(shift="linear"))
