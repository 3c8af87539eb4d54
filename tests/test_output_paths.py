"""No output of `reasonedit data synth`, `data import` or `train` lands outside its output folder, whatever the
input says. Hostile keys, file and folder names, split names and config values are refused where they enter
(exit 1, one line naming the key and where it came from) or made into plain names; a symlink planted in the output
folder is refused before anything is written (or, where the whole folder is replaced, never written through); and
no shard we write holds a tar member such as `../../x.json`. Each test checks that a sentinel folder beside the
output is unchanged and that nothing appeared beside it. (Eval's counterpart: tests/test_eval_hardening.py.)"""

import hashlib
import itertools
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from reasonedit.data.samples import SchemaError, TextToImage, key_problem
from reasonedit.data.shards import read_records, write_records
from reasonedit.paths import inside, name_problem, relative_name_problem
from tests.conftest import ROOT, run_cli_here
from tests.test_importers import critique, noise, write_jsonl
from tests.test_stages import start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
HOSTILE = ["../../x", "/abs/x", "..", ".hidden", "a/b", "a\\b", "a\x00b", "a\nb", "a\x1bb", "x" * 300]
# what a file or folder name may hold (the OS allows any byte but '/' and NUL): each must become a plain key
HOSTILE_FILE_NAMES = [".hidden", "..x", "a\\b", "a\nb", "a\x1bb", "-"]


def listing(root: Path) -> dict[str, str]:
    """Everything under `root`, links not followed: relative path -> its link target, 'dir' or its bytes' hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                                               else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


SENTINEL = {"keep.txt": hashlib.sha256(b"keep").hexdigest(), "sub": "dir"}


@pytest.fixture
def outside(tmp_path):
    """A sentinel folder beside the output, holding SENTINEL: `unchanged(outside)` while nothing in it changed."""
    folder = tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    (folder / "keep.txt").write_text("keep")
    return folder


def unchanged(folder: Path) -> bool:
    return listing(folder) == SENTINEL


def one_error_line(res) -> str:
    """The CLI's error: exit 1, and one line (its last) that says error."""
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
    assert res.returncode == 1 and errors == lines[-1:] and errors[0].startswith("reasonedit: error: "), res.stderr
    return errors[0]


def tar_members(folder: Path) -> list[str]:
    names = []
    for shard in sorted(folder.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def assert_plain_members(folder: Path) -> None:
    members = tar_members(folder)
    assert members and all(name_problem(m) is None for m in members), [m for m in members if name_problem(m)]


# -- the checks themselves ------------------------------------------------------------------------------
def test_eval_paths_is_the_shared_module():
    from reasonedit.eval import paths as eval_paths
    import reasonedit.paths as shared

    assert eval_paths.inside is shared.inside and eval_paths.safe_name is shared.safe_name


@pytest.mark.parametrize("name", HOSTILE + ["a//b", "a/../b", "a/", "/"])
def test_a_hostile_name_is_no_plain_name_and_no_relative_one_but_a_b(name):
    assert name_problem(name) is not None
    assert (relative_name_problem(name) is None) == (name == "a/b")  # sweep/run: a relative name of plain parts


@pytest.mark.parametrize("key", HOSTILE + ["a.b"])
def test_a_shard_never_gets_a_member_named_by_a_hostile_key(tmp_path, key):
    with pytest.raises(SchemaError, match=r"record key .* cannot name its shard members"):
        write_records([TextToImage(key, "c", np.zeros((4, 4, 3), np.uint8))], tmp_path, "t")
    assert list(tmp_path.iterdir()) == []  # not even the shard's temporary file


# -- data synth -----------------------------------------------------------------------------------------
SYNTH = ("--n", "1", "--splits", "train", "--kinds", "text_to_image")


@pytest.mark.parametrize("args,key", [(["--splits", "../../x"], "data.splits"), (["--kinds", "/abs/x"], "data.kinds"),
                                      (["data.splits=[..]"], "data.splits"), (["data.kinds=[a/b]"], "data.kinds")])
def test_synth_refuses_a_split_or_kind_that_is_not_ours(tmp_path, outside, args, key):
    before = sorted(os.listdir(tmp_path))
    line = one_error_line(run_cli_here("data", "synth", "--out", tmp_path / "ds", "--n", "1", *args))
    assert f"command-line override `{key}=" in line and "is not allowed" in line
    assert sorted(os.listdir(tmp_path)) == before and unchanged(outside)


@pytest.mark.parametrize("command", ["synth", "import"])
def test_replacing_an_out_never_writes_through_a_symlink_planted_in_it(tmp_path, outside, command):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "train").symlink_to(outside)
    (out / "manifest.json").symlink_to(outside / "keep.txt")
    args = SYNTH if command == "synth" else ("--format", "captions", caption_folder(tmp_path / "in" / "pics"))
    res = run_cli_here("data", command, "--out", out, "--overwrite", *args)
    assert res.returncode == 0, res.stderr
    assert not (out / "train").is_symlink() and not (out / "manifest.json").is_symlink()
    assert_plain_members(out)
    assert unchanged(outside) and sorted(os.listdir(tmp_path)) == ["ds", *(["in"] if command == "import" else []),
                                                                  "outside"]


