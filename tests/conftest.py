import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow tier (tests marked slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier, skipped by `make test`; `make test-slow` runs it")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def world():
    from reasonedit.shapes.world import ShapesWorld
    return ShapesWorld()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, world):
    """40 records of each kind in each split, written once for the whole session."""
    from reasonedit.shapes.synth import SynthConfig, synthesize
    out = tmp_path_factory.mktemp("data") / "shapes"
    synthesize(out, SynthConfig(n=40, seed=7, shard_size=15), world)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(small_dataset, tmp_path_factory):
    """The demo's tiny model (random weights, tokenizer from small_dataset's train texts), saved once."""
    from reasonedit.config import load_config
    from reasonedit.data.corpus import dataset_texts
    from reasonedit.models.model import ReasonEditModel

    _, cfg = load_config(ROOT / "configs" / "experiment" / "shapes_tiny.yaml")
    model = ReasonEditModel.tiny(cfg.model, dataset_texts(small_dataset, split="train"), seed=0)
    return model.save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def run_cli(*args, cwd=ROOT):
    """Run `python -m reasonedit ARGS` as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, "-m", "reasonedit", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def make_diffusers_folder(path, texts, *, pipeline: str = "QwenImageEditPipeline", scheduler: dict | None = None,
                          seed: int = 3, zero_cond_t: bool = False, vae_base_dim: int = 8):
    """A tiny Qwen-Image-Edit folder written by diffusers' own pipeline `save_pretrained` (its VAE class, its
    scheduler, a Qwen2.5-VL text encoder and tokenizer); returns (path, transformer, text_encoder)."""
    import diffusers
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from reasonedit.models.tiny import init_tiny_reasoner
    from reasonedit.models.vae import QwenImageVAE
    text_encoder, tokenizer = init_tiny_reasoner(texts, seed=seed)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                              axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t)
    pipe = getattr(diffusers, pipeline)(scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler or {})),
                                        vae=QwenImageVAE.tiny(z_dim=4, base_dim=vae_base_dim).vae, text_encoder=text_encoder,
                                        tokenizer=tokenizer, processor=None, transformer=transformer)
    pipe.save_pretrained(path)
    return path, transformer.eval(), text_encoder


def run_cli_here(*args, cwd=ROOT):
    """`reasonedit ARGS` in this process (no interpreter start, no torch import: ~3 s less than `run_cli`), for
    checks of argument parsing and input errors; a CompletedProcess like `run_cli`'s."""
    import contextlib
    import io
    import os
    import subprocess

    from reasonedit.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help and usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def kill_when_seen(args, calls, count, timeout=60.0):
    """Start `args` (a command) from the repo root, SIGKILL it once `calls` (a list a server appends to) holds
    `count` entries or the timeout passes; returns the killed process (its stderr still readable)."""
    import os
    import signal
    import subprocess
    import time
    child = subprocess.Popen([str(a) for a in args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + timeout
    while len(calls) < count and time.time() < deadline and child.poll() is None:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return child


def start_serve(*args, what="reasonedit serve"):
    """Start `reasonedit serve ARGS --port P` as a user would; (process, URL) once /health answers 200."""
    import socket
    import subprocess
    import time

    import httpx
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "reasonedit", "serve", *map(str, args), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"{what} did not come up"
                time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@contextlib.contextmanager
def serving(*args, what="reasonedit serve"):
    """`start_serve` as a context: yields the URL; terminates the server on exit."""
    proc, url = start_serve(*args, what=what)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
