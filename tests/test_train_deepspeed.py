"""The DeepSpeed JSON is filled from the experiment config before `deepspeed.initialize`; a JSON that cannot
be used stops with the key and the file. (The runs themselves, ZeRO-2 and ZeRO-3 on 2 gloo ranks against
DDP, are in tests/test_train_distributed.py, next to the DDP run they are compared with.) The rl stage (GRPO) under
ZeRO-2 on 2 ranks through launch/deepspeed.sh trains what one process does and resumes exactly; under ZeRO-3 (one
rank, the same launcher) it trains what the plain loop does."""

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


# -- the rl stage (GRPO) under the deepspeed launcher ----------------------------------------------------------------
RL_ARGS = ["rl.steps=2", "rl.warmup_steps=0", "rl.lr=5e-3", "rl.group_size=2", "rl.max_new_tokens=4",
           "rl.reasoner_budget=512", "rl.beta=0.5", "rl.reference=base", "rl.updates_per_batch=2", "batches.window=4",
           "train.log_every=1", "train.checkpoint_every=1", "train.keep_last=3"]


def _rl_layout(root, start, data):
    """OUTPUT_DIR with the rl stage's default start model (stage1/model) and data (OUTPUT_DIR/data)."""
    (root / "stage1").mkdir(parents=True)
    (root / "stage1" / "model").symlink_to(start)
    (root / "data").symlink_to(data)
    return root


def _rl_run(root, ranks=0, ds_config="zero2.json", extra=()):
    """`reasonedit train --stage rl` with 2 micro-batches per step in all: through launch/deepspeed.sh (the deepspeed
    launcher, `--deepspeed launch/deepspeed/<ds_config>`, gloo on the CPU) on `ranks` ranks, or (ranks 0) one plain
    process."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = [f"output_dir={root}", *RL_ARGS, f"rl.grad_accum={2 // max(ranks, 1)}", *extra]
    if ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(NPROC_PER_NODE=str(ranks), MASTER_PORT=str(port), DS_CONFIG=str(ZERO2.parent / ds_config),
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        command = [str(ROOT / "launch" / "deepspeed.sh"), "rl", str(DEMO), *overrides]
    else:
        command = [sys.executable, "-m", "reasonedit", "train", "--config", str(DEMO), "--stage", "rl", *overrides]
    res = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return json.loads((root / "rl" / "history.json").read_text()), res.stderr


def _assert_same_run(a_root, a, b_root, b, what):
    from tests.test_rl_stage import FIGURES, lora_weights

    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for k in ("grpo", "lr", *FIGURES):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-5), (what, k, x[k], y[k])
    wa, wb = lora_weights(a_root / "rl" / "model"), lora_weights(b_root / "rl" / "model")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5, what


@pytest.fixture(scope="module")
def rl_plain(start_model, small_dataset, tmp_path_factory):  # noqa: F811
    """The rl stage, 2 steps of 2 micro-batches in one plain process: OUTPUT_DIR and history."""
    root = _rl_layout(tmp_path_factory.mktemp("rl_plain"), start_model, small_dataset)
    history, _ = _rl_run(root)
    return root, history


@pytest.fixture(scope="module")
def rl_zero2(start_model, small_dataset, tmp_path_factory):  # noqa: F811
    """The rl stage, 2 steps under ZeRO-2 on 2 ranks: its OUTPUT_DIR, history and launch log."""
    root = _rl_layout(tmp_path_factory.mktemp("rl_zero2"), start_model, small_dataset)
    history, log = _rl_run(root, 2)
    return root, history, log


def test_rl_under_deepspeed_zero2_on_two_ranks_equals_one_process(rl_zero2, rl_plain):
    """GRPO's rollouts (sampled inside the engine's forward, on the reasoner it wraps), its two updates per batch
    (two engine steps per optimiser step, the schedule counting updates) and its figures, under ZeRO-2 on 2 ranks:
    what one process with 2 micro-batches trains."""
    root, two, log = rl_zero2
    assert "deepspeed on 2 rank(s)" in log and "ZeRO-2" in log
    assert (root / "rl" / "checkpoints" / "step_00000002" / "deepspeed").is_dir()  # DeepSpeed's optimizer state
    _assert_same_run(*rl_plain, root, two, "zero2")


def test_rl_under_deepspeed_zero2_resumes_exactly(rl_zero2, tmp_path):
    """The ZeRO-2 run's last checkpoint removed (as if killed inside step 2), the same launch resumes from
    DeepSpeed's own files of step 1 and lands where the uninterrupted run did, bitwise."""
    import shutil

    from tests.test_rl_stage import lora_weights

    done, whole, _ = rl_zero2
    root = tmp_path / "killed"
    shutil.copytree(done, root, symlinks=True)
    shutil.rmtree(root / "rl" / "checkpoints" / "step_00000002")
    shutil.rmtree(root / "rl" / "model")
    resumed, log = _rl_run(root, 2)
    assert "resumed from" in log and "at step 1" in log
    assert resumed == whole  # losses and rollout figures, floats compared exactly
    w_whole, w_resumed = lora_weights(done / "rl" / "model"), lora_weights(root / "rl" / "model")
    assert w_whole.keys() == w_resumed.keys() and all(torch.equal(w_whole[k], w_resumed[k]) for k in w_whole)


def test_rl_under_deepspeed_zero3_trains_what_the_plain_loop_trains(rl_plain, start_model, small_dataset,  # noqa: F811
                                                                    tmp_path):
    """ZeRO-3 (one rank, 2 micro-batches) partitions the LoRA the rollouts sample with: the engine's hooks gather it
    for generation and the reference's log-probs as for the loss's forward, so GRPO updates as plain PyTorch does."""
    root = _rl_layout(tmp_path, start_model, small_dataset)
    history, log = _rl_run(root, 1, "zero3.json")
    assert "ZeRO-3" in log
    _assert_same_run(*rl_plain, root, history, "zero3")
