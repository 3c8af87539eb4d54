"""`reasonedit train`: errors name the flag and file; a stage runs from the command line."""

from tests.conftest import ROOT, run_cli_here

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


def test_train_without_a_start_model_names_it(tmp_path):
    res = run_cli_here("train", "--config", DEMO, "--stage", "2", f"output_dir={tmp_path}")
    assert res.returncode == 1 and "--start" in res.stderr and "stage1" in res.stderr


def test_train_with_a_bad_override_names_the_key(tmp_path):
    res = run_cli_here("train", "--config", DEMO, "--stage", "1", "stage1.lr=-1")
    assert res.returncode == 1 and "stage1.lr" in res.stderr
