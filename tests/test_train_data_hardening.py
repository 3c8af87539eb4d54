"""Issue #14, training output and data handling: the output folder is checked (and its free space logged) before
the model loads; a failed write is one clear line, not a traceback; checkpoints hold plain data read with
weights_only=True; an interrupted save's hidden folders are tidied at start. Data: --out must lie apart from its
inputs; a NaN or an infinity is refused when a record is written."""

import errno
import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, run_cli_here
from tests.test_importers import noise, write_jsonl
from tests.test_stages import stage_cfg, start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


class ModelLoaded(Exception):
    """Raised in place of loading the start model: what the test checks happens before it."""


@pytest.fixture
def no_model(monkeypatch):
    from reasonedit.training import trainer

    def refuse(*_):
        raise ModelLoaded()
    monkeypatch.setattr(trainer, "load_stage_model", refuse)


def train_args(start, data, out, steps=1, extra=()):
    return ["train", "--config", DEMO, "--stage", "2", "--start", start, "--data", data, "--out", out,
            f"output_dir={out.parent}", f"stage2.steps={steps}", "stage2.warmup_steps=0", "batches.window=8",
            "train.ema_decay=0.9", *extra]


def one_error_line(res) -> str:
    """The CLI's error: exit 1, its last line and the only one that says error (loading bars may come before)."""
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
    assert res.returncode == 1 and errors == lines[-1:] and errors[0].startswith("reasonedit: error: "), res.stderr
    return errors[0]


# -- the output folder, before the first step ---------------------------------------------------------
def test_train_refuses_an_output_folder_it_cannot_write_before_loading_the_model(start_model, small_dataset,
                                                                                 tmp_path, no_model):
    out = tmp_path / "stage2"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")  # today found only at the first checkpoint
    line = one_error_line(run_cli_here(*train_args(start_model, small_dataset, out)))
    assert f"output folder {out / 'checkpoints'} is a file" in line

    (tmp_path / "file").write_text("")
    line = one_error_line(run_cli_here(*train_args(start_model, small_dataset, tmp_path / "file" / "stage2")))
    assert f"output folder {tmp_path / 'file' / 'stage2'} is not writable: Not a directory (ENOTDIR)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only folder anyway")
def test_train_refuses_a_read_only_output_folder_before_loading_the_model(start_model, small_dataset, tmp_path,
                                                                           no_model):
    out = tmp_path / "stage2"
    out.mkdir()
    out.chmod(0o500)
    try:
        line = one_error_line(run_cli_here(*train_args(start_model, small_dataset, out)))
    finally:
        out.chmod(0o700)
    assert f"output folder {out}" in line and "Permission denied (EACCES)" in line


@pytest.fixture
def train_log():
    """The trainer's log lines, from a handler on its own logger (caplog misses them after a test elsewhere in the
    suite changed the logger's level, propagation or disabled flag)."""
    records, logger = [], logging.getLogger("reasonedit.train")

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, level, disabled = Keep(level=logging.INFO), logger.level, logger.disabled
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False  # a library's logging.config call with disable_existing_loggers turns it off
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


def test_train_logs_the_output_folder_and_its_free_space_before_loading_the_model(start_model, small_dataset,
                                                                                  tmp_path, no_model, train_log):
    from reasonedit.training import train_stage

    out = tmp_path / "stage2"
    with pytest.raises(ModelLoaded):
        train_stage(stage_cfg(tmp_path, 2), 2, start_model, small_dataset, out)
    (line,) = [m for m in train_log if "free there" in m]
    assert line.startswith(f"stage2: output {out} is writable; ") and line.endswith("iB free there")
    assert list(out.iterdir()) == [out / "checkpoints"]  # the write check leaves nothing behind


def test_a_write_check_failing_on_another_rank_stops_this_rank_too_rather_than_waiting(tmp_path, monkeypatch):
    from reasonedit.publish import OutputError
    from reasonedit.training import output
    from reasonedit.training.distributed import World

    # what rank 0 hears from the all-gather when rank 1's disk is full: without it, rank 0 would go on to the
    # barrier that rank 1 never reaches and wait there for ever
    heard = []

    def gathered(value):
        heard.append(value)
        return [value, "output folder /node1/out is not writable: No space left on device (ENOSPC)"]
    monkeypatch.setattr(output, "gather_objects", gathered)
    with pytest.raises(OutputError, match=r"^rank 1 cannot use the output folder: output folder /node1/out is not "
                                          r"writable: No space left on device"):
        output.prepare_output(tmp_path / "out", tmp_path / "out" / "checkpoints", World(0, 2, 0), "stage2")
    assert heard == [None]  # this rank's own check passed


