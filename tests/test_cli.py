import json

import pytest
import yaml

from conftest import ROOT, run_cli, run_cli_here

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


@pytest.mark.parametrize("args", [[], ["data"], ["data", "synth"], ["data", "verify"], ["data", "sheet"], ["data", "import"],
                                  ["config"], ["run"], ["train"], ["plan"], ["sweep"], ["edit"], ["serve"], ["eval"]])
def test_every_command_has_help(args):
    res = (run_cli if not args else run_cli_here)(*args, "--help")  # the entry point itself as a user starts it
    assert res.returncode == 0, res.stderr
    assert "usage: reasonedit" in res.stdout


def test_synth_verify_and_sheet(tmp_path):
    out = tmp_path / "d"
    res = run_cli("data", "synth", "--out", out, "--n", 4, "--splits", "train,val", "--seed", 3, "--shard-size", 3)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {s: {k: 4 for k in ("thinking_pair", "reflection", "edit_pair", "text_to_image")}
                                  for s in ("train", "val")}
    assert manifest["synth"]["seed"] == 3 and len(manifest["shards"]["train"]["edit_pair"]) == 2
    assert "records" in res.stderr  # progress is shown
    res = run_cli("data", "verify", out)
    assert res.returncode == 0 and "reflection decisions agree" in res.stdout
    res = run_cli("data", "sheet", out, "--out", tmp_path / "sheet.png", "--rows", 2)
    assert res.returncode == 0 and (tmp_path / "sheet.png").stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "data.n: must be a positive"),
    (["--n", "-3"], "data.n: must be a positive"),
    (["world.gird=3"], "unknown key 'world.gird'"),
    (["data.n=abc"], "key 'data.n'"),
    (["--splits", "train,dev"], "data.splits"),
    (["--config", "missing.yaml"], "config file not found: missing.yaml"),
])
def test_bad_synth_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "d"
    res = run_cli_here("data", "synth", "--out", out, *args)
    assert res.returncode == 1, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("")
    res = run_cli_here("data", "synth", "--out", tmp_path / "afile" / "d", "--n", 2)
    assert res.returncode == 1 and "cannot write the dataset" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_verify_of_a_missing_dataset_names_the_path(tmp_path):
    res = run_cli_here("data", "verify", tmp_path / "nope")
    assert res.returncode == 1 and "nope" in res.stderr


def test_config_prints_the_resolved_config():
    res = run_cli_here("config", DEMO, "world.grid=8", "name=sweep1")
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    assert doc["world"]["grid"] == 8 and doc["output_dir"] == "runs/sweep1" and doc["model"]["name"] == "tiny"


def test_run_edit_and_eval_steps_write_traces_and_print_the_ablation_table(tmp_path):
    out = tmp_path / "run"
    res = run_cli("run", DEMO, f"output_dir={out}", "data.n=4", "data.shard_size=4", "steps=[data,models,edit,eval]",
                  "edit.samples=1", "edit.rounds=2", "edit.sampling_steps=2", "eval.limit=2", "eval.rounds=1",
                  "eval.sampling_steps=2")
    assert res.returncode == 0, res.stderr
    traces = sorted((out / "edit").iterdir())
    assert len(traces) == 2  # one concrete, one abstract
    for t in traces:
        assert {"trace.json", "index.html", "contact_sheet.png", "final.png"} <= {p.name for p in t.iterdir()}
    assert (out / "eval" / "report.md").is_file() and (out / "eval" / "results.json").is_file()
    lines = res.stdout.splitlines()
    # each trace line says what the reasoner concluded and what the exact oracle reads (a random model: wrong)
    edit_lines = [line for line in lines if "the reasoner says" in line]
    assert len(edit_lines) == 2 and all("the oracle: wrong, score" in line for line in edit_lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("shapes ablation, editor reasonedit-generator"))
    table = [line for line in lines[start + 1:] if line.startswith("| ")][:4]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["base", "think", "think_reflect"]
    learned = next(i for i, line in enumerate(lines) if line.startswith("what ") and "learned" in line)
    assert "concrete edits exactly right" in "\n".join(lines[learned:])  # the held-out figures follow the ablation
    assert (out / "eval" / "figures.json").is_file()