@pytest.mark.parametrize("command", ["synth", "import"])
def test_an_out_that_is_a_symlink_is_refused_before_anything_is_written(tmp_path, outside, command):
    out = tmp_path / "ds"
    out.symlink_to(outside)
    args = SYNTH if command == "synth" else ("--format", "captions", caption_folder(tmp_path / "in" / "pics"))
    line = one_error_line(run_cli_here("data", command, "--out", out, "--overwrite", *args))
    assert f"--out {out} is a symbolic link (to {outside})" in line and "nothing was written" in line
    assert unchanged(outside) and out.is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left beside it


# -- data import ----------------------------------------------------------------------------------------
def caption_folder(folder: Path, names=("x",)) -> Path:
    for name in names:
        noise(folder / f"{name}.png", len(name))
        (folder / f"{name}.txt").write_text(f"A picture named {name!r}.")
    return folder


ROWS = {"jsonl": {"source": "img/a.png", "target": "img/b.png", "instruction": "Paint it."},
        "sharegpt": critique("Add a hat", "Add a red hat", "It is fine.", 9, 9, "Add a red hat"),
        "editthinker-rl": {"origin_prompt": "Add a hat", "rewritten_prompt": "Add a red hat",
                           "origin_image_path": "img/a.png", "edited_image_path": "img/b.png",
                           "evaluation": {"semantics": 9, "quality": 8}},
        "captions": {"image": "img/a.png", "caption": "A cup."}}


def hostile_inputs(tmp_path: Path, fmt: str) -> list[Path]:
    """One input per hostile file name in format `fmt` (two rows each, over two images in tmp/in/img); for captions
    a folder per hostile name, holding pairs in a hostile sub-folder, with hostile names, and a hidden one."""
    noise(tmp_path / "in" / "img" / "a.png", 1)
    noise(tmp_path / "in" / "img" / "b.png", 2)
    if fmt == "captions":  # the folder's name and the pairs' paths in it make the keys
        inputs = [tmp_path / "in" / name for name in HOSTILE_FILE_NAMES]
        for folder in inputs:
            caption_folder(folder / "a\\b", ["x", "y\nz"])
            caption_folder(folder / ".c", ["w"])  # hidden: skipped
        return inputs
    suffix = ".json" if fmt == "sharegpt" else ".jsonl"
    return [write_jsonl(tmp_path / "in" / f"{name}{suffix}", [ROWS[fmt]] * 2) for name in HOSTILE_FILE_NAMES]


@pytest.mark.parametrize("fmt", ["jsonl", "sharegpt", "editthinker-rl", "captions"])
def test_import_makes_plain_keys_of_hostile_file_and_folder_names(tmp_path, outside, fmt):
    inputs = hostile_inputs(tmp_path, fmt)
    res = run_cli_here("data", "import", "--format", fmt, "--out", tmp_path / "ds", *inputs)
    assert res.returncode == 0, res.stderr
    keys = [r.key for r in read_records(tmp_path / "ds")]
    assert len(keys) == len(set(keys)) == len(inputs) * 2 and all(key_problem(k) is None for k in keys), keys
    assert_plain_members(tmp_path / "ds")
    assert unchanged(outside) and sorted(os.listdir(tmp_path)) == ["ds", "in", "outside"]