def test_train_removes_an_interrupted_saves_hidden_folders_at_start(start_model, small_dataset, tmp_path, no_model,
                                                                     train_log):
    from reasonedit.training import train_stage

    out = tmp_path / "stage2"
    checkpoints = out / "checkpoints"
    for hidden in (checkpoints / ".step_00000004.partial", checkpoints / ".step_00000002.deleting",
                   out / ".model.k3x9a1.partial", out / ".model_ema.old-4242", out / ".model.old-4242",
                   checkpoints / "step_00000003", out / "model_ema", out / ".mine"):
        hidden.mkdir(parents=True)
        (hidden / "model.pt").write_bytes(b"x")
    (out / ".history.json.ab12.tmp").write_text("[")
    with pytest.raises(ModelLoaded):
        train_stage(stage_cfg(tmp_path, 2), 2, start_model, small_dataset, out)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003"]
    # the older model swapped out when the kill came is put back; what is whole and what is not ours stays
    assert sorted(p.name for p in out.iterdir()) == [".mine", "checkpoints", "model", "model_ema"]
    assert (out / "model" / "model.pt").is_file()
    logged = "\n".join(train_log)
    assert f"stage2: removed {checkpoints / '.step_00000004.partial'}, left by an interrupted checkpoint save" in logged
    assert f"stage2: put back {out / 'model'} from .model.old-4242" in logged
    assert logged.count("left by an interrupted") == 6


# -- the loader's skips, in the summary ---------------------------------------------------------------
def test_the_training_summary_shows_the_records_skipped_by_dataset_and_reason(start_model, small_dataset, tmp_path,
                                                                              train_log):
    from tests.test_loader import rewrite

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    for shard in (data / "train").glob("edit_pair-*.tar"):  # every other edit pair has broken JSON
        rewrite(shard, lambda name, b: b"{broken" if name.endswith(".json") and int(name[-6]) % 2 else b)
    res = run_cli_here(*train_args(start_model, data, tmp_path / "stage2", steps=2))
    assert res.returncode == 0, res.stderr
    (line,) = [m for m in train_log if "rank 0 skipped" in m]
    skipped = {name: dict(re.findall(r"(\w+) (\d+)", why)) for name, why in
               re.findall(r"(\w+): \d+ yielded, skipped \d+ records? \(([^)]*)\)", line)}
    assert skipped.get("edit_pair", {}).get("bad_json"), line  # the stream read some, and counted them
    total = sum(int(n) for why in skipped.values() for n in why.values())
    assert line.startswith(f"stage2: rank 0 skipped {total} records: edit_pair: ")
    table = res.stdout[res.stdout.index("stage2: records read by the loader"):]
    for name, why in skipped.items():  # the printed summary: the same totals, per dataset and reason
        row = next(r for r in table.splitlines() if r.startswith(name + " "))
        assert row.split()[2] == str(sum(map(int, why.values()))) and all(f"{r} {n}" in row for r, n in why.items())
    assert re.search(rf"^total +\d+ +{total}$", table, re.M)


# -- output errors during training --------------------------------------------------------------------
class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails as the OS fails it."""

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_the_disk_at(monkeypatch, name):
    """torch.save of a file called `name` meets a full disk, as it would through the Python file it is given."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        return real_save(obj, FullDisk() if Path(getattr(f, "name", f)).name == name else f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


def test_a_checkpoint_write_to_a_full_disk_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    from reasonedit.training.checkpoint import write_state

    fill_the_disk_at(monkeypatch, "model.pt")
    with pytest.raises(OSError) as err:
        write_state({"w": torch.zeros(1 << 16)}, tmp_path / "model.pt")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "model.pt")


def test_a_full_disk_at_a_checkpoint_ends_in_one_line_naming_the_file(start_model, small_dataset, tmp_path,
                                                                      monkeypatch):
    fill_the_disk_at(monkeypatch, "model.pt")  # the first checkpoint's weights
    out = tmp_path / "stage2"
    line = one_error_line(run_cli_here(*train_args(start_model, small_dataset, out, steps=2,
                                                   extra=["train.checkpoint_every=1"])))
    staged = out / "checkpoints" / ".step_00000001.partial" / "model.pt"
    assert line == (f"reasonedit: error: stage2: checkpoint of step 1: cannot write {staged}: No space left on device "
                    "(ENOSPC); free space there, fix its permissions or pass another --out")
    assert list((out / "checkpoints").iterdir()) == []  # the staging folder is gone, nothing half-written


