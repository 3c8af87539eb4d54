"""The latent cache: exact latents read back, a changed VAE or image never served a stale entry, and a
stage-2 run with the cache equal to one without it."""

import random

import numpy as np
import pytest
import torch

from reasonedit.models.latent_cache import LatentCache, codec_fingerprint
from reasonedit.models.vae import QwenImageVAE, to_pixels
from tests.test_stages import stage_cfg, start_model  # noqa: F401  (the module-scoped fixture)


@pytest.fixture(scope="module")
def vae():
    return QwenImageVAE.random(z_dim=16, base_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                               temperal_downsample=(False, True, True), seed=0).eval()


@pytest.fixture(scope="module")
def images(world):
    rng = random.Random(3)
    return [world.render(world.random_scene(rng, n))[:64, :64] for n in (1, 3, 5)]


def direct(vae, image):
    with torch.no_grad():
        return vae.encode(to_pixels(torch.from_numpy(np.ascontiguousarray(image))[None]))[0].float()


def test_latents_equal_a_direct_encode_bitwise_and_the_second_read_is_a_hit(vae, images, tmp_path, monkeypatch):
    cache = LatentCache(tmp_path, vae)
    first = cache.latents(images)
    assert (cache.stats.hits, cache.stats.misses) == (0, 3)
    assert all(torch.equal(z, direct(vae, im)) for z, im in zip(first, images))
    monkeypatch.setattr(vae, "encode", lambda *a, **k: pytest.fail("a cached image was encoded again"))
    again = LatentCache(tmp_path, vae)  # a new process reads the same folder
    second = again.latents(images[::-1])
    assert (again.stats.hits, again.stats.misses) == (3, 0)
    assert all(torch.equal(a, b) for a, b in zip(second, first[::-1]))


def test_a_changed_vae_or_image_is_a_different_entry(vae, images, tmp_path):
    cache = LatentCache(tmp_path, vae)
    cache.latents(images[:1])
    changed = images[0].copy()
    changed[0, 0] ^= 1  # one pixel of one channel
    cache.latents([changed])
    assert cache.stats.misses == 2
    other = QwenImageVAE.random(z_dim=16, base_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                                temperal_downsample=(False, True, True), seed=0).eval()
    assert codec_fingerprint(other) == codec_fingerprint(vae)
    other.set_latent_stats([0.5] * 16, [2.0] * 16)  # the normalisation alone changes every latent
    assert codec_fingerprint(other) != codec_fingerprint(vae)
    fresh = LatentCache(tmp_path, other)
    (z,) = fresh.latents(images[:1])
    assert fresh.stats.misses == 1 and torch.equal(z, direct(other, images[0]))


def test_a_torn_entry_is_recomputed_not_trusted(vae, images, tmp_path):
    cache = LatentCache(tmp_path, vae)
    (first,) = cache.latents(images[:1])
    (entry,) = list(cache.files.dir.rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:20])
    again = LatentCache(tmp_path, vae)
    (got,) = again.latents(images[:1])
    assert again.stats.unreadable == 1 and torch.equal(got, first)
    assert not list(cache.files.dir.rglob(".*"))  # no temporary files left behind


def test_stage2_with_the_latent_cache_trains_exactly_as_without(start_model, small_dataset, tmp_path):
    from reasonedit.training import train_stage

    runs = {}
    for name, extra in (("plain", []), ("cached", ["stage2.latent_cache=true"])):
        out = tmp_path / name / "stage2"
        runs[name] = train_stage(stage_cfg(tmp_path / name, 2, steps=3, extra=extra), 2, start_model, small_dataset,
                                 out)
    assert [h["loss"] for h in runs["cached"].history] == [h["loss"] for h in runs["plain"].history]
    assert list((tmp_path / "cached" / "latent_cache").rglob("*.safetensors"))  # the experiment's, for 2 and 3
    assert not (tmp_path / "plain" / "latent_cache").exists()


def test_latent_cache_outside_the_generator_stages_names_the_key():
    from reasonedit.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"stage1\.latent_cache"):
        load_config(None, ["stage1.latent_cache=true"])
