"""Each stage trains exactly what it declares: only declared parameters get gradients, frozen weights
stay bitwise unchanged after optimiser steps."""

import pytest
import torch

from reasonedit.config import load_config
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


@pytest.fixture(scope="module")
def start_model(tiny_model_dir):
    return tiny_model_dir


def stage_cfg(tmp_path, n, steps=2, extra=()):
    _, cfg = load_config(DEMO, [f"output_dir={tmp_path}", f"stage{n}.steps={steps}", f"stage{n}.warmup_steps=0",
                                "batches.window=8", "train.ema_decay=0.9", "train.log_every=1", *extra])
    return cfg


@pytest.mark.parametrize("n,trainable", [(1, {"lora"}), (2, {"generator"}), (3, {"lora", "generator"})])
def test_only_declared_parameters_train(n, trainable, start_model, small_dataset, tmp_path):
    from reasonedit.stages import stage_for
    from reasonedit.training import load_stage_model, train_stage

    cfg = stage_cfg(tmp_path, n)
    stage = stage_for(n, cfg)
    before = load_stage_model(stage, start_model)
    for name, p in before.named_parameters():
        kind = "lora" if "lora_" in name else "generator" if name.startswith("generator.") else "frozen"
        assert p.requires_grad == (kind in trainable), name
    res = train_stage(cfg, n, start_model, small_dataset, tmp_path / f"stage{n}")
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    after = load_stage_model(stage, res.model)
    changed = set()
    for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        if not torch.equal(a, b):
            changed.add(name)
        if not a.requires_grad:
            assert torch.equal(a, b), f"frozen {name} changed"
    assert changed and all(before.get_parameter(n).requires_grad for n in changed)


def test_stage_declarations():
    from reasonedit.stages import STAGES

    assert STAGES[1].components == ("reasoner",)  # stage 1 never loads the generator
    assert STAGES[3].terms == ("fm", "ntp")
    _, cfg = load_config(DEMO, ["stage1.lr=1e-4"])
    assert cfg.stage1.lr == 1e-4
    from reasonedit.config import ExperimentConfig
    e = ExperimentConfig()
    assert (e.stage1.lr, e.stage2.lr, e.stage3.lr) == (1e-4, 1e-5, 6e-6)
    assert (e.stage1.steps, e.stage2.steps, e.stage3.steps) == (50_000, 28_000, 12_000)
    assert (e.stage1.gpus, e.stage2.gpus, e.stage3.gpus) == (32, 128, 128)
