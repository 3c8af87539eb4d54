import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from reasonedit.config.model import ModelConfig
from reasonedit.models.model import ReasonEditModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    ReasonEditModel.tiny(ModelConfig(), ["make the red circle blue"], seed=0).save_pretrained(root / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(root / "in.png")
    return root


def test_edit_runs_the_full_loop_and_writes_the_trace(saved):
    out = saved / "out"
    proc = run_cli("edit", "--model", saved / "model", "--image", saved / "in.png", "--instruction",
                   "make the red circle blue", "--think", "--reflect", "--rounds", "2", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "trace.json").read_text())
    # a random tiny reasoner rarely answers in format: every round then ends Failed, so both rounds run
    assert len(data["rounds"]) == 2 and data["thought"] is not None
    assert all(r["decision"] in ("success", "reflection", "failed") for r in data["rounds"])
    for name in ("final.png", "round_1.png", "round_2.png", "index.html", "contact_sheet.png"):
        assert (out / name).is_file(), name
    assert np.asarray(Image.open(out / "final.png")).shape == (64, 80, 3)
    assert "best round" in proc.stdout and "round 2:" in proc.stdout and "reflect" in proc.stderr


def test_a_missing_image_is_named_and_exits_1(saved, tmp_path, capsys):
    from reasonedit.cli import main
    code = main(["edit", "--model", str(saved / "model"), "--image", str(tmp_path / "nope.png"),
                 "--instruction", "x", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "--image" in err and "nope.png" in err
    assert not (tmp_path / "out").exists()


def test_reflect_without_a_model_or_thinker_is_refused(saved, tmp_path, capsys):
    from reasonedit.cli import main
    code = main(["edit", "--editor", "http://127.0.0.1:9", "--image", str(saved / "in.png"), "--instruction", "x",
                 "--reflect", "--out", str(tmp_path / "out")])
    assert code == 1 and "--model" in capsys.readouterr().err
