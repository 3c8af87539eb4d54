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


# -- the tiny qwen_image VAE: built from config, trained on world renders by the `vae` step ----------------
def _tiny_world():
    from reasonedit.shapes.world import ShapesWorld, WorldConfig
    return ShapesWorld(WorldConfig(image_size=32, grid=2, min_shapes=1, max_shapes=3, kinds=("circle", "square"),
                                   colors=("red", "yellow", "blue"), backgrounds=("black", "navy"),
                                   sizes=("small", "large")))


def _qwen_vae_model_config(**vae):
    from reasonedit.config.model import ModelConfig
    cfg = ModelConfig()
    cfg.vae.kind, cfg.vae.latent_channels, cfg.vae.base_dim = "qwen_image", 16, 8
    for key, value in vae.items():
        setattr(cfg.vae, key, value)
    cfg.generator.in_channels, cfg.generator.out_channels = 16 * 4, 16
    return cfg


def _vae_train_config(**kw):
    from reasonedit.config import VAETrainConfig
    base = dict(steps=60, batch=4, lr=2e-3, warmup_steps=5, seed=0, stats_scenes=64, eval_scenes=24, log_every=20)
    return VAETrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_tiny_vae():
    """A tiny qwen_image VAE built from config and trained for a few seconds on a small world."""
    from reasonedit.models.model import build_codec
    from reasonedit.training.vae import train_vae
    world = _tiny_world()
    vae, report = train_vae(world, build_codec(_qwen_vae_model_config(), seed=0), _vae_train_config())
    return world, vae, report


def test_config_builds_a_tiny_qwen_image_vae_of_the_requested_geometry():
    from reasonedit.models.model import build_codec
    cfg = _qwen_vae_model_config(base_dim=4, dim_mult=(1, 2, 2, 4), num_res_blocks=2)
    cfg.validate()
    vae = build_codec(cfg, seed=0)
    assert isinstance(vae, QwenImageVAE)
    c = vae.vae.config
    assert (c.base_dim, list(c.dim_mult), c.num_res_blocks, c.z_dim) == (4, [1, 2, 2, 4], 2, 16)
    assert list(c.temperal_downsample) == [False, True, True] and vae.downsample == 8 and vae.latent_channels == 16
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 3, 64, 48))
        assert z.shape == (2, 16, 8, 6)
        assert vae.decode(z).shape == (2, 3, 64, 48)
    same = build_codec(cfg, seed=0).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in vae.state_dict().items())  # a seed builds one VAE


def test_single_frame_convolutions_equal_the_stock_forward():
    from reasonedit.models.vae import single_frame
    vae = QwenImageVAE.random(z_dim=16, base_dim=8, seed=1).vae
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        stock = vae.decode(vae.encode(x).latent_dist.mode()).sample
        with single_frame(vae):
            fast = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert torch.allclose(fast, stock, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in vae.modules())  # the stock method is back afterwards


