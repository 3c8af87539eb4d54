"""Watching a run: `reasonedit train` prints a progress line per step (loss per term, lr, gradient norm,
tokens/s, packing utilisation, ETA), and with train.wandb / train.tensorboard writes the same scalars to a
wandb offline run (WANDB_* variables respected) and to a tensorboard events file, read back here with
wandb's own protobuf schema and tensorboard's EventAccumulator."""

import os
import re
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_stages import start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
STEPS = 3
KEYS = {"loss/fm", "loss/ntp", "loss/total", "lr", "grad_norm", "tokens_per_s", "packing", "skipped"}


@pytest.fixture(scope="module")
def run(start_model, small_dataset, tmp_path_factory):  # noqa: F811
    """Stage 3 (two loss terms) for a few steps with wandb (offline, no key) and tensorboard on."""
    root = tmp_path_factory.mktemp("logged")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_PROJECT="re-tests", WANDB_NAME="logged-run",
               WANDB_DIR=str(root / "wandb_here"), WANDB_SILENT="true")
    (root / "wandb_here").mkdir()
    cmd = [sys.executable, "-m", "reasonedit", "train", "--config", str(DEMO), "--stage", "3",
           "--start", str(start_model), "--data", str(small_dataset), "--out", str(root / "stage3"),
           f"output_dir={root}", f"stage3.steps={STEPS}", "stage3.warmup_steps=0", "batches.window=8",
           "train.log_every=1", "train.wandb=true", "train.tensorboard=true"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return root, res


def wandb_records(path):
    """Every record of a .wandb file: a LevelDB-style log (32 KiB blocks; records of crc32, length,
    type FULL/FIRST/MIDDLE/LAST) after a 7-byte header, each payload a wandb protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


@pytest.fixture(scope="module")
def wandb_run(run):
    root, _ = run
    runs = list((root / "wandb_here" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # WANDB_DIR respected, and WANDB_MODE=offline
    (file,) = runs[0].glob("run-*.wandb")
    records = wandb_records(file)
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            history[int(items["_step"])] = items
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    return meta, history


def test_console_line_shows_each_term_lr_grad_tokens_per_s_packing_and_eta(run):
    _, res = run
    lines = [ln for ln in res.stderr.splitlines() if re.search(r"stage3 step \d+/", ln)]
    assert len(lines) == STEPS
    pattern = (r"stage3 step (\d+)/3 \| fm (\d+\.\d{4}) ntp (\d+\.\d{4}) loss (\d+\.\d{4}) \| lr \d\.\d\de-\d\d \| "
               r"grad [\d.e+-]+ \| [\d,]+ tok/s \| packing (0\.\d{3}|1\.000) \| eta \d+:\d\d:\d\d$")
    for i, line in enumerate(lines, 1):
        m = re.search(pattern, line)
        assert m, line
        fm, ntp, total = (float(m.group(k)) for k in (2, 3, 4))
        assert int(m.group(1)) == i and total == pytest.approx(fm + 0.1 * ntp, abs=2e-4)  # L_FM + w L_NTP


def test_wandb_offline_history_holds_per_term_losses_lr_and_tokens_per_s(wandb_run):
    _, history = wandb_run
    assert sorted(history) == list(range(1, STEPS + 1))
    for items in history.values():
        assert KEYS <= set(items), sorted(items)
        assert float(items["tokens_per_s"]) > 0 and float(items["lr"]) > 0


def test_wandb_takes_project_and_name_from_the_environment(wandb_run):
    meta, _ = wandb_run
    assert meta.project == "re-tests" and meta.display_name == "logged-run"


def test_tensorboard_events_hold_the_same_scalars(run, wandb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = run
    _, history = wandb_run
    acc = EventAccumulator(str(root / "stage3" / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == KEYS
    for key in KEYS:
        events = acc.Scalars(key)
        assert [e.step for e in events] == list(range(1, STEPS + 1))
        for e in events:  # the same numbers as wandb's (tensorboard stores float32)
            assert e.value == pytest.approx(float(history[e.step][key]), rel=1e-6, abs=1e-6)
