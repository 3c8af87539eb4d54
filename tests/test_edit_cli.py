import json

import numpy as np
import pytest
import torch
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


def test_extra_images_are_further_sources_of_the_built_in_generator(saved, tmp_path, capsys):
    from reasonedit.cli import main
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    common = ["edit", "--model", str(saved / "model"), "--image", str(saved / "in.png"), "--instruction", "x",
              "--steps", "1"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--extra-image", str(tmp_path / "b.png"), "--out", str(tmp_path / "two")]) == 0
    one, two = (np.asarray(Image.open(tmp_path / d / "final.png")) for d in ("one", "two"))
    assert one.shape == two.shape == (64, 80, 3)  # returned at the edited source's size
    from reasonedit.inference.builtin import GeneratorEditor
    from reasonedit.inference.types import EditRequest
    editor = GeneratorEditor(ReasonEditModel.from_pretrained(saved / "model"))
    source, extra = np.asarray(Image.open(saved / "in.png")), np.asarray(Image.open(tmp_path / "b.png"))
    (a,), _ = editor.latents([EditRequest(source, "x")], 1)
    (b,), (plan,) = editor.latents([EditRequest(source, "x", extra_images=(extra,))], 1)
    assert plan.vae == ((64, 80), (48, 48)) and not torch.equal(a, b)  # the second picture conditions the edit
    capsys.readouterr()
    code = main(["edit", "--editor", "http://127.0.0.1:9", "--image", str(saved / "in.png"), "--extra-image",
                 str(tmp_path / "b.png"), "--instruction", "x", "--out", str(tmp_path / "three")])
    assert code == 1 and "--extra-image" in capsys.readouterr().err and not (tmp_path / "three").exists()
    code = main([*common, "--extra-image", str(tmp_path / "none.png"), "--out", str(tmp_path / "four")])
    err = capsys.readouterr().err
    assert code == 1 and "--extra-image" in err and "none.png" in err