# -- checkpoints hold plain data ----------------------------------------------------------------------
def segments():
    from reasonedit.data.segments import GeneratorSegment, ReasonerSegment

    rng = np.random.default_rng(0)
    reasoner = ReasonerSegment("k1/think", "think", "Step 1: paint it.", torch.arange(6).view(1, 6),
                               torch.full((1, 6), -100), torch.zeros(1, 6, dtype=torch.long),
                               torch.randn(4, 8), torch.tensor([[1, 2, 2]]))
    generator = GeneratorSegment("k2/generate", "paint it", {"input_ids": torch.arange(5).view(1, 5)},
                                 rng.integers(0, 256, (4, 6, 3), dtype=np.uint8),
                                 [rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)], 2, 6, 1, dropped_text=True,
                                 target_latent=torch.randn(4, 2, 3), source_latents=[torch.randn(4, 1, 1)],
                                 meta={"score": 0.5, "tags": ["a"]})
    return reasoner, generator


def test_plain_state_round_trips_segments_batches_and_numpy_bit_for_bit_through_weights_only():
    from reasonedit.data.packing import PackedBatch
    from reasonedit.training.plain import from_plain, to_plain

    reasoner, generator = segments()
    random.seed(3)
    np.random.seed(3)
    state = {"ready": [PackedBatch([reasoner, generator], [(6, 0), (5, 9)], (16, 16), "full")],
             "pending": [generator], "rng": {"python": random.getstate(), "numpy": np.random.get_state()},
             "scalar": np.float32(0.1), "streams": {0: {"handed_out": 3}}}
    buf = io.BytesIO()
    torch.save(to_plain(state), buf)
    buf.seek(0)
    back = from_plain(torch.load(buf, weights_only=True))

    (batch,) = back["ready"]
    assert (batch.lengths, batch.budget, batch.reason) == ([(6, 0), (5, 9)], (16, 16), "full")
    r, g = batch.items
    for name in ("input_ids", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(r, name), getattr(reasoner, name))
    assert g.target_image.dtype == np.uint8 and np.array_equal(g.target_image, generator.target_image)
    assert np.array_equal(g.source_images[0], generator.source_images[0])
    assert torch.equal(g.target_latent, generator.target_latent) and g.meta == generator.meta
    assert (g.prefix_tokens, g.target_tokens, g.source_tokens, g.dropped_text) == (2, 6, 1, True)
    assert back["rng"]["python"] == state["rng"]["python"]
    name, keys, *rest = back["rng"]["numpy"]
    assert name == "MT19937" and keys.dtype == np.uint32 and np.array_equal(keys, state["rng"]["numpy"][1])
    assert tuple(rest) == state["rng"]["numpy"][2:]
    assert type(back["scalar"]) is np.float32 and back["scalar"] == np.float32(0.1)
    assert back["streams"] == {0: {"handed_out": 3}}


def test_plain_state_refuses_what_it_cannot_store_naming_where():
    from reasonedit.training.plain import to_plain

    with pytest.raises(TypeError, match=r"checkpoint state rank0\.pt\.stream\.ready\[1\]: a builtins\.object is "
                                        r"not plain data"):
        to_plain({"stream": {"ready": [1, object()]}}, "rank0.pt")


def test_checkpoints_are_read_with_weights_only_and_resume(start_model, small_dataset, tmp_path, monkeypatch):
    from reasonedit.training import train_stage

    cfg = stage_cfg(tmp_path, 2, steps=2, extra=["train.checkpoint_every=1"])
    out = tmp_path / "stage2"
    whole = train_stage(cfg, 2, start_model, small_dataset, out)
    first = out / "checkpoints" / "step_00000001"
    for f in ("model.pt", "optimizer.pt", "trainer.pt", "rank0.pt"):
        torch.load(first / f, weights_only=True)  # our own state only: loads without running code

    shutil.rmtree(out / "checkpoints" / "step_00000002")
    real_load, calls = torch.load, []

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = train_stage(cfg, 2, start_model, small_dataset, out)
    assert len(calls) >= 4 and all(w is True for w in calls), calls
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_a_checkpoint_holding_pickled_objects_is_refused_by_name(tmp_path):
    from reasonedit.training.checkpoint import CheckpointError, read_state

    path = tmp_path / "step_00000001" / "rank0.pt"
    path.parent.mkdir()
    torch.save({"stream": {"pending": [segments()[1]]}}, path)  # what checkpoints held before
    with pytest.raises(CheckpointError, match=f"{path}: holds objects other than tensors and plain data"):
        read_state(path)