def test_run_builds_data_models_and_preview_and_saves_its_config(tmp_path):
    out = tmp_path / "run"
    res = run_cli("run", DEMO, f"output_dir={out}", "data.n=6", "data.shard_size=4", "preview.rows=2",
                  "steps=[data,models,batches,preview]")  # the stages have their own tests
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["n"] == 6 and saved["output_dir"] == str(out)
    assert (out / "preview" / "contact_sheet.png").is_file()
    assert "reflection decisions agree" in res.stdout
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith(("reasoner ", "generator "))}
    assert rows["reasoner"][1] == "12" and rows["reasoner"][2] == "24"  # 6 thinking pairs + 6 reflections -> 6 + 18
    assert rows["generator"][1] == "12" and 0 < float(rows["generator"][5]) <= 1

    from reasonedit.models.model import ReasonEditModel
    from reasonedit.models.tokenizer import DECISION_TOKENS
    model = ReasonEditModel.from_pretrained(out / "model")
    tok = model.reasoner.tokenizer
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in DECISION_TOKENS)
    assert model.reasoner.hidden_size == 64 and model.generator.config.num_layers == 2


def test_synth_is_byte_identical_across_processes_and_hash_seeds(tmp_path):
    import hashlib
    import os
    import subprocess
    import sys

    def synth(out, hash_seed):
        env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
        res = subprocess.run([sys.executable, "-m", "reasonedit", "data", "synth", "--out", str(out), "--n", "5",
                              "--seed", "11"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}
    a, b = synth(tmp_path / "a", 1), synth(tmp_path / "b", 2)
    assert a == b and len(a) == 1 + 4 * 3


def test_import_jsonl_then_verify_refuses_it(tmp_path):
    from PIL import Image
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"source": "a.png", "target": "b.png", "instruction": "make it blue"}) + "\n")
    out = tmp_path / "imported"
    res = run_cli("data", "import", "--format", "jsonl", "--out", out, rows)
    assert res.returncode == 0, res.stderr
    assert "train/edit_pair: 1" in res.stdout and (out / "manifest.json").is_file()
    res = run_cli("data", "verify", out)
    assert res.returncode == 1 and "only datasets written by `reasonedit data synth`" in res.stderr


def test_import_errors_name_the_file_and_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"source": "a.png", "target": "b.png", "instruction": "x"}\n{not json\n')
    res = run_cli_here("data", "import", "--format", "jsonl", "--out", tmp_path / "out", rows)
    assert res.returncode == 1 and "rows.jsonl:" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    res = run_cli_here("data", "import", "--format", "csv", "--out", tmp_path / "out", rows)
    assert res.returncode == 1 and "--format 'csv'" in res.stderr


def test_sweep_command_expands_and_validates_without_writing(tmp_path):
    res = run_cli_here("sweep", "configs/sweep/shapes_grid.yaml", "--dry-run", "--output-dir", tmp_path / "sw")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("python -m reasonedit run") == 4 and not (tmp_path / "sw").exists()
    res = run_cli_here("sweep", tmp_path / "missing.yaml")
    assert res.returncode == 1 and "sweep file not found" in res.stderr


def test_eval_step_images_of_another_model_save_or_settings_are_stale(tmp_path):
    from reasonedit.config import EvalStepConfig
    from reasonedit.eval.runner import STAMP, model_identity
    from reasonedit.experiment import _stale_eval

    model = tmp_path / "stage3" / "model"
    model.mkdir(parents=True)
    (model / "reasonedit.json").write_text("{}")
    e = EvalStepConfig()
    stamp = tmp_path / "eval" / "images" / "base" / "stage3" / STAMP
    stamp.parent.mkdir(parents=True)
    made = {"origin": model_identity(model), "steps": e.sampling_steps, "guidance": e.guidance, "seed": e.seed,
            "rounds": None}
    stamp.write_text(json.dumps(made))
    assert not _stale_eval(tmp_path / "eval", model, e)
    stamp.write_text(json.dumps({**made, "steps": e.sampling_steps + 1}))
    assert _stale_eval(tmp_path / "eval", model, e)
    stamp.write_text(json.dumps({**made, "origin": "elsewhere@1"}))
    assert _stale_eval(tmp_path / "eval", model, e)
