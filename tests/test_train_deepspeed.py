"""The DeepSpeed JSON is filled from the experiment config before `deepspeed.initialize`; a JSON that cannot
be used stops with the key and the file. (The runs themselves, ZeRO-2 and ZeRO-3 on 2 gloo ranks against
DDP, are in tests/test_train_distributed.py, next to the DDP run they are compared with.)"""

import json

import pytest
import torch

from reasonedit.config import ConfigError, load_config
from reasonedit.training.distributed import World
from reasonedit.training.zero import deepspeed_config, json_path
from tests.conftest import ROOT
from tests.test_stages import start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
ZERO2 = ROOT / "launch" / "deepspeed" / "zero2.json"


def cfg(*overrides):
    return load_config(DEMO, list(overrides))[1]


def test_json_values_come_from_the_experiment_config():
    c = cfg("stage2.lr=2e-4", "stage2.grad_accum=3", "train.betas=[0.8,0.95]", "train.weight_decay=0.05",
            "train.grad_clip=0.5")
    ds = deepspeed_config(ZERO2, c.train, c.stage2, "stage2", World(rank=0, world_size=4))
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["weight_decay"]) == (2e-4, [0.8, 0.95], 0.05)
    assert ds["gradient_clipping"] == 0.5
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (1, 3, 12)
    assert ds["managed_gradient_accumulation"] is False  # the trainer's loop owns the accumulation boundary


def test_on_the_cpu_the_json_trains_in_float32_with_torch_adamw():
    c = cfg()
    ds = deepspeed_config(ZERO2, c.train, c.stage2, "stage2", World(device=torch.device("cpu")))
    assert ds["bf16"]["enabled"] is False and "fp16" not in ds
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no CPU Adam extension to compile


def test_the_zero3_json_is_picked_by_train_zero_stage():
    assert json_path(cfg("train.zero_stage=3").train).name == "zero3.json"
    assert json_path(cfg("train.deepspeed_config=launch/deepspeed/zero2.json", "train.zero_stage=3").train) == ZERO2


def test_a_missing_json_names_the_key():
    with pytest.raises(FileNotFoundError, match="train.deepspeed_config: nope.json"):
        json_path(cfg("train.deepspeed_config=nope.json").train)


@pytest.mark.parametrize("edit,message", [
    ({"scheduler": {"type": "WarmupLR"}}, "remove \"scheduler\""),
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage must be 2 or 3"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type 'Lamb'"),
    # DeepSpeed's monitors write to their own output_path (default: the working directory), outside the stage folder
    ({"tensorboard": {"enabled": True, "output_path": "/tmp/elsewhere"}}, "tensorboard.enabled: DeepSpeed's own"),
    ({"csv_monitor": {"enabled": True}}, "csv_monitor.enabled: DeepSpeed's own monitors write outside"),
    ({"wandb": {"enabled": True}}, "wandb.enabled"),
    ({"flops_profiler": {"enabled": True, "output_file": "../../x.txt"}}, "flops_profiler.output_file"),
])
def test_an_unusable_json_names_the_key_and_the_file(tmp_path, edit, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**json.loads(ZERO2.read_text()), **edit}))
    c = cfg()
    with pytest.raises(ConfigError, match=message) as err:
        deepspeed_config(path, c.train, c.stage2, "stage2", World())
    assert "train.deepspeed_config" in str(err.value) and str(path) in str(err.value)


def test_deepspeed_accumulates_micro_batches_as_the_plain_loop_does(start_model, small_dataset, tmp_path,  # noqa: F811
                                                                    monkeypatch):
    """2 micro-batches per step, in this process: backward must not rescale the already token-normalised
    loss (the logged pre-clip gradient norm would halve) and the updates must match plain PyTorch's."""
    import socket

    import torch.distributed as dist

    from reasonedit.training import train_stage
    from tests.test_stages import stage_cfg

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        monkeypatch.setenv(key, value)  # what a launcher sets; restored afterwards
    extra = ["stage2.grad_accum=2", "train.ema_decay=0"]
    plain = train_stage(stage_cfg(tmp_path / "a", 2, steps=2, extra=extra), 2, start_model, small_dataset,
                        tmp_path / "a" / "stage2")
    try:
        zero = train_stage(stage_cfg(tmp_path / "b", 2, steps=2, extra=[*extra, "train.parallel=deepspeed"]), 2,
                           start_model, small_dataset, tmp_path / "b" / "stage2")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (tmp_path / "b" / "stage2" / "checkpoints" / "step_00000002" / "deepspeed").is_dir()
    assert len(plain.history) == len(zero.history) == 2
    for a, b in zip(plain.history, zero.history):
        assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6) for k in a), (a, b)