@pytest.mark.parametrize("fmt", ["jsonl", "sharegpt", "editthinker-rl", "captions"])
def test_import_refuses_a_hostile_split_naming_the_file_line_and_field(tmp_path, outside, fmt):
    noise(tmp_path / "in" / "img" / "a.png", 1)
    noise(tmp_path / "in" / "img" / "b.png", 2)
    src = write_jsonl(tmp_path / "in" / ("captions.jsonl" if fmt == "captions" else "rows.jsonl"),
                      [ROWS[fmt], {**ROWS[fmt], "split": "../../x"}])
    line = one_error_line(run_cli_here("data", "import", "--format", fmt, "--out", tmp_path / "ds", src))
    assert line == f"reasonedit: error: {src}:2: field 'split': '../../x' is not a split; use one of train, val, test"
    assert unchanged(outside) and sorted(os.listdir(tmp_path)) == ["in", "outside"]


@pytest.mark.parametrize("fmt", ["jsonl", "captions"])
def test_import_refuses_a_key_too_long_for_a_file_name_naming_the_file(tmp_path, outside, fmt):
    if fmt == "jsonl":
        noise(tmp_path / "in" / "a.png", 1)
        src = write_jsonl(tmp_path / "in" / ("e" * 240 + ".jsonl"),
                          [{"source": "a.png", "target": "a.png", "instruction": "Keep it."}])
        where, key, made = f"{src}:1", "e" * 240 + "-0000000", "the input file's name and the row's number"
    else:
        src = caption_folder(tmp_path / "in" / "pics" / ("d" * 120), ["f" * 120]).parent
        where, key, made = (f"{src / ('d' * 120) / ('f' * 120)}.txt:1", f"pics-{'d' * 120}_{'f' * 120}",
                            "the folder's name and the image's path in it")
    line = one_error_line(run_cli_here("data", "import", "--format", fmt, "--out", tmp_path / "ds", src))
    assert line == (f"reasonedit: error: {where}: its record key {key!r} (made from {made}) cannot name shard "
                    "members: it is longer than 200 bytes; shorten those names")
    assert unchanged(outside) and sorted(os.listdir(tmp_path)) == ["in", "outside"]


# -- train ----------------------------------------------------------------------------------------------
from tests.test_train_data_hardening import ModelLoaded, no_model  # noqa: E402,F401  (the fixture)


@pytest.fixture
def fake_inputs(tmp_path):
    """(start, data): folders that pass the CLI's checks (a reasonedit.json, a manifest.json), nothing more."""
    start, data = tmp_path / "in" / "start", tmp_path / "in" / "data"
    start.mkdir(parents=True)
    data.mkdir()
    (start / "reasonedit.json").write_text("{}")
    (data / "manifest.json").write_text('{"shards": {}}')
    return start, data


def train_args(start, data, out, *extra):
    return ["train", "--config", DEMO, "--stage", "2", "--start", start, "--data", data, "--out", out,
            f"output_dir={out.parent}", "stage2.steps=1", "stage2.warmup_steps=0", "batches.window=8", *extra]


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "..", ".hidden", "a\\b", "a//b", "a/../b", "x" * 300])
def test_train_refuses_an_experiment_name_that_is_not_a_plain_relative_name(tmp_path, outside, fake_inputs, name):
    before = sorted(os.listdir(tmp_path))
    start, data = fake_inputs
    res = run_cli_here("train", "--config", DEMO, "--stage", "2", "--start", start, "--data", data, f"name={name}",
                       cwd=tmp_path)  # output_dir is runs/${name}, from here
    assert f"override `name={name}`: name: {name!r} cannot name the run's folder: " in one_error_line(res)
    assert sorted(os.listdir(tmp_path)) == before and unchanged(outside)


@pytest.mark.parametrize("name,problem", [("a\x00b", "unacceptable character #x0000"),
                                          ("a\x1bb", "unacceptable character #x001b")])
def test_train_refuses_a_control_character_in_an_override_in_one_line(tmp_path, fake_inputs, name, problem):
    res = run_cli_here("train", "--config", DEMO, "--stage", "2", "--start", fake_inputs[0], "--data", fake_inputs[1],
                       f"name={name}", cwd=tmp_path)
    assert f"override {'name=' + name!r}: {problem}" in one_error_line(res)