# -- data: --out apart from the inputs ----------------------------------------------------------------
def caption_folder(folder: Path) -> Path:
    noise(folder / "x.png", 1)
    (folder / "x.txt").write_text("A red cup.")
    return folder


@pytest.mark.parametrize("case", ["is", "holds", "lies inside"])
def test_import_refuses_an_out_that_is_holds_or_lies_inside_an_input_before_deleting_anything(tmp_path, case):
    from reasonedit.data.importers import DataImportError, import_captions

    folder = caption_folder(tmp_path / "pics")
    inp, out = {"is": (folder, folder), "holds": (folder, tmp_path),
                "lies inside": (folder, folder / "shards")}[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataImportError, match=f"--out {out} {case} the input {inp}"):
        import_captions(inp, out, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_import_refuses_an_out_holding_an_image_a_row_names(tmp_path):
    from reasonedit.data.importers import DataImportError, import_jsonl

    out = tmp_path / "out"
    noise(out / "a.png", 1)
    noise(out / "b.png", 2)
    rows = write_jsonl(tmp_path / "rows" / "pairs.jsonl",
                       [{"source": str(out / "a.png"), "target": str(out / "b.png"), "instruction": "Paint it."}])
    with pytest.raises(DataImportError, match=f"--out {out} holds the image that {rows}:1 names in field 'source', "
                                              f"{out / 'a.png'}: replacing it"):
        import_jsonl(rows, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_data_import_overwrite_of_its_own_input_folder_is_one_error_line(tmp_path):
    noise(tmp_path / "in" / "a.png", 1)
    noise(tmp_path / "in" / "b.png", 2)
    rows = write_jsonl(tmp_path / "in" / "pairs.jsonl", [{"source": "a.png", "target": "b.png",
                                                          "instruction": "Paint it."}])
    res = run_cli_here("data", "import", "--format", "jsonl", "--out", tmp_path / "in", "--overwrite", rows)
    assert one_error_line(res) == (f"reasonedit: error: --out {tmp_path / 'in'} holds the input {rows}: replacing it "
                                   "(--overwrite) would delete it; write the dataset to another folder")
    assert rows.is_file() and (tmp_path / "in" / "a.png").is_file()


def test_data_synth_overwrite_refuses_an_out_holding_its_config(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    config = out / "exp.yaml"
    config.write_text("name: mine\ndata:\n  n: 1\n")
    res = run_cli_here("data", "synth", "--config", config, "--out", out, "--overwrite", "--n", "1")
    assert "--config" in one_error_line(res) and f"holds --config {config}" in res.stderr
    assert config.read_text() == "name: mine\ndata:\n  n: 1\n"


# -- data: no NaN or infinity in shards ----------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_number_is_refused_when_a_record_is_written_naming_key_and_field(tmp_path, bad):
    from reasonedit.data.samples import EditPair, SchemaError
    from reasonedit.data.shards import write_records

    image = np.zeros((4, 4, 3), dtype=np.uint8)
    good = EditPair("k0", image, "Paint it.", image, meta={"scores": [1.0, 2.0]})
    broken = EditPair("k1", image, "Paint it.", image, meta={"scores": [1.0, bad]})
    with pytest.raises(SchemaError, match=rf"record k1: field 'meta\.scores\[1\]' is -?(nan|inf): records are "
                                          "stored as JSON, which has no NaN or infinity"):
        write_records([good, broken], tmp_path, "edit_pair", shard_size=10)
    assert list(tmp_path.iterdir()) == []  # the shard being written is dropped


def test_an_import_row_with_nan_names_the_row_record_and_field_and_writes_nothing(tmp_path):
    from reasonedit.data.importers import DataImportError, import_jsonl

    noise(tmp_path / "in" / "a.png", 1)
    noise(tmp_path / "in" / "b.png", 2)
    rows = tmp_path / "in" / "pairs.jsonl"
    rows.write_text(json.dumps({"source": "a.png", "target": "b.png", "instruction": "Paint it.",
                                "quality": float("nan")}) + "\n")  # Python's json writes (and reads) NaN
    with pytest.raises(DataImportError, match=rf"{rows}:1: record pairs-0000000: field 'meta\.extra\.quality' is nan"):
        import_jsonl(rows, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
