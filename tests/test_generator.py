"""The packed generator against diffusers' QwenImageTransformer2DModel: outputs, gradients, loading, errors."""

import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline

from reasonedit.models.generator import (
    GeneratorSample,
    PackedQwenImageTransformer,
    pack_generator_samples,
    patchify,
    target_predictions,
    unpatchify,
)
from reasonedit.models.generator_weights import ConfigMismatchError, StateDictMismatchError, load_diffusers_transformer

LATENT_CHANNELS = 4
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def reference(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    """A tiny diffusers module with every weight drawn at a scale that makes each one matter."""
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def ours_from(ref: QwenImageTransformer2DModel) -> PackedQwenImageTransformer:
    model = PackedQwenImageTransformer(**{k: v for k, v in ref.config.items() if not k.startswith("_")})
    model.load_state_dict(ref.state_dict(), strict=True)
    model.attention_backend = "sdpa"
    return model.eval()


def random_samples(seed: int, sources: list[int], frames: int | None = None, extra: int | None = None):
    """Samples with different image sizes and text lengths; text padded right, or left for the second."""
    g = torch.Generator().manual_seed(seed)

    def size() -> int:
        return 2 * int(torch.randint(1, 6, (1,), generator=g))

    samples = []
    for i, n_sources in enumerate(sources):
        length, pad = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g))
        mask = torch.cat([torch.ones(length), torch.zeros(pad)]).bool()
        if i == 1:
            mask = mask.flip(0)
        h, w = size(), size()
        target = torch.randn(*((frames,) if frames else ()), LATENT_CHANNELS, h, w, generator=g)
        samples.append(GeneratorSample(
            text_states=torch.randn(length + pad, TINY["joint_attention_dim"], generator=g),
            target=target,
            sources=[torch.randn(LATENT_CHANNELS, size(), size(), generator=g) for _ in range(n_sources)],
            timestep=float(torch.rand((), generator=g)),
            text_mask=mask,
            additional_t_cond=extra,
        ))
    return samples