@pytest.mark.parametrize("text,shown", [('"a\\x1bb"', "'a\\x1bb'"), ('"a\\0b"', "'a\\x00b'"), ("a\\b", "'a\\\\b'")])
def test_train_refuses_an_experiment_name_from_a_yaml_file_naming_the_file(tmp_path, fake_inputs, text, shown):
    config = tmp_path / "in" / "exp.yaml"
    config.write_text(f"name: {text}\n")
    res = run_cli_here("train", "--config", config, "--stage", "2", "--start", fake_inputs[0], "--data",
                       fake_inputs[1], cwd=tmp_path)
    assert f"reasonedit: error: {config}: name: {shown} cannot name the run's folder" in one_error_line(res)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("planted,target", [("checkpoints", "sub"), ("model", "sub"), ("condition_cache", "sub"),
                                            ("tensorboard", "sub"), ("stage.json", "keep.txt"),
                                            ("history.json", "new.json")])  # the last one dangling
def test_train_refuses_a_symlink_out_of_its_stage_folder_before_loading_the_model(tmp_path, outside, fake_inputs,
                                                                                  no_model, planted, target):
    out = tmp_path / "work" / "stage2"
    out.mkdir(parents=True)
    (out / planted).symlink_to(outside / target)
    line = one_error_line(run_cli_here(*train_args(*fake_inputs, out)))
    assert line == (f"reasonedit: error: {out / planted} resolves to {outside / target}, outside the output folder "
                    f"{out} ('..' or a symlink on the way); nothing was written there: remove that link or use "
                    "another --out")
    assert unchanged(outside) and sorted(os.listdir(out)) == [planted]  # not even the write check's probe


def test_train_refuses_a_latent_cache_symlink_out_of_the_experiment_folder(tmp_path, outside, fake_inputs, no_model):
    out = tmp_path / "work" / "stage2"
    out.parent.mkdir()
    (out.parent / "latent_cache").symlink_to(outside / "sub")
    line = one_error_line(run_cli_here(*train_args(*fake_inputs, out, "stage2.latent_cache=true")))
    assert (f"{out.parent / 'latent_cache'} resolves to {outside / 'sub'}, outside the output folder {out.parent} "
            in line)
    assert unchanged(outside) and not out.exists()


def test_a_link_left_under_a_writers_hidden_name_is_removed_not_put_back(tmp_path, outside, fake_inputs, no_model):
    out = tmp_path / "work" / "stage2"
    (out / "checkpoints").mkdir(parents=True)
    (out / ".condition_cache.old-4242").symlink_to(outside / "sub")  # "put back", it would send the cache outside
    (out / "checkpoints" / ".step_00000002.partial").symlink_to(outside / "sub")
    with pytest.raises(ModelLoaded):
        run_cli_here(*train_args(*fake_inputs, out))
    assert sorted(os.listdir(out)) == ["checkpoints"] and os.listdir(out / "checkpoints") == []
    assert unchanged(outside)


def hostile_dataset(source: Path, folder: Path, keys: list[str]) -> Path:
    """The train split's edit pairs and text-to-image records of `source`, the first ones re-keyed with `keys`,
    written as raw tars (our writer refuses such keys) with a manifest."""
    import webdataset as wds

    shards = {}
    for kind in ("edit_pair", "text_to_image"):
        path = folder / "train" / f"{kind}-00000.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        records = list(itertools.islice(read_records(source, "train", kind), 12))
        with open(path, "wb") as f:
            writer = wds.TarWriter(f, encoder=False)
            for key, r in itertools.zip_longest(keys, records):
                if r is not None:
                    writer.write({**r.to_wds(), **({"__key__": key} if key is not None else {})})
            writer.close()
        shards[kind] = [{"path": path.name, "count": len(records),
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": {"train": shards}}))
    return folder


def test_train_on_hostile_record_keys_writes_only_inside_its_folders(start_model, small_dataset, tmp_path,
                                                                     outside):
    data = hostile_dataset(small_dataset, tmp_path / "in" / "data", HOSTILE)
    assert "../../x.json" in tar_members(data)
    out = tmp_path / "work" / "stage2"
    start_before, data_before = listing(start_model), listing(data)
    res = run_cli_here(*train_args(start_model, data, out, "stage2.condition_cache=true", "stage2.latent_cache=true"))
    assert res.returncode == 0, res.stderr
    assert (out / "model").is_dir() and (out / "condition_cache").is_dir() and (out.parent / "latent_cache").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["in", "outside", "work"] and sorted(os.listdir(out.parent)) == [
        "latent_cache", "stage2"]
    assert unchanged(outside) and listing(start_model) == start_before and listing(data) == data_before
    for p in (out.parent).rglob("*"):
        inside(out.parent, p)  # no link out of the folders was made on the way
