"""bench/train_step.py runs on the CPU and prints its figures; its FLOP counter agrees with PyTorch's."""

import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

LINE = re.compile(r"^stage(?P<stage>[123]) (?P<layout>packed|padded): (?P<tps>[\d,]+) tokens/s \| step "
                  r"(?P<step>[\d.]+) s \(median of (?P<n>\d+)\) \| (?P<flops>[\d.e+]+) (?P<unit>GFLOP|TFLOP)/step \| "
                  r"MFU: n/a on CPU$", re.M)
RATIO = re.compile(r"^stage(?P<stage>[123]) packed/padded: (?P<ratio>[\d.]+)x tokens/s on the same (?P<n>\d+) "
                   r"batches \(padded batches are (?P<pad>[\d.]+)% padding\)$", re.M)


@pytest.fixture(scope="module")
def tiny_run():
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--model", "tiny", "--steps", "2", "--warmup", "1",
           "--records", "12", "batches.window=8"]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_prints_tokens_per_second_and_mfu_for_each_stage_and_layout(tiny_run):
    assert tiny_run.returncode == 0, tiny_run.stderr[-3000:]
    found = {(m["stage"], m["layout"]): m for m in LINE.finditer(tiny_run.stdout)}
    assert set(found) == {(s, layout) for s in "123" for layout in ("packed", "padded")}, tiny_run.stdout
    for m in found.values():
        assert int(m["n"]) == 2  # the warm-up step is not among the timed ones
        assert float(m["tps"].replace(",", "")) > 0 and float(m["step"]) > 0 and float(m["flops"]) > 0
    # the same samples, so the same model FLOPs in both layouts
    for s in "123":
        assert found[(s, "packed")]["flops"] == found[(s, "padded")]["flops"]


def test_prints_packed_over_padded_ratio_for_each_stage(tiny_run):
    ratios = {m["stage"]: m for m in RATIO.finditer(tiny_run.stdout)}
    assert set(ratios) == {"1", "2", "3"}, tiny_run.stdout
    assert all(float(m["ratio"]) > 0 and 0 <= float(m["pad"]) < 100 for m in ratios.values())
    assert float(ratios["1"]["pad"]) > 0  # reasoner samples differ in length: padding exists


def test_prints_model_flops_by_part_for_each_stage(tiny_run):
    parts = {m[1]: m[2] for m in re.finditer(r"^stage([123]) model FLOPs by part: (.+)$", tiny_run.stdout, re.M)}
    assert set(parts) == {"1", "2", "3"}, tiny_run.stdout
    assert "generator" not in parts["1"] and "generator.matmul" in parts["2"]  # stage 1 never runs the generator
    for line in parts.values():
        shares = [float(x) for x in re.findall(r" (\d+)%", line)]
        assert abs(sum(shares) - 100) <= len(shares)  # rounded shares of one total


def test_prints_one_vision_attention_call_per_layer_per_forward(tiny_run):
    calls = re.compile(r"^stage([123]) (packed|padded) attention calls per step: vision tower (\d+) "
                       r"\((?:(\d+) forwards? x (\d+) layers|no forward)\), language model (\d+), all (\d+)$", re.M)
    found = {(m[1], m[2]): m for m in calls.finditer(tiny_run.stdout)}
    assert set(found) == {(s, layout) for s in "123" for layout in ("packed", "padded")}, tiny_run.stdout
    assert found[("1", "packed")][4] is not None  # stage 1's batches hold images
    for m in found.values():
        vision, forwards, layers = int(m[3]), int(m[4] or 0), int(m[5] or 0)
        assert vision == forwards * layers  # not one per window
        assert int(m[7]) == vision + int(m[6])


def test_bad_stage_is_refused_with_exit_1(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    assert script.main(["--stages", "4"]) == 1
    assert "--stages" in capsys.readouterr().err


def test_generator_forward_flops_equal_pytorch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from reasonedit.models.generator import GeneratorSample, PackedQwenImageTransformer
    from reasonedit.training.flops import GeneratorDoc, generator_flops

    torch.manual_seed(0)
    gen = PackedQwenImageTransformer(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    samples = [GeneratorSample(torch.randn(7, 32), torch.randn(4, 6, 8), [torch.randn(4, 4, 4)], 0.3),
               GeneratorSample(torch.randn(5, 32), torch.randn(4, 10, 6), [], 0.7)]
    docs = [GeneratorDoc(7, 3 * 4 + 2 * 2), GeneratorDoc(5, 5 * 3)]  # image tokens: (h/2) * (w/2) per image
    # the math kernel decomposes into matmuls, which the counter sees (the fused CPU kernel it does not count)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        gen(gen.pack(samples), attention_backend="sdpa")
    assert generator_flops(gen, docs, gradients=False).total == counter.get_total_flops()


def test_reasoner_matmul_flops_equal_pytorch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from reasonedit.models.reasoner import Reasoner
    from reasonedit.training.flops import ReasonerDoc, reasoner_flops

    reasoner = Reasoner.tiny(["a red circle above a blue square"] * 4, vocab_size=300)
    ids = torch.randint(0, 200, (1, 11))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        reasoner.model(input_ids=ids, use_cache=False)
    count = reasoner_flops(reasoner.model, [ReasonerDoc(11)], gradients=False).parts
    # the counter charges causal attention for every pair, masked or not: L^2 where we count L(L+1)/2
    text = reasoner.model.config.text_config
    full_attention = 4 * text.num_hidden_layers * text.hidden_size * 11 * 11
    assert count["reasoner.matmul"] + full_attention == counter.get_total_flops()


def test_prints_host_syncs_per_step_and_the_before_after_ratio_for_each_stage(tiny_run):
    syncs = dict(re.findall(r"^stage([123]) packed host syncs per step: (\d+) ", tiny_run.stdout, re.M))
    ratios = re.findall(r"^stage([123]) packed before/after: step [\d.]+ s reading every step \((\d+) host syncs\) "
                        r"/ [\d.]+ s on the device \((\d+)\): ([\d.]+)x$", tiny_run.stdout, re.M)
    assert syncs == {"1": "1", "2": "1", "3": "1"}, tiny_run.stdout  # the skip rule's read only
    assert [r[0] for r in ratios] == ["1", "2", "3"], tiny_run.stdout
    assert all(int(old) > int(now) and float(x) > 0 for _, old, now, x in ratios)
