import json
import random

import pytest
import torch

from reasonedit.config.model import ModelConfig
from reasonedit.models.generator import GeneratorSample
from reasonedit.models.model import ReasonEditModel

TEXTS = ["make the red circle blue", "move the star to the top-left corner", "remove the small square",
         "<#Think> the square is too small <#Reflection> make the square large"]


@pytest.fixture(scope="module")
def scenes(world):
    rng = random.Random(0)
    return [world.render(world.random_scene(rng, n)) for n in (2, 4, 6)]


@pytest.fixture(scope="module")
def model():
    m = ReasonEditModel.tiny(ModelConfig(), TEXTS, seed=0)
    return m.eval()


def outputs(m, scenes):
    """Condition states and generator predictions on fixed inputs: what a round trip must keep."""
    torch.manual_seed(0)
    with torch.no_grad():
        states = m.encode_condition(scenes, ["make the red circle blue", "remove the star", "swap them"])
        latents = m.encode_images(scenes)
        samples = [GeneratorSample(text_states=s, target=torch.randn_like(z), sources=[z], timestep=0.3 + 0.2 * i)
                   for i, (s, z) in enumerate(zip(states, latents))]
        return states, m.predict(samples)


def test_condition_states_feed_the_generator(model, scenes):
    states, preds = outputs(model, scenes)
    assert [s.shape[1] for s in states] == [64] * 3
    assert all(p.shape == (192, 28, 28) for p in preds)
    unpacked = model.encode_condition(scenes, ["make the red circle blue", "remove the star", "swap them"], packed=False)
    for a, b in zip(states, unpacked):
        assert (a - b).abs().max() < 1e-5


def test_patch_codec_latents_round_trip_the_images(model, scenes):
    latents = model.encode_images(scenes)
    assert all((a == b).all() for a, b in zip(model.decode_latents(latents), scenes))


@pytest.mark.parametrize("lora", [False, True])
def test_save_and_load_give_bitwise_equal_outputs(model, scenes, tmp_path, lora):
    m = model
    if lora:
        m = ReasonEditModel.tiny(ModelConfig(), TEXTS, seed=0).eval()
        m.reasoner.add_lora(m.config.reasoner.lora)
        with torch.no_grad():  # make the adapter do something
            for name, p in m.reasoner.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    m.save_pretrained(tmp_path / "model")
    again = ReasonEditModel.from_pretrained(tmp_path / "model").eval()
    assert (tmp_path / "model" / "reasoner" / "lora").is_dir() == lora
    (s1, p1), (s2, p2) = outputs(m, scenes), outputs(again, scenes)
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    meta = json.loads((tmp_path / "model" / "reasonedit.json").read_text())
    assert meta["components"] == ["reasoner", "generator", "vae"] and meta["model"]["generator"]["num_layers"] == 2


def test_stage_one_loads_the_reasoner_alone(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    only = ReasonEditModel.from_pretrained(tmp_path / "m", components=("reasoner",))
    assert only.generator is None and only.vae is None
    with pytest.raises(ValueError, match="without its generator"):
        only.predict([])


def test_a_failed_save_leaves_nothing_behind(model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(model.generator, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_foreign_folders_are_named(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="reasonedit.json"):
        ReasonEditModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path / "m")
    import shutil
    shutil.rmtree(tmp_path / "m" / "generator")
    with pytest.raises(FileNotFoundError, match="generator is missing"):
        ReasonEditModel.from_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "reasonedit.json").read_text())
    meta["model"]["generator"]["num_layrs"] = 3
    (tmp_path / "m" / "reasonedit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_layrs"):
        ReasonEditModel.from_pretrained(tmp_path / "m", components=("reasoner",))


def test_generator_width_must_match_the_reasoner(model):
    from reasonedit.models.model import build_generator
    cfg = ModelConfig()
    cfg.generator.joint_attention_dim = 32
    with pytest.raises(ValueError, match="joint_attention_dim=32"):
        ReasonEditModel(model.reasoner, build_generator(cfg), None, cfg)


def test_attention_backend_names_agree():
    from reasonedit.models.attention import BACKENDS
    from reasonedit.config.model import ATTENTION_BACKENDS
    assert BACKENDS == ATTENTION_BACKENDS
    cfg = ModelConfig(attention_backend="fast")
    with pytest.raises(ValueError, match="model.attention_backend"):
        cfg.validate()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny Qwen-Image-Edit folder written by diffusers' own pipeline save_pretrained."""
    from conftest import make_diffusers_folder
    return make_diffusers_folder(tmp_path_factory.mktemp("diffusers") / "qwen-image-edit-tiny", TEXTS)


def test_from_diffusers_loads_strictly_and_matches_the_diffusers_module(diffusers_folder):
    path, transformer, text_encoder = diffusers_folder
    m = ReasonEditModel.from_diffusers(path).eval()
    assert m.config.source == "diffusers" and m.config.generator.num_layers == 2
    ours = m.generator.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in transformer.state_dict().items())
    g = torch.Generator().manual_seed(0)
    text, target, source = torch.randn(7, 64, generator=g), torch.randn(4, 6, 8, generator=g), torch.randn(4, 4, 4, generator=g)
    with torch.no_grad():
        pred = m.predict([GeneratorSample(text_states=text, target=target, sources=[source], timestep=0.6)])[0]
        from reasonedit.models.generator import patchify, unpatchify
        tokens = torch.cat([patchify(target), patchify(source)])[None]
        ref = transformer(hidden_states=tokens, encoder_hidden_states=text[None],
                          encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long), timestep=torch.tensor([0.6]),
                          img_shapes=[[(1, 3, 4), (1, 2, 2)]], return_dict=False)[0]
    assert (pred - unpatchify(ref[0, :12], target.shape)).abs().max() <= 1e-5
    # the reasoner got the decision tokens; its original weights are untouched
    assert all(len(m.reasoner.tokenizer.encode(t, add_special_tokens=False)) == 1
               for t in ("<#Think>", "<#Success>", "<#Reflection>", "<#Failed>"))
    ref_sd = text_encoder.state_dict()
    for k, v in m.reasoner.model.state_dict().items():
        if k in ref_sd and v.shape == ref_sd[k].shape:
            assert torch.equal(v, ref_sd[k]), k


def test_from_diffusers_names_a_missing_part(diffusers_folder, tmp_path):
    import shutil
    path, _, _ = diffusers_folder
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(FileNotFoundError, match="transformer is missing"):
        ReasonEditModel.from_diffusers(broken)