def test_a_vae_built_for_images_starts_as_a_2d_network_of_shortcuts_with_a_sharp_posterior():
    """init_for_images: each causal kernel sees only the current frame, with a 2-D kernel's scale (the stock
    init counts the zero-padded frames in its fan-in); residual branches start at zero; log-variance at -10."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (QwenImageCausalConv3d,
                                                                        QwenImageResidualBlock)
    vae = QwenImageVAE.random(z_dim=16, base_dim=8, seed=0).vae
    branch_outs = {id(m.conv2) for m in vae.modules() if isinstance(m, QwenImageResidualBlock)}
    kernels = [m.weight for m in vae.modules() if isinstance(m, QwenImageCausalConv3d) and m.weight.shape[2] == 3]
    assert kernels and all(not w[:, :, :2].any() for w in kernels)
    for w in [m.weight for m in vae.modules() if isinstance(m, QwenImageCausalConv3d) and m.weight.shape[2] == 3
              and id(m) not in branch_outs]:  # uniform(-b, b), b = 1 / sqrt(2-D fan-in): std b / sqrt(3)
        fan_in = w.shape[1] * w.shape[3] * w.shape[4]
        assert abs(w[:, :, 2].std().item() * (3 * fan_in) ** 0.5 - 1) < 0.25
    with torch.no_grad():
        for block in [m for m in vae.modules() if isinstance(m, QwenImageResidualBlock)][:3]:
            h = torch.randn(2, block.conv1.in_channels, 1, 4, 4)
            assert torch.equal(block(h), block.conv_shortcut(h))
        logvar = vae.encode(torch.rand(2, 3, 1, 32, 32)).latent_dist.logvar
    assert torch.allclose(logvar, torch.full_like(logvar, -10.0))


def test_short_training_lowers_held_out_reconstruction_error(trained_tiny_vae):
    world, vae, report = trained_tiny_vae
    assert report.steps == 60 and report.parameters == sum(p.numel() for p in vae.parameters())
    rb = report.read_back
    assert rb.scenes == 24 and rb.split == "val" and 0 <= rb.exact <= 24
    # a few seconds of training must take a clear part of the untrained VAE's error away
    assert rb.mean_abs_error < 0.5 * report.untrained_mean_abs_error
    assert 0 < report.loss_last < report.loss_first  # the logged training loss falls too


def test_one_cell_changed_redraws_exactly_one_cell():
    from reasonedit.training.vae import one_cell_changed
    world, rng = _tiny_world(), random.Random(0)
    for _ in range(200):
        scene = world.random_scene(rng)
        twin, cell = one_cell_changed(world, scene, rng)
        assert twin.background == scene.background and twin.shape_at(cell) != scene.shape_at(cell)
        assert [s for s in twin.shapes if s.cell != cell] == [s for s in scene.shapes if s.cell != cell]
        assert world.config.min_shapes <= len(twin.shapes) <= world.config.grid ** 2


def test_latent_locality_is_one_for_a_patch_codec_whose_patches_tile_the_cells():
    """Cells of 16 px are 2x2 latent positions of an 8-px patch codec: nothing outside a redrawn cell moves."""
    from reasonedit.training.vae import cell_masks, heldout_scenes, latent_locality
    world = _tiny_world()
    scenes = heldout_scenes(world, "val", 16, seed=0)
    assert latent_locality(world, PatchCodec(8), scenes, seed=0) == 1.0
    masks = cell_masks(world, [(0, 1)], (4, 4))
    assert masks.sum() == 12 and not masks[0, :2, 2:].any()
    with pytest.raises(ValueError, match="locality_weight"):
        cell_masks(world, [(0, 0)], (5, 4))


def test_the_locality_term_makes_a_one_cell_edit_move_fewer_latents():
    """The same short training with and without vae_train.locality_weight: with it, redrawing one cell of a
    held-out scene leaves more of the other cells' latents where they were."""
    from reasonedit.models.model import build_codec
    from reasonedit.training.vae import train_vae
    world, reports = _tiny_world(), []
    for weight in (0.0, 5.0):
        _, report = train_vae(world, build_codec(_qwen_vae_model_config(), seed=0),
                              _vae_train_config(locality_weight=weight, eval_scenes=48))
        reports.append(report)
    assert 0.0 <= reports[0].locality < reports[1].locality <= 1.0
    assert reports[1].to_dict()["locality"] == reports[1].locality


def test_read_back_is_measured_on_held_out_scenes(trained_tiny_vae):
    from reasonedit.shapes.synth import split_of
    from reasonedit.training.vae import heldout_scenes, read_back
    world, vae, report = trained_tiny_vae
    scenes = heldout_scenes(world, "val", 24, seed=0)
    assert all(split_of(s) == "val" for s in scenes)
    again = read_back(world, vae, scenes, "val")
    assert (again.exact, again.mean_abs_error) == (report.read_back.exact, report.read_back.mean_abs_error)