def diffusers_output(ref: QwenImageTransformer2DModel, s: GeneratorSample) -> torch.Tensor:
    """The diffusers module on one sample alone (batch 1, padded text masked), as its pipelines call it."""
    frames = list(s.target) if s.target.dim() == 4 else [s.target]
    pictures = frames + list(s.sources)
    tokens = torch.cat([QwenImageEditPlusPipeline._pack_latents(x[None], 1, x.shape[0], *x.shape[-2:])
                        for x in pictures], dim=1)
    img_shapes = [[(1, x.shape[-2] // 2, x.shape[-1] // 2) for x in pictures]]
    extra = None if s.additional_t_cond is None else torch.tensor([s.additional_t_cond])
    return ref(hidden_states=tokens, encoder_hidden_states=s.text_states[None],
               encoder_hidden_states_mask=s.text_mask[None].long(), timestep=torch.tensor([s.timestep]),
               img_shapes=img_shapes, additional_t_cond=extra).sample[0]


def per_sample(batch, output: torch.Tensor) -> list[torch.Tensor]:
    return [output[batch.image_sample == i] for i in range(batch.num_samples)]


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_output_matches_diffusers_per_sample(seed, zero_cond_t):
    ref = reference(seed, zero_cond_t=zero_cond_t)
    ours = ours_from(ref)
    samples = random_samples(seed, sources=[1, 2, 0] if seed % 2 else [2, 1, 1])
    batch = ours.pack(samples)
    with torch.no_grad():
        out = ours(batch)
        for s, got in zip(samples, per_sample(batch, out)):
            assert (got - diffusers_output(ref, s)).abs().max() <= 1e-5


def test_layered_rope_and_additional_t_cond_match_diffusers():
    ref = reference(3, use_layer3d_rope=True, use_additional_t_cond=True)
    ours = ours_from(ref)
    samples = random_samples(3, sources=[1, 1, 2], frames=2, extra=1) + random_samples(4, [1], frames=3, extra=0)
    batch = ours.pack(samples)
    with torch.no_grad():
        for s, got in zip(samples, per_sample(batch, ours(batch))):
            assert (got - diffusers_output(ref, s)).abs().max() <= 1e-5


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_diffusers(seed, zero_cond_t):
    ref = reference(seed, zero_cond_t=zero_cond_t)
    ours = ours_from(ref)
    samples = random_samples(seed + 10, sources=[1, 2, 0])
    batch = ours.pack(samples)
    weights = [torch.randn(n, 16, generator=torch.Generator().manual_seed(i))
               for i, n in enumerate(torch.bincount(batch.image_sample).tolist())]

    sum(((o * w).sum() for o, w in zip(per_sample(batch, ours(batch)), weights))).backward()
    sum(((diffusers_output(ref, s) * w).sum() for s, w in zip(samples, weights))).backward()

    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        expected = ref_params[name].grad
        got = p.grad
        expected = torch.zeros_like(p) if expected is None else expected
        got = torch.zeros_like(p) if got is None else got
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_sources_at_t0_on_a_plain_model_equals_zero_cond_t():
    ref = reference(5, zero_cond_t=True)
    plain = PackedQwenImageTransformer(**{**TINY, "zero_cond_t": False})
    plain.load_state_dict(ref.state_dict())
    zero = ours_from(ref)
    samples = random_samples(5, sources=[1, 2])
    with torch.no_grad():
        clean = plain(plain.pack(samples, sources_at_t0=True))
        noisy = plain(plain.pack(samples))
        torch.testing.assert_close(clean, zero(zero.pack(samples)), rtol=0, atol=1e-6)
    assert (clean - noisy).abs().max() > 1e-3  # the option does change the sources' modulation


def test_sample_output_does_not_depend_on_row_mates():
    ours = ours_from(reference(6))
    a, b, c = random_samples(6, sources=[1, 2, 0])
    with torch.no_grad():
        alone = ours(ours.pack([a]))
        for row in ([a, b, c], [c, b, a], [b, a]):
            batch = ours.pack(row)
            got = per_sample(batch, ours(batch))[row.index(a)]
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-6)


def test_target_predictions_unpack_each_targets_tokens():
    samples = random_samples(7, sources=[1, 0, 2])
    batch = pack_generator_samples(samples)
    predictions = target_predictions(batch, batch.image_tokens)  # identity "model": tokens in, tokens out
    for s, pred in zip(samples, predictions):
        assert torch.equal(pred, s.target)
    assert batch.target_index.numel() == sum(s.target.numel() // TINY["in_channels"] for s in samples)
    assert not batch.image_is_source[batch.target_index].any()  # targets take their sample's noisy timestep


def test_patchify_matches_the_pipelines_packing():
    latents = torch.randn(1, 4, 6, 8)
    packed = QwenImageEditPlusPipeline._pack_latents(latents, 1, 4, 6, 8)[0]
    assert torch.equal(patchify(latents[0]), packed)
    unpacked = QwenImageEditPlusPipeline._unpack_latents(packed[None], 6 * 8, 8 * 8, 8)[0, :, 0]
    assert torch.equal(unpatchify(packed, (4, 6, 8)), unpacked)


def test_gradient_checkpointing_gives_the_same_gradients():
    ours = ours_from(reference(8))
    batch = ours.pack(random_samples(8, sources=[1, 2]))
    ours(batch).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad(set_to_none=True)
    ours.enable_gradient_checkpointing()
    ours(batch).square().sum().backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)


def test_save_then_from_pretrained_gives_bitwise_equal_outputs_and_a_diffusers_folder(tmp_path):
    ours = ours_from(reference(9, zero_cond_t=True))
    ours.save_pretrained(tmp_path)
    again = PackedQwenImageTransformer.from_pretrained(tmp_path, local_files_only=True)
    again.attention_backend = "sdpa"
    assert again.config.zero_cond_t
    samples = random_samples(9, sources=[1, 2, 0])
    batch = ours.pack(samples)
    with torch.no_grad():
        assert torch.equal(ours(batch), again(batch))
        # and the folder is a diffusers one: diffusers' own class reads it and agrees
        theirs = QwenImageTransformer2DModel.from_pretrained(tmp_path, local_files_only=True).eval()
        for s, got in zip(samples, per_sample(batch, ours(batch))):
            assert (got - diffusers_output(theirs, s)).abs().max() <= 1e-5


@pytest.mark.parametrize("shard", [False, True])
def test_load_diffusers_transformer_reads_a_diffusers_folder(tmp_path, shard):
    ref = reference(10, zero_cond_t=True)
    ref.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if shard else {}))
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists() == shard
    ours = load_diffusers_transformer(tmp_path)
    ours.attention_backend = "sdpa"
    assert isinstance(ours, PackedQwenImageTransformer) and ours.config.zero_cond_t
    samples = random_samples(10, sources=[2, 1])
    batch = ours.pack(samples)
    with torch.no_grad():
        for s, got in zip(samples, per_sample(batch, ours(batch))):
            assert (got - diffusers_output(ref, s)).abs().max() <= 1e-5
    # and into an existing model, which it fills in place
    into = PackedQwenImageTransformer(**{**TINY, "zero_cond_t": True})
    assert load_diffusers_transformer(tmp_path, model=into) is into
    assert torch.equal(into.proj_out.weight, ref.proj_out.weight)


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path):
    reference(11).save_pretrained(tmp_path)

    def edit(state):
        del state["transformer_blocks.1.attn.to_k.bias"]
        state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2)
        state["proj_out.weight"] = torch.zeros(8, 32)
    _edit_weights(tmp_path, edit)
    with pytest.raises(StateDictMismatchError) as err:
        load_diffusers_transformer(tmp_path)
    message = str(err.value)
    assert "missing keys (1)" in message and "transformer_blocks.1.attn.to_k.bias" in message
    assert "unexpected keys (1)" in message and "transformer_blocks.0.attn.extra.weight" in message
    assert "proj_out.weight: [8, 32] vs [16, 32]" in message


