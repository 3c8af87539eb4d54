"""Issue #5: SIGTERM to `reasonedit train` finishes the step in progress, saves a complete checkpoint at
that step, says so, and exits 0; running the same command again resumes and ends with the same loss
curve and final weights, bitwise, as a run that was never stopped. (SIGTERM to one rank of a torchrun
job stopping every rank together is in tests/test_train_distributed.py, under ZeRO-3.)"""

import os
import re
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import ROOT
from tests.test_stages import start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
STEPS = 6


def overrides(out):
    # no periodic checkpoints: the only one before the end is SIGTERM's
    return [f"output_dir={out.parent}", f"stage2.steps={STEPS}", "stage2.warmup_steps=0", "batches.window=8",
            "train.ema_decay=0.9", "train.log_every=1", "train.checkpoint_every=0"]


def command(start, data, out):
    return [sys.executable, "-m", "reasonedit", "train", "--config", str(DEMO), "--stage", "2",
            "--start", str(start), "--data", str(data), "--out", str(out), *overrides(out)]


def launch(cmd, log):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def uninterrupted(start, data, out):
    """The reference run, in this process (no interpreter start-up), on one thread as the subprocesses."""
    from reasonedit.config import load_config
    from reasonedit.training import train_stage

    _, cfg = load_config(DEMO, overrides(out))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_stage(cfg, 2, start, data, out)
    finally:
        torch.set_num_threads(threads)


def final(out):
    from safetensors.torch import load_file
    (last,) = sorted((out / "checkpoints").glob("step_*"))[-1:]
    trainer = torch.load(last / "trainer.pt", weights_only=False)
    gen = load_file(str(out / "model" / "generator" / "diffusion_pytorch_model.safetensors"))
    return trainer["history"], gen


def test_sigterm_saves_the_step_reached_exits_0_and_resumes_to_the_same_weights(
        start_model, small_dataset, tmp_path):  # noqa: F811

    whole, stopped = tmp_path / "whole" / "stage2", tmp_path / "stopped" / "stage2"
    uninterrupted(start_model, small_dataset, whole)

    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        proc = launch(command(start_model, small_dataset, stopped), log)
        try:
            deadline = time.monotonic() + 200
            while "stage2 step 2/" not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    m = re.search(r"stage2: SIGTERM: saved step (\d+) and stopped; run again to resume", text)
    assert m, text[-3000:]
    reached = int(m.group(1))
    assert 2 <= reached < STEPS and f"stopped by SIGTERM at step {reached}" in text
    saved = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert saved == [f"step_{reached:08d}"]  # complete (renamed into place) and nothing else
    assert {p.name for p in (stopped / "checkpoints" / saved[0]).iterdir()} >= {
        "model.pt", "optimizer.pt", "trainer.pt", "rank0.pt"}
    assert torch.load(stopped / "checkpoints" / saved[0] / "trainer.pt", weights_only=False)["step"] == reached
    assert not (stopped / "model").exists()

    with open(log_path, "a") as log:
        assert launch(command(start_model, small_dataset, stopped), log).wait(timeout=240) == 0
    assert f"resumed from {stopped / 'checkpoints' / saved[0]} at step {reached}" in log_path.read_text()
    hist_a, gen_a = final(whole)
    hist_b, gen_b = final(stopped)
    assert len(hist_a) == STEPS and hist_a == hist_b  # floats compared exactly
    assert gen_a.keys() == gen_b.keys() and all(torch.equal(gen_a[k], gen_b[k]) for k in gen_a)
