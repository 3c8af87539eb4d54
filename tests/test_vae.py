import random

import pytest
import torch

from reasonedit.models.vae import PatchCodec, QwenImageVAE, load_codec, to_pixels, to_uint8


def test_patch_codec_round_trips_renders_exactly(world):
    scene = world.random_scene(random.Random(0), 5)
    images = torch.from_numpy(world.render(scene))[None]
    codec = PatchCodec(8)
    latents = codec.encode(to_pixels(images))
    assert latents.shape == (1, 192, 28, 28) and codec.latent_channels == 192
    assert torch.equal(to_uint8(codec.decode(latents)), images)


def test_patch_codec_refuses_sizes_that_do_not_split():
    with pytest.raises(ValueError, match="8x8 patches"):
        PatchCodec(8).encode(torch.zeros(1, 3, 20, 16))


def test_patch_codec_save_and_load(tmp_path):
    PatchCodec(4).save_pretrained(tmp_path)
    codec = load_codec(tmp_path)
    assert isinstance(codec, PatchCodec) and codec.patch_size == 4


def test_qwen_image_vae_normalises_with_its_config_and_round_trips(tmp_path):
    vae = QwenImageVAE.tiny(z_dim=4)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(pixels)
        raw = vae.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
    assert z.shape == (2, 4, 4, 4) and vae.downsample == 8
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, -1, 1, 1)
    assert torch.allclose(z, (raw - mean) / std, atol=1e-6)
    vae.save_pretrained(tmp_path / "vae")
    again = load_codec(tmp_path / "vae")
    with torch.no_grad():
        assert torch.equal(again.encode(pixels), z)
        assert torch.equal(again.decode(z), vae.decode(z))


def test_load_codec_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_codec(tmp_path)