def test_non_strict_load_still_refuses_shape_mismatches(tmp_path):
    reference(12).save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda s: s.update({"img_in.weight": torch.zeros(32, 8)}))
    with pytest.raises(StateDictMismatchError, match=r"img_in.weight: \[32, 8\] vs \[32, 16\]"):
        load_diffusers_transformer(tmp_path, model=PackedQwenImageTransformer(**TINY), strict=False)


@pytest.mark.parametrize("field,value", [("axes_dims_rope", (2, 6, 8)), ("zero_cond_t", True)])
def test_config_mismatch_names_the_field(tmp_path, field, value):
    reference(13).save_pretrained(tmp_path)
    with pytest.raises(ConfigMismatchError, match=field) as err:
        load_diffusers_transformer(tmp_path, model=PackedQwenImageTransformer(**{**TINY, field: value}))
    assert err.value.field == field


def test_unknown_config_fields_are_ignored_like_diffusers_and_named(tmp_path, caplog):
    ref = reference(14)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # the released Qwen-Image config carries pooled_projection_dim, which the diffusers module ignores
    config.update(pooled_projection_dim=768, use_new_thing=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="reasonedit.models.generator"):
        ours = load_diffusers_transformer(tmp_path)
    assert "use_new_thing" in caplog.text and "pooled_projection_dim" not in caplog.text
    assert torch.equal(ours.img_in.weight, ref.img_in.weight)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_eager_flex_forward_equals_sdpa_on_cpu():
    ours = ours_from(reference(15, zero_cond_t=True))
    ours.compile_flex = False  # eager flex runs on CPU, forward only
    batch = ours.pack(random_samples(15, sources=[1, 2, 0]))
    with torch.no_grad():
        torch.testing.assert_close(ours(batch, attention_backend="flex"), ours(batch, attention_backend="sdpa"),
                                   rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex attention needs CUDA")
def test_compiled_flex_matches_sdpa_forward_and_backward_on_gpu():
    ours = ours_from(reference(16, zero_cond_t=True)).cuda()
    batch = ours.pack(random_samples(16, sources=[1, 2, 0])).to("cuda")
    results = {}
    for backend in ("sdpa", "flex"):
        ours.zero_grad(set_to_none=True)
        out = ours(batch, attention_backend=backend)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex"][1][name], grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_rope_scale_multiplies_positions_and_theta_sets_the_base():
    from reasonedit.models.generator import RotaryPositions
    pos = torch.tensor([[0, -2, 1], [1, 0, -1], [0, 1, 1]])
    scaled = RotaryPositions((4, 6, 6), theta=100.0, scale=2.0)(pos)
    doubled = RotaryPositions((4, 6, 6), theta=100.0)(pos * 2)
    assert all(torch.allclose(a, b) for a, b in zip(scaled, doubled))
    assert not torch.allclose(RotaryPositions((4, 6, 6), theta=100.0)(pos)[0], RotaryPositions((4, 6, 6))(pos)[0])


def test_from_scratch_fields_are_saved_and_their_defaults_keep_diffusers_behaviour(tmp_path):
    ref = reference(3)
    plain = ours_from(ref)  # defaults: rope_theta 10000, rope_scale 1, qk_norm_init 1 (== diffusers, as above)
    assert plain.config.rope_theta == 10000 and plain.config.rope_scale == 1.0 and plain.config.qk_norm_init == 1.0
    model = PackedQwenImageTransformer(**TINY, rope_theta=50.0, rope_scale=2.0, qk_norm_init=2.0)
    assert all(torch.all(b.attn.norm_k.weight == 2.0) for b in model.transformer_blocks)
    model.save_pretrained(tmp_path / "g")
    back = PackedQwenImageTransformer.from_pretrained(tmp_path / "g")
    assert (back.config.rope_theta, back.config.rope_scale, back.pos_embed.scale) == (50.0, 2.0, 2.0)
    s = random_samples(5, [1])
    assert torch.equal(model.eval()(model.pack(s)), back.eval()(back.pack(s)))


def test_qk_position_init_makes_tokens_attend_to_their_own_place_and_is_saved(tmp_path):
    plain = PackedQwenImageTransformer(**TINY, rope_theta=100.0, rope_scale=2.0, qk_norm_init=2.0)
    torch.manual_seed(0)
    prior = PackedQwenImageTransformer(**TINY, rope_theta=100.0, rope_scale=2.0, qk_norm_init=2.0,
                                       qk_position_init=1.5)
    # 2 of the 32 image tokens share a target token's (h, w): 1/16 of the mass when attention ignores position
    from reasonedit.models.generator import own_place_attention
    assert own_place_attention(plain, text_tokens=5) < 0.15 < 0.5 < own_place_attention(prior, text_tokens=5)
    frame = TINY["axes_dims_rope"][0]
    bias = prior.transformer_blocks[0].attn.to_q.bias.view(2, 16)
    assert torch.all(bias[:, :frame] == 0) and torch.all(bias[:, frame:].abs() == 1.5)  # height and width dims only
    assert torch.equal(prior.transformer_blocks[1].attn.to_k.bias, prior.transformer_blocks[1].attn.to_q.bias)
    prior.save_pretrained(tmp_path / "g")
    back = PackedQwenImageTransformer.from_pretrained(tmp_path / "g")
    assert back.config.qk_position_init == 1.5
    assert all(torch.equal(a, b) for a, b in zip(prior.state_dict().values(), back.state_dict().values()))
    from reasonedit.models.generator_weights import diffusers_config
    # an init only: with diffusers' RoPE the module is diffusers' and takes the same weights
    same_rope = PackedQwenImageTransformer(**TINY, qk_position_init=1.0)
    config = diffusers_config(dict(same_rope.config))
    assert "qk_position_init" not in config
    QwenImageTransformer2DModel(**config).load_state_dict(same_rope.state_dict(), strict=True)


def test_model_config_builds_the_generator_with_zero_cond_t_and_the_rope_fields():
    from reasonedit.config.model import ModelConfig
    from reasonedit.models.model import build_generator
    cfg = ModelConfig()
    cfg.generator.zero_cond_t, cfg.generator.rope_theta, cfg.generator.qk_norm_init = True, 100.0, 1.5
    g = build_generator(cfg)
    assert g.config.zero_cond_t and g.config.rope_theta == 100.0 and g.config.qk_norm_init == 1.5
    cfg.generator.rope_scale = 0.0
    with pytest.raises(ValueError, match="generator.rope_scale"):
        cfg.validate()
