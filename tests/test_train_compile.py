"""train.compile: auto is on for CUDA outside DeepSpeed; it compiles each transformer block in place (names kept)
and fuses AdamW on CUDA. Nothing here runs a compiled block (that is a GPU check)."""

import types

import pytest
import torch


@pytest.mark.parametrize("setting,device,parallel,on", [
    ("auto", "cuda", "ddp", True), ("auto", "cuda", "deepspeed", False), ("auto", "cpu", "none", False),
    ("true", "cpu", "none", True), ("True", "cuda", "fsdp", True), ("false", "cuda", "ddp", False)])
def test_the_switch_resolves_by_device_and_parallel_mode(setting, device, parallel, on):
    from reasonedit.training.compiled import compile_enabled

    assert compile_enabled(setting, torch.device(device), parallel) is on


def test_a_bad_setting_is_refused_by_name():
    from reasonedit.config import TrainConfig
    from reasonedit.training.compiled import compile_enabled

    with pytest.raises(ValueError, match="train.compile"):
        compile_enabled("yes", torch.device("cpu"), "none")
    with pytest.raises(ValueError, match="train.compile"):
        TrainConfig(compile="sometimes").validate()
    with pytest.raises(ValueError, match="train.ema_dtype"):
        TrainConfig(ema_dtype="float16").validate()


def test_each_generator_and_language_model_block_is_compiled_in_place_with_its_names_kept(monkeypatch):
    from reasonedit.models.generator import PackedQwenImageTransformer
    from reasonedit.training.compiled import compile_blocks, fused_adamw

    gen = PackedQwenImageTransformer(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    reasoner = types.SimpleNamespace(model=types.SimpleNamespace(get_decoder=lambda: types.SimpleNamespace(
        layers=layers)))
    model = types.SimpleNamespace(generator=gen, reasoner=reasoner)
    names = list(gen.state_dict())
    calls = []  # torch.compile itself stubbed: importing dynamo alone costs seconds on a CPU
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    assert compile_blocks(model) == 2 + 3
    assert calls == [{"dynamic": True}] * 5
    for block in [*gen.transformer_blocks, *layers]:
        assert block._compiled_call_impl is not None
    assert list(gen.state_dict()) == names
    assert not fused_adamw(True, list(gen.parameters()))  # CPU parameters: AdamW's for-each path