def test_latent_normalisation_is_set_from_the_trained_vaes_latents(trained_tiny_vae):
    import random as random_module

    from reasonedit.training.vae import render, training_scene
    world, vae, report = trained_tiny_vae
    assert vae.vae.config.latents_mean == report.latents_mean and vae.vae.config.latents_std == report.latents_std
    assert report.latents_std != [1.0] * 16  # measured, not the identity it was built with
    rng = random_module.Random("fresh renders")  # other scenes than the ones the stats were measured on
    scenes = [training_scene(world, rng, world.config.max_shapes) for _ in range(96)]
    with torch.no_grad():
        z = vae.encode(to_pixels(render(world, scenes)))  # (N, 16, 4, 4), normalised
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.25
    assert ((per_channel.std(1) > 0.75) & (per_channel.std(1) < 1.33)).all()


def test_a_model_with_the_trained_vae_saves_and_loads_bitwise(trained_tiny_vae, tmp_path):
    from reasonedit.models.model import ReasonEditModel
    world, vae, _ = trained_tiny_vae
    cfg = _qwen_vae_model_config()
    model = ReasonEditModel.tiny(cfg, ["a red circle", "a blue square on black"], seed=0, components=("reasoner",))
    model.vae = vae
    model.save_pretrained(tmp_path / "model")
    again = ReasonEditModel.from_pretrained(tmp_path / "model", components=("vae",))
    assert isinstance(again.vae, QwenImageVAE)
    want, got = vae.state_dict(), again.vae.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert again.vae.vae.config.latents_mean == vae.vae.config.latents_mean
    assert again.vae.vae.config.latents_std == vae.vae.config.latents_std
    images = torch.from_numpy(world.render(world.random_scene(random.Random(3))))[None]
    with torch.no_grad():
        assert torch.equal(again.vae.encode(to_pixels(images)), vae.encode(to_pixels(images)))


def _run_overrides(tmp_path, *extra):
    return [f"output_dir={tmp_path / 'run'}", "steps=[data,models,vae]", "data.n=3", "data.shard_size=10",
            "world.image_size=32", "world.grid=2", "world.max_shapes=3", "world.kinds=[circle,square]",
            "world.colors=[red,yellow,blue]", "world.backgrounds=[black,navy]", "world.sizes=[small,large]",
            "model.vae.kind=qwen_image", "model.vae.latent_channels=16", "model.vae.base_dim=8",
            "model.generator.in_channels=64", "model.generator.out_channels=16", "vae_train.steps=3",
            "vae_train.batch=2", "vae_train.warmup_steps=1", "vae_train.stats_scenes=8", "vae_train.eval_scenes=6",
            *extra]


def test_the_vae_step_writes_the_model_with_the_trained_vae_and_its_report(tmp_path):
    import json

    from reasonedit.config import load_config
    from reasonedit.experiment import run_experiment
    from reasonedit.models.model import ReasonEditModel
    tree, cfg = load_config(None, _run_overrides(tmp_path))
    result = run_experiment(tree, cfg)
    out = tmp_path / "run"
    report = json.loads((out / "vae" / "report.json").read_text())
    assert result.vae == report and result.artifacts["vae"] == str(out / "vae" / "model")
    assert report["steps"] == 3 and report["read_back"]["scenes"] == 6 and 0 <= report["read_back"]["rate"] <= 1
    assert not [p.name for p in (out / "vae").iterdir() if p.name.startswith(".")]  # nothing half-written left
    trained = ReasonEditModel.from_pretrained(out / "vae" / "model", components=("generator", "vae"))
    start = ReasonEditModel.from_pretrained(out / "model", components=("vae",))
    assert trained.vae.vae.config.latents_std == report["latents_std"]
    assert not torch.equal(trained.vae.vae.decoder.conv_out.weight, start.vae.vae.decoder.conv_out.weight)


