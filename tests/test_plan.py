"""`reasonedit plan`: the per-GPU memory of a stage by part, from models built on the meta device. Counts are
checked against the reference modules (diffusers' transformer and VAE, peft's LoRA on a real tiny reasoner);
the bytes the ranks actually hold under FSDP2 are checked in tests/test_train_distributed.py."""

import json

import torch

from reasonedit.cli import main
from reasonedit.config import load_config
from reasonedit.training.plan import count_stage, plan_stage
from tests.conftest import ROOT

PAPER = ROOT / "configs" / "experiment" / "paper.yaml"
DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


def numel(module):
    return sum(p.numel() for p in module.parameters())


def test_the_real_preset_counts_what_diffusers_builds():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    _, cfg = load_config(PAPER, ["model.path=/models/Qwen-Image-Edit"])
    counts = count_stage(cfg, 2, adapter=False)
    g = cfg.model.generator
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(
            patch_size=g.patch_size, in_channels=g.in_channels, out_channels=g.out_channels, num_layers=g.num_layers,
            attention_head_dim=g.attention_head_dim, num_attention_heads=g.num_attention_heads,
            joint_attention_dim=g.joint_attention_dim, axes_dims_rope=tuple(g.axes_dims_rope))
        vae = AutoencoderKLQwenImage()  # the released VAE's geometry is diffusers' default
    assert counts.loaded["generator"] == numel(transformer) and counts.trainable["generator"] == numel(transformer)
    assert counts.loaded["vae"] == numel(vae)


def test_the_lora_count_is_what_peft_adds_to_a_real_reasoner(tiny_model_dir):
    from reasonedit.stages import stage_for
    from reasonedit.training import load_stage_model

    vocab = json.loads((tiny_model_dir / "reasoner" / "config.json").read_text())["text_config"]["vocab_size"]
    _, cfg = load_config(DEMO, [f"model.reasoner.vocab_size={vocab}"])
    model = load_stage_model(stage_for(1, cfg), tiny_model_dir)
    counts = count_stage(cfg, 1)
    assert counts.trainable["reasoner"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.trainable_tensors == sum(1 for p in model.parameters() if p.requires_grad)
    assert counts.loaded["reasoner"] == sum(p.numel() for p in model.reasoner.parameters())


def test_layouts_divide_what_they_shard():
    _, cfg = load_config(PAPER, ["model.path=/models/Qwen-Image-Edit"])
    rows = {p: {part: b for part, b, _ in plan_stage(cfg, 2, 8, p).rows} for p in ("ddp", "fsdp2", "zero2", "zero3")}
    counts = count_stage(cfg, 2)
    vae = counts.loaded["vae"] * 2  # bf16
    assert rows["fsdp2"]["parameters"] == -(-(rows["ddp"]["parameters"] - vae) // 8) + vae  # the VAE stays whole
    assert rows["zero2"]["parameters"] == rows["ddp"]["parameters"]
    # ZeRO-3 keeps what trains nothing whole (stage 2: the reasoner and the VAE) and the tensors under DeepSpeed's
    # persistence threshold gathered besides their partitions (norms, biases: well under 1 % of the generator)
    frozen, gen = (counts.loaded["reasoner"] + counts.loaded["vae"]) * 2, counts.loaded["generator"] * 2
    assert frozen + gen / 8 <= rows["zero3"]["parameters"] <= frozen + gen / 8 + 0.01 * gen
    assert rows["zero2"]["optimizer"] <= rows["zero3"]["optimizer"] <= rows["zero2"]["optimizer"] + 12 * 8 * 3000
    assert rows["zero3"]["optimizer"] < rows["ddp"]["optimizer"]
    assert rows["fsdp2"]["EMA"] == -(-rows["ddp"]["EMA"] // 8)


def test_cpu_offload_moves_the_shards_to_host_memory():
    _, cfg = load_config(PAPER, ["model.path=/models/Qwen-Image-Edit"])
    on_gpu = {part: b for part, b, _ in plan_stage(cfg, 2, 8, "fsdp2").rows}
    _, cfg = load_config(PAPER, ["model.path=/models/Qwen-Image-Edit", "train.cpu_offload=true"])
    plan = plan_stage(cfg, 2, 8, "fsdp2")
    rows = {part: b for part, b, _ in plan.rows}
    vae = count_stage(cfg, 2).loaded["vae"] * 2
    assert rows["parameters (host)"] + rows["VAE"] == on_gpu["parameters"] and rows["VAE"] == vae
    assert rows["gradients (host)"] == on_gpu["gradients"] and rows["optimizer (host)"] == on_gpu["optimizer"]
    assert plan.host_total == on_gpu["parameters"] - vae + on_gpu["gradients"] + on_gpu["optimizer"]
    assert plan.total == sum(on_gpu.values()) - plan.host_total
    assert "host memory per rank" in plan.table(80)


def test_the_command_prints_each_stage_and_exits_1_when_one_does_not_fit(capsys):
    assert main(["plan", "paper", "model.path=/models/Qwen-Image-Edit"]) == 0
    out = capsys.readouterr().out
    assert out.count("| total |") == 3 and "stage 2 on 128 GPU(s), fsdp2" in out and "fits in 80 GiB" in out
    assert main(["plan", "paper", "model.path=/models/Qwen-Image-Edit", "--stage", "2", "--gpus", "8",
                 "--parallel", "ddp"]) == 1
    assert "does NOT fit in 80 GiB" in capsys.readouterr().out
