"""Issue #5: `reasonedit train` under torchrun (2 ranks, gloo on the CPU) trains what one process trains.

Global micro-batch g goes to rank g % world_size, and its noise is drawn from (seed, stage, step, g), so one
process with 2 micro-batches per step (stage2.grad_accum=2) sees what 2 ranks with 1 each see: the losses
and the final weights must agree to float tolerance, with DDP and with FSDP2 (train.parallel=fsdp), and an
FSDP2 run resumed from a checkpoint (sharded optimizer state gathered by name) must agree too. DeepSpeed
ZeRO-2 and ZeRO-3 on the same 2 ranks must land where DDP lands; ZeRO-3 also stops on SIGTERM to one rank
and resumes from DeepSpeed's own checkpoint files.

Tolerance 1e-5 throughout: the ranks' gradients are summed in another order (DDP's all-reduce buckets,
ZeRO's reduce-scatter partitions, FSDP2's per-block reduce-scatter) and the clipping norm is summed over
other partitions, so float32 results may differ in the last bits; measured here, ZeRO-2 equals DDP bitwise
and ZeRO-3 differs by under 1e-6 in the weights after 3 steps.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from pathlib import Path

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


def train(root, ranks, grad_accum, parallel, extra=(), steps=STEPS, background=False):
    args = ["train", "--config", str(DEMO), "--stage", "2", f"output_dir={root}", f"stage2.steps={steps}",
            "stage2.warmup_steps=0", "batches.window=8", "train.ema_decay=0.9", "train.log_every=1",
            "train.checkpoint_every=1", "train.keep_last=5", f"stage2.grad_accum={grad_accum}",
            f"train.parallel={parallel}", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone",
                 "-m", "reasonedit"] if ranks > 1 else [sys.executable, "-m", "reasonedit"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        log = open(root / "train.log", "w")
        return subprocess.Popen([*launcher, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
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


def assert_plan_matches_what_ranks_hold(stderr, start, root, ranks, parallel):
    """`reasonedit plan`'s parameter, gradient and optimizer bytes against what each rank logged it holds at its
    first update. Parameters: over the ranks they sum to the plan's total (uneven shards make ranks differ by a few
    rows). Gradients and optimizer state: the plan counts every trainable parameter; the few no loss reaches (the
    generator's last text-stream feed-forward) hold neither, so what is held is at most the plan and close to it."""
    import json
    import re

    from reasonedit.config import load_config
    from reasonedit.training.plan import plan_stage

    held = {int(r): dict(zip(("parameters", "gradients", "optimizer"), map(int, b))) for r, *b in re.findall(
        r"rank (\d) holds parameters (\d+) B, gradients (\d+) B, optimizer (\d+) B", stderr)}
    assert sorted(held) == list(range(ranks)), stderr[-2000:]
    vocab = json.loads((start / "reasoner" / "config.json").read_text())["text_config"]["vocab_size"]
    _, cfg = load_config(DEMO, [f"output_dir={root}", "train.ema_decay=0.9", f"model.reasoner.vocab_size={vocab}"])
    rows = {part: b for part, b, _ in plan_stage(cfg, 2, ranks, parallel, adapter=False).rows}
    total = {part: sum(h[part] for h in held.values()) for part in ("parameters", "gradients", "optimizer")}
    assert abs(total["parameters"] - rows["parameters"] * ranks) <= 4 * ranks, (total, rows)
    for h in held.values():
        assert abs(h["parameters"] - rows["parameters"]) <= 0.05 * rows["parameters"], (h, rows)
        for part in ("gradients", "optimizer"):
            assert 0.9 * rows[part] <= h[part] <= 1.05 * rows[part], (part, h, rows)


@pytest.fixture(scope="module")
def single(start_model, small_dataset, tmp_path_factory):  # noqa: F811
    stage_dir, _ = train(layout(tmp_path_factory.mktemp("single"), start_model, small_dataset), 1, 2, "none")
    return stage_dir


@pytest.fixture(scope="module")
def ddp(start_model, small_dataset, tmp_path_factory):  # noqa: F811
    stage_dir, res = train(layout(tmp_path_factory.mktemp("ddp"), start_model, small_dataset), 2, 1, "ddp",
                           ["train.tensorboard=true"])
    assert "ddp on 2 rank(s)" in res.stderr
    return stage_dir


def test_only_the_main_rank_writes_metrics(ddp):
    events = list((ddp / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events


def test_ddp_on_two_ranks_equals_one_process(single, ddp):
    stage_dir = ddp
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
    assert_plan_matches_what_ranks_hold(res.stderr, start_model, root, ranks=2, parallel="fsdp2")
    # what a crash after checkpoint STEPS-1 leaves: resume under FSDP2 and finish the same
    shutil.rmtree(stage_dir / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(stage_dir / "model")
    stage_dir, res = train(root, 2, 1, "fsdp")
    assert "resumed from" in res.stderr
    assert_close(result(single), result(stage_dir), "fsdp resumed")


def cli_takes_deepspeed_flag():
    from reasonedit.cli import build_parser
    _, extra = build_parser().parse_known_args(["train", "--config", "x", "--stage", "2", "--deepspeed", "y.json"])
    return not extra


def launch_deepspeed_sh(root, ranks, overrides):
    """launch/deepspeed.sh as a user runs it: the deepspeed launcher, `--deepspeed JSON` (DS_CONFIG's default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": str(ranks), "MASTER_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = [f"output_dir={root}", f"stage2.steps={STEPS}", "stage2.warmup_steps=0", "batches.window=8",
            "train.ema_decay=0.9", "train.log_every=1", "train.checkpoint_every=1", "train.keep_last=5", *overrides]
    res = subprocess.run([str(ROOT / "launch" / "deepspeed.sh"), "2", str(DEMO), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return root / "stage2", res


def test_deepspeed_zero2_on_two_ranks_lands_where_ddp_lands(ddp, start_model, small_dataset, tmp_path):  # noqa: F811
    root = layout(tmp_path, start_model, small_dataset)
    if cli_takes_deepspeed_flag():  # the launcher's `--deepspeed launch/deepspeed/zero2.json`
        stage_dir, res = launch_deepspeed_sh(root, 2, [])
    else:  # the same JSON through the config key, under torchrun
        stage_dir, res = train(root, 2, 1, "deepspeed", ["train.deepspeed_config=launch/deepspeed/zero2.json"])
    assert "deepspeed on 2 rank(s)" in res.stderr and "ZeRO-2" in res.stderr
    assert_plan_matches_what_ranks_hold(res.stderr, start_model, root, ranks=2, parallel="zero2")
    assert (stage_dir / "checkpoints" / f"step_{STEPS:08d}" / "deepspeed").is_dir()  # DeepSpeed's optimizer state
    assert_close(result(ddp), result(stage_dir), "zero2")
    from safetensors.torch import load_file
    ema = [load_file(str(d / "model_ema" / "generator" / "diffusion_pytorch_model.safetensors"))
           for d in (ddp, stage_dir)]
    assert max((ema[0][k] - ema[1][k]).abs().max().item() for k in ema[0]) <= TOL


def test_deepspeed_zero3_stops_on_sigterm_to_one_rank_resumes_and_saves_a_loadable_model(
        ddp, start_model, small_dataset, tmp_path):  # noqa: F811
    from reasonedit.models.model import ReasonEditModel

    root = layout(tmp_path, start_model, small_dataset)
    extra = ["train.zero_stage=3", "train.checkpoint_every=0"]  # no checkpoint but SIGTERM's before the end
    proc = train(root, 2, 1, "deepspeed", extra, background=True)
    try:
        deadline = time.monotonic() + 200
        while "stage2 step 1/" not in (root / "train.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (root / "train.log").read_text()[-3000:]
            time.sleep(0.05)
        ranks = [int(p) for p in (Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())]
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGTERM)  # one rank only: both must stop at the same step
        assert proc.wait(timeout=120) == 0, (root / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (root / "train.log").read_text()
    assert "SIGTERM: saved step" in text and "stopped by SIGTERM" in text
    saved = [p.name for p in (root / "stage2" / "checkpoints").glob("step_*")]
    assert len(saved) == 1 and int(saved[0].split("_")[1]) < STEPS, saved
    assert not (root / "stage2" / "model").exists()
    stage_dir, res = train(root, 2, 1, "deepspeed", extra)
    assert "resumed from" in res.stderr and "ZeRO-3" in res.stderr
    assert_plan_matches_what_ranks_hold(res.stderr, start_model, root, ranks=2, parallel="zero3")
    assert_close(result(ddp), result(stage_dir), "zero3 resumed")
    model = ReasonEditModel.from_pretrained(stage_dir / "model")
    assert model.generator is not None


def test_split_data_streams_on_two_ranks_equal_one_process_and_halve_each_ranks_data(start_model, small_dataset,  # noqa: F811
                                                                                      tmp_path):
    """train.data_streams=2: each rank reads and preprocesses only its own stream's records, and the run still
    trains what one process with the same two streams and 2 micro-batches per step trains."""
    import re

    one, res_one = train(layout(tmp_path / "one", start_model, small_dataset), 1, 2, "none", ["train.data_streams=2"])
    two, res_two = train(layout(tmp_path / "two", start_model, small_dataset), 2, 1, "ddp", ["train.data_streams=2"])
    assert_close(result(one), result(two), "split data streams")
    read = {int(r): int(n) for r, n in re.findall(r"rank (\d) read and preprocessed (\d+) records", res_two.stderr)}
    total = int(re.search(r"rank 0 read and preprocessed (\d+) records", res_one.stderr).group(1))
    assert sorted(read) == [0, 1] and sum(read.values()) == total and all(n < total for n in read.values())
