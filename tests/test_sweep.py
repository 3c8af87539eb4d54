import json
import os
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from reasonedit.config import ConfigError
from reasonedit.sweep import emit_launch_lines, emit_sweep, expand_sweep, load_sweep, main, run_sweep

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
GRID = ROOT / "configs" / "sweep" / "shapes_grid.yaml"
PAPER = ROOT / "configs" / "sweep" / "paper_stage2_lr.yaml"
GRID_NAMES = ["grid4-seed0", "grid4-seed1", "grid7-seed0", "grid7-seed1"]


def write_sweep(tmp_path, name="s", **doc):
    doc = {"experiment": str(DEMO), "name": name, "output_dir": str(tmp_path / "out"), **doc}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def same_file(written, expected):
    return (Path.cwd() / written).resolve() == expected.resolve()  # emitted paths are relative to the cwd


def commands(script):
    return [shlex.split(line) for line in script.read_text().splitlines()
            if line.strip() and not line.startswith(("#", "ROOT=", "cd "))]


# ---------------------------------------------------------------- expansion and names

def test_grid_names_are_unique_stable_and_come_from_the_varying_keys():
    first, again = expand_sweep(GRID), expand_sweep(GRID)
    assert [r.name for r in first] == [r.name for r in again] == GRID_NAMES
    run = first[1]
    assert run.overrides[-4:] == ["world.grid=4", "data.seed=1", "name=shapes_grid/grid4-seed1",
                                  "output_dir=runs/sweeps/shapes_grid/grid4-seed1"]
    assert run.tree.world.grid == 4 and run.tree.data.seed == 1 and run.tree.data.n == 8
    assert run.tree.output_dir == "runs/sweeps/shapes_grid/grid4-seed1"


def test_name_rule_for_strings_floats_lists_and_shared_leaves(tmp_path):
    path = write_sweep(tmp_path, grid={"model": ["tiny"], "data.seed": [0, 1], "seed": [2],
                                       "steps": [["data"], ["data", "models"]]})
    # a single-valued key does not vary, so it is not in the name; two `seed` leaves use their full keys
    assert [r.name for r in expand_sweep(path)] == [
        "data_seed0-steps_data", "data_seed0-steps_data_models", "data_seed1-steps_data", "data_seed1-steps_data_models"]
    path = write_sweep(tmp_path, grid={"batches.text_dropout": ["1e-1", 0.25], "preview.split": ["train", "val"]})
    runs = expand_sweep(path)
    assert [r.name for r in runs] == ["text_dropout1e-1-split_train", "text_dropout1e-1-split_val",
                                      "text_dropout0.25-split_train", "text_dropout0.25-split_val"]
    assert runs[0].tree.batches.text_dropout == pytest.approx(0.1)


def test_grid_and_runs_concatenate_in_order(tmp_path):
    path = write_sweep(tmp_path, overrides=["data.n=5"], grid={"world.grid": [4, 7]},
                       runs=[{"name": "big", "overrides": ["data.n=40"]}, {"overrides": ["data.seed=3"]}])
    runs = expand_sweep(path, ["data.shard_size=2"])
    assert [r.name for r in runs] == ["grid4", "grid7", "big", "seed3"]
    assert runs[2].overrides == ["data.n=5", "data.n=40", "data.shard_size=2", "name=s/big",
                                 f"output_dir={tmp_path / 'out' / 'big'}"]
    assert [r.tree.data.n for r in runs] == [5, 5, 40, 5] and runs[3].tree.data.seed == 3
    assert [r.tree.world.grid for r in runs] == [4, 7, 4, 4]
    assert all(r.tree.data.shard_size == 2 for r in runs)
    assert len({r.output_dir for r in runs}) == 4


def test_duplicate_run_names_are_refused(tmp_path):
    path = write_sweep(tmp_path, grid={"data.seed": [0, 1]}, runs=[{"name": "seed1", "overrides": ["data.n=3"]}])
    with pytest.raises(ConfigError, match="two runs are named 'seed1'"):
        expand_sweep(path)


