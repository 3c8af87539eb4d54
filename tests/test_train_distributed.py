"""Issue #5: `reasonedit train` under torchrun (2 ranks, gloo on the CPU) trains what one process trains.

Global micro-batch g goes to rank g % world_size, and its noise is drawn from (seed, stage, step, g), so one
process with 2 micro-batches per step (stage2.grad_accum=2) sees what 2 ranks with 1 each see: the losses
and the final weights must agree to float tolerance, with DDP and with FSDP2 (train.parallel=fsdp), and an
FSDP2 run resumed from a checkpoint (sharded optimizer state gathered by name) must agree too.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.test_stages import start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
STEPS = 3
TOL = 1e-5


def layout(root, start, data):
    """OUTPUT_DIR with the default start model (stage1/model) and data: no --start flag, whose name
    torchrun's own parser takes for an abbreviation of its --start-method."""
    (root / "stage1").mkdir(parents=True)
    (root / "stage1" / "model").symlink_to(start)
    (root / "data").symlink_to(data)
    return root


def train(root, ranks, grad_accum, parallel, extra=()):
    args = ["train", "--config", str(DEMO), "--stage", "2", f"output_dir={root}", f"stage2.steps={STEPS}",
            "stage2.warmup_steps=0", "batches.window=8", "train.ema_decay=0.9", "train.log_every=1",
            "train.checkpoint_every=1", "train.keep_last=5", f"stage2.grad_accum={grad_accum}",
            f"train.parallel={parallel}", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone",
                 "-m", "reasonedit"] if ranks > 1 else [sys.executable, "-m", "reasonedit"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return root / "stage2", res


def result(stage_dir):
    from safetensors.torch import load_file
    last = stage_dir / "checkpoints" / f"step_{STEPS:08d}"
    history = torch.load(last / "trainer.pt", weights_only=False)["history"]
    weights = {**{f"ckpt/{k}": v for k, v in torch.load(last / "model.pt", weights_only=False).items()},
               **{f"model/{k}": v for k, v in
                  load_file(str(stage_dir / "model" / "generator" / "diffusion_pytorch_model.safetensors")).items()}}
    return history, weights


def assert_close(a, b, what):
    (ha, wa), (hb, wb) = a, b
    assert len(ha) == len(hb) == STEPS
    for i, (x, y) in enumerate(zip(ha, hb)):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=TOL, abs=TOL), f"{what}: step {i + 1} {k}: {x[k]} vs {y[k]}"
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= TOL, f"{what}: final weights differ by up to {worst}"


@pytest.fixture(scope="module")
def single(start_model, small_dataset, tmp_path_factory):  # noqa: F811
    stage_dir, _ = train(layout(tmp_path_factory.mktemp("single"), start_model, small_dataset), 1, 2, "none")
    return stage_dir


def test_ddp_on_two_ranks_equals_one_process(single, start_model, small_dataset, tmp_path):  # noqa: F811
    stage_dir, res = train(layout(tmp_path, start_model, small_dataset), 2, 1, "ddp")
    assert "ddp on 2 rank(s)" in res.stderr
    assert {p.name for p in (stage_dir / "checkpoints" / f"step_{STEPS:08d}").iterdir()} >= {"rank0.pt", "rank1.pt"}
    assert_close(result(single), result(stage_dir), "ddp")
    from safetensors.torch import load_file
    ema = [load_file(str(d / "model_ema" / "generator" / "diffusion_pytorch_model.safetensors")) for d in (single, stage_dir)]
    assert max((ema[0][k] - ema[1][k]).abs().max().item() for k in ema[0]) <= TOL


def test_fsdp2_on_two_ranks_equals_one_process_and_resumes(single, start_model, small_dataset, tmp_path):  # noqa: F811
    root = layout(tmp_path, start_model, small_dataset)
    stage_dir, res = train(root, 2, 1, "fsdp")
    assert "fsdp on 2 rank(s)" in res.stderr
    assert_close(result(single), result(stage_dir), "fsdp")
    # what a crash after checkpoint STEPS-1 leaves: resume under FSDP2 and finish the same
    shutil.rmtree(stage_dir / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(stage_dir / "model")
    stage_dir, res = train(root, 2, 1, "fsdp")
    assert "resumed from" in res.stderr
    assert_close(result(single), result(stage_dir), "fsdp resumed")