def test_the_vae_step_skips_a_patch_codec(tmp_path, caplog):
    import logging

    from reasonedit.config import load_config
    from reasonedit.experiment import step_vae
    _, cfg = load_config(None, [f"output_dir={tmp_path}"])  # the default model: the patch codec
    with caplog.at_level(logging.INFO, logger="reasonedit.experiment"):
        step_vae(cfg, tmp_path, None, None)
    assert "vae: nothing to train (model.vae.kind=patch" in caplog.text and not (tmp_path / "vae").exists()


@pytest.mark.parametrize("override,message", [
    ("model.vae.dim_mult=[]", r"model.vae.dim_mult: must be positive multipliers"),
    ("model.vae.temperal_downsample=[false,true]", r"model.vae.temperal_downsample: needs one entry per"),
    ("model.vae.base_dim=0", r"model.vae.base_dim: must be at least 1"),
    ("model.vae.num_res_blocks=0", r"model.vae.num_res_blocks: must be at least 1"),
    ("model.vae.latent_channels=8", r"model.generator.out_channels: 16 must equal vae.latent_channels=8"),
    ("vae_train.steps=0", r"vae_train.steps: must be at least 1"),
    ("vae_train.lr=0", r"vae_train.lr: must be positive"),
    ("vae_train.warmup_steps=400", r"vae_train.warmup_steps: must lie in \[0, steps=3\]"),
    ("vae_train.kl_weight=-1", r"vae_train.kl_weight: must be non-negative"),
    ("vae_train.locality_weight=-1", r"vae_train.locality_weight: must be non-negative"),
    ("vae_train.eval_split=train", r"vae_train.eval_split: 'train'"),
])
def test_bad_vae_settings_name_the_key(tmp_path, override, message):
    from reasonedit.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config(None, _run_overrides(tmp_path, override))


def test_the_loss_weighs_ink_over_background_and_palette_mistakes_over_equal_errors():
    from reasonedit.shapes.world import PALETTE
    from reasonedit.training.vae import ink_mask, palette_pixels, reconstruction_loss
    cfg = _vae_train_config(ink_weight=5.0, palette_weight=1.0)
    image = torch.tensor(PALETTE["black"], dtype=torch.uint8).expand(1, 4, 4, 3).clone()
    image[0, 1, 1] = torch.tensor(PALETTE["red"], dtype=torch.uint8)  # one ink pixel
    ink = ink_mask(image)
    assert ink.sum() == 1 and ink[0, 1, 1]
    outlined = ink_mask(image, outline=1)  # both sides of the shape's edge: the pixel and its 8 neighbours
    assert outlined.sum() == 9 and outlined[0, :3, :3].all()
    target, stats = to_pixels(image), (torch.zeros(1, 16, 1, 1), torch.zeros(1, 16, 1, 1))

    def loss(pixel, delta, palette=None):
        decoded = target.clone()
        decoded[0, :, pixel[0], pixel[1]] += torch.tensor(delta)
        return reconstruction_loss(decoded, target, ink, *stats, cfg, palette)
    assert loss((1, 1), [-0.3, 0.0, 0.0])["mse"] > 3 * loss((0, 0), [0.3, 0.0, 0.0])["mse"]
    # red (0.73, -0.69, -0.69) moved by 0.5: up in green it is nearest orange, up in red still nearest red
    palette = palette_pixels(list(PALETTE))
    wrong, right = loss((1, 1), [0.0, 0.5, 0.0], palette), loss((1, 1), [0.5, 0.0, 0.0], palette)
    assert torch.isclose(wrong["mse"], right["mse"]) and wrong["palette"] > right["palette"]


def test_training_scenes_must_fit_the_grid():
    from reasonedit.models.model import build_codec
    from reasonedit.training.vae import train_vae
    with pytest.raises(ValueError, match=r"vae_train.max_shapes: 5 must lie in \[world.min_shapes=1, world.grid\*\*2=4\]"):
        train_vae(_tiny_world(), build_codec(_qwen_vae_model_config()), _vae_train_config(max_shapes=5))