@pytest.mark.parametrize("doc,message", [
    ({"grid": {"world.grid": [4, 1]}}, "run 'grid1': command-line override `world.grid=1`: world.grid: must be at least 2"),
    ({"runs": [{"name": "ok", "overrides": []}, {"name": "typo", "overrides": ["world.gird=3"]}]},
     "run 'typo': command-line override `world.gird=3`: unknown key 'world.gird'"),
    ({"overrides": ["output_dir=/elsewhere"]}, "sets each run's name and output_dir"),
    ({"grdi": {"data.seed": [0]}}, "unknown sweep key 'grdi' (did you mean 'grid'?)"),
])
def test_a_bad_run_stops_the_sweep_before_anything_runs(tmp_path, doc, message):
    path = write_sweep(tmp_path, **doc)
    assert main([str(path)]) == 1
    with pytest.raises(ConfigError) as e:
        run_sweep(path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_example_sweeps_validate():
    assert len(expand_sweep(GRID)) == 4
    paper = expand_sweep(PAPER)
    assert len(paper) == 4 and all(r.tree.model.name == "qwen-image-edit" for r in paper)
    assert paper[0].tree.model.path == "/models/Qwen-Image-Edit"


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert main([str(GRID), "--dry-run", "--output-dir", str(tmp_path / "out")]) == 0
    assert "grid7-seed1" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- running here

# the example grid's own settings on two of its four runs (each run is a process: ~9 s here); the example
# itself is expanded and validated above
RUN_NAMES = ["grid4-seed1", "grid7-seed0"]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "shapes_grid"
    sweep = replace(load_sweep(GRID), output_dir=out)
    runs = [r for r in expand_sweep(sweep) if r.name in RUN_NAMES]
    assert [r.name for r in runs] == RUN_NAMES
    assert run_sweep(sweep, runs=runs).ok
    return out


def test_each_run_produces_its_directory_with_its_own_config_and_log(grid_run):
    assert sorted(p.name for p in grid_run.iterdir() if p.is_dir()) == RUN_NAMES
    for name in RUN_NAMES:
        cfg = yaml.safe_load((grid_run / name / "config.yaml").read_text())
        assert cfg["output_dir"] == str(grid_run / name) and cfg["name"] == f"shapes_grid/{name}"
        assert f"grid{cfg['world']['grid']}-seed{cfg['data']['seed']}" == name
        assert (grid_run / name / "data" / "manifest.json").is_file()
        assert (grid_run / name / "model" / "reasonedit.json").is_file()
        log = (grid_run / name / "run.log").read_text()
        assert log.startswith("$ ") and "packed stream" in log
    manifest = json.loads((grid_run / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == RUN_NAMES
    assert all(r["status"] == "done" and r["returncode"] == 0 and r["attempts"] == 1 for r in manifest["runs"])


def test_reinvocation_skips_done_runs_and_reruns_the_rest(grid_run):
    sweep = replace(load_sweep(GRID), output_dir=grid_run)
    runs = [r for r in expand_sweep(sweep) if r.name in RUN_NAMES]
    again = run_sweep(sweep, runs=runs)
    assert again.ran == [] and again.skipped == RUN_NAMES and again.ok

    manifest_path = grid_run / "sweep.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["runs"][1]["status"] = "failed"
    manifest_path.write_text(json.dumps(manifest))
    logs = {n: (grid_run / n / "run.log").stat().st_mtime_ns for n in RUN_NAMES}
    assert run_sweep(sweep, runs=runs).ran == RUN_NAMES[1:]
    assert (grid_run / RUN_NAMES[0] / "run.log").stat().st_mtime_ns == logs[RUN_NAMES[0]]
    runs = json.loads(manifest_path.read_text())["runs"]
    assert [r["attempts"] for r in runs] == [1, 2] and all(r["status"] == "done" for r in runs)


def test_a_failing_run_is_recorded_and_the_rest_continue_unless_fail_fast(tmp_path):
    path = write_sweep(tmp_path, overrides=["data.n=2", "data.splits=[train]"],
                       runs=[{"name": "broken", "overrides": ["steps=[batches]"]},  # no model: exits 1
                             {"name": "ok", "overrides": ["steps=[data]"]}])
    result = run_sweep(path, fail_fast=True)
    assert [r["status"] for r in result.records] == ["failed", "pending"] and not result.ok
    assert "holds no model" in (tmp_path / "out" / "broken" / "run.log").read_text()
    assert main([str(path)]) == 1  # broken fails again, ok runs
    runs = {r["name"]: r for r in json.loads((tmp_path / "out" / "sweep.json").read_text())["runs"]}
    assert runs["broken"]["status"] == "failed" and runs["broken"]["returncode"] == 1
    assert runs["ok"]["status"] == "done" and (tmp_path / "out" / "ok" / "data" / "manifest.json").is_file()


# ---------------------------------------------------------------- cluster launch lines

def test_emit_writes_one_torchrun_line_per_run(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"world.grid": [4, 7], "data.seed": [0, 1]}, launcher="torchrun",
                       nnodes=2, nproc_per_node=8, stage=2)
    assert main([str(path), "--emit"]) == 0
    lines = commands(tmp_path / "out" / "launch.sh")
    assert len(lines) == 4 and capsys.readouterr().out.count("torchrun ") == 4
    for name, words in zip(GRID_NAMES, lines):
        i = words.index("-m")
        flags = words[1:i]
        assert words[0] == "torchrun" and flags[:4] == ["--nnodes", "2", "--nproc_per_node", "8"]
        assert "--node_rank" in flags and "--master_addr" in flags and "--master_port" in flags
        assert words[i + 1:i + 7] == ["reasonedit", "train", "--config", words[i + 4], "--stage", "2"]
        assert same_file(words[i + 4], DEMO)
        assert words[-1] == f"output_dir={tmp_path / 'out' / name}"
        assert (tmp_path / "out" / name / "config.yaml").is_file()
    statuses = [r["status"] for r in json.loads((tmp_path / "out" / "sweep.json").read_text())["runs"]]
    assert statuses == ["pending"] * 4


def test_emit_writes_one_deepspeed_line_per_run(tmp_path):
    path = write_sweep(tmp_path, grid={"data.seed": [0, 1, 2]}, launcher="deepspeed", nnodes=4, nproc_per_node=8,
                       stage=3, deepspeed_config="launch/deepspeed/zero3.json")
    script, printed = emit_sweep(path)
    lines = commands(script)
    assert len(lines) == len(printed) == 3
    for words in lines:
        assert words[0] == "deepspeed" and words[1:5] == ["--num_nodes", "4", "--num_gpus", "8"]
        assert "--hostfile" in words and "--no_local_rank" in words
        i = words.index("--module")
        assert words[i + 1:i + 9] == ["reasonedit", "train", "--config", words[i + 4], "--stage", "3", "--deepspeed",
                                      words[i + 8]]
        assert same_file(words[i + 4], DEMO) and same_file(words[i + 8], ROOT / "launch" / "deepspeed" / "zero3.json")


def test_one_node_torchrun_is_standalone_and_a_stage_is_required(tmp_path):
    path = write_sweep(tmp_path, launcher="torchrun", stage=1)
    sweep = load_sweep(path)
    (words,) = [shlex.split(line) for line in emit_launch_lines(sweep, expand_sweep(sweep))]
    assert words[:6] == ["torchrun", "--nnodes", "1", "--nproc_per_node", "1", "--standalone"]
    path = write_sweep(tmp_path, launcher="deepspeed")
    with pytest.raises(ConfigError, match="stage: a deepspeed sweep launches one training stage"):
        emit_sweep(path)
    assert not (tmp_path / "out").exists()


def test_emitted_script_runs_every_line_with_the_node_environment(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$CALLS"\n')
    (bin_dir / "torchrun").chmod(0o755)
    path = write_sweep(tmp_path, grid={"data.seed": [0, 1]}, launcher="torchrun", nnodes=2, stage=2)
    script, _ = emit_sweep(path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "NODE_RANK": "1", "MASTER_ADDR": "node0"}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and all("--node_rank 1 --master_addr node0 --master_port 29500" in c for c in calls)


# ---------------------------------------------------------------- launch scripts and DeepSpeed JSONs

def _stubbed(tmp_path, tool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / tool).write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp")}


def test_torchrun_launcher_passes_stage_config_and_overrides(tmp_path):
    env = {**_stubbed(tmp_path, "torchrun"), "NNODES": "2", "NPROC_PER_NODE": "8", "NODE_RANK": "1",
           "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    res = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "2", "exp.yaml", "data.n=3"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["--nnodes", "2", "--nproc_per_node", "8", "--node_rank", "1", "--master_addr",
                                  "node0", "--master_port", "1234", "-m", "reasonedit", "train", "--config",
                                  "exp.yaml", "--stage", "2", "data.n=3"]
    res = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "2"], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_deepspeed_launcher_passes_its_json(tmp_path):
    env = _stubbed(tmp_path, "deepspeed")
    res = subprocess.run([str(ROOT / "launch" / "deepspeed.sh"), "3", "exp.yaml", "seed=1"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["--num_nodes", "1", "--num_gpus", "1", "--no_local_rank", "--module", "reasonedit",
                                  "train", "--config", "exp.yaml", "--stage", "3", "--deepspeed",
                                  str(ROOT / "launch" / "deepspeed" / "zero2.json"), "seed=1"]
    res = subprocess.run([str(ROOT / "launch" / "deepspeed.sh"), "3", "exp.yaml"],
                         env={**env, "DS_CONFIG": "nope.json"}, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "nope.json" in res.stderr


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_jsons_parse_as_deepspeed_configs(name, stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = DeepSpeedConfig(str(ROOT / "launch" / "deepspeed" / name))  # no distributed init: world size 1
    assert cfg.zero_optimization_stage == stage and cfg.bfloat16_config.enabled
    assert cfg.gradient_clipping == 1.0 and cfg.train_micro_batch_size_per_gpu == 1
    assert cfg.optimizer_params["torch_adam"] is True
