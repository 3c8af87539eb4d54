"""Issue #5: `reasonedit train` killed with SIGKILL at random steps and relaunched each time ends with the
same loss curve and the same final weights, bitwise, as one uninterrupted run; no checkpoint folder is
ever visible half-written (hidden `.partial` / `.deleting` folders are fine)."""

import os
import random
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import ROOT
from tests.test_stages import start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
STEPS = 10
CHECKPOINT_FILES = ("model.pt", "optimizer.pt", "trainer.pt", "rank0.pt")


def command(start, data, out):
    return [sys.executable, "-m", "reasonedit", "train", "--config", str(DEMO), "--stage", "2",
            "--start", str(start), "--data", str(data), "--out", str(out), f"output_dir={out.parent}",
            f"stage2.steps={STEPS}", "stage2.warmup_steps=0", "batches.window=8", "train.ema_decay=0.9",
            "train.log_every=1", "train.checkpoint_every=1", "train.keep_last=2"]


def visible_steps(root):
    return sorted(p for p in root.glob("step_*")) if root.is_dir() else []


def assert_no_half_written(root):
    """Every visible step_N folder holds all its files (a folder renamed away while we look is fine)."""
    for path in visible_steps(root):
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        if missing and path.exists():
            raise AssertionError(f"{path.name} is visible but lacks {missing}: {sorted(os.listdir(path))}")


def launch(cmd, log):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_to_end(cmd, log, root):
    proc = launch(cmd, log)
    while proc.poll() is None:
        assert_no_half_written(root)
        time.sleep(0.005)
    assert proc.returncode == 0, log.name


def run_and_kill(cmd, log, root, at_step, mid_save=False):
    """Start, watch the checkpoints folder, SIGKILL once step `at_step` is saved (or, with `mid_save`,
    as soon as a later checkpoint's staging folder appears); returns the last complete step seen."""
    proc = launch(cmd, log)
    try:
        while proc.poll() is None:
            assert_no_half_written(root)
            steps = [int(p.name.split("_")[1]) for p in visible_steps(root)]
            staging = list(root.glob(".step_*.partial")) if root.is_dir() else []
            if (steps and max(steps) >= at_step) or (mid_save and steps and max(steps) >= at_step - 1 and staging):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before the kill; see {log.name}"
    assert_no_half_written(root)
    return max(int(p.name.split("_")[1]) for p in visible_steps(root))


def final_state(out):
    from safetensors.torch import load_file
    last = visible_steps(out / "checkpoints")[-1]
    trainer = torch.load(last / "trainer.pt", weights_only=False)
    assert trainer["step"] == STEPS
    gen = load_file(str(out / "model" / "generator" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(out / "model_ema" / "generator" / "diffusion_pytorch_model.safetensors"))
    return trainer["history"], torch.load(last / "model.pt", weights_only=False), gen, ema


def test_sigkill_at_random_steps_then_resume_equals_the_uninterrupted_run(start_model, small_dataset,  # noqa: F811
                                                                          tmp_path):
    whole_out, killed_out = tmp_path / "whole" / "stage2", tmp_path / "killed" / "stage2"
    with open(tmp_path / "whole.log", "w") as log:
        run_to_end(command(start_model, small_dataset, whole_out), log, whole_out / "checkpoints")

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    first = rng.randint(2, 4)
    second = rng.randint(first + 2, STEPS - 2)
    root, cmd = killed_out / "checkpoints", command(start_model, small_dataset, killed_out)
    with open(tmp_path / "killed.log", "w") as log:
        reached = run_and_kill(cmd, log, root, first)
        reached = run_and_kill(cmd, log, root, max(second, reached + 2), mid_save=True)
        assert reached < STEPS, f"seed {seed}"
        run_to_end(cmd, log, root)
    text = (tmp_path / "killed.log").read_text()
    assert text.count("resumed from") == 2, text

    hist_a, ckpt_a, gen_a, ema_a = final_state(whole_out)
    hist_b, ckpt_b, gen_b, ema_b = final_state(killed_out)
    assert len(hist_a) == STEPS
    assert hist_a == hist_b, f"seed {seed}: the loss curves differ"  # floats compared exactly
    for a, b in ((ckpt_a, ckpt_b), (gen_a, gen_b), (ema_a, ema_b)):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}: {[k for k in a if not torch.equal(a[k], b[k])][:3]}"
