"""The inference pipeline: devices, the one factory of editors and thinkers, and where `reasonedit eval`
and the run's edit and eval steps place the model (recorded, since CI has no GPU: the recorder leaves the
weights where they are)."""

import numpy as np
import pytest
import torch

from reasonedit.cli import main
from reasonedit.shapes.editor import ShapesEditor
from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker
from reasonedit.inference.pipeline import Pipeline, build_editor, build_thinker, resolve_device
from reasonedit.inference.http_editor import HttpEditor
from reasonedit.inference.openai_thinker import OpenAIThinker
from reasonedit.inference.types import SHAPES_EDITOR
from reasonedit.models.model import ReasonEditModel
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


@pytest.fixture
def placements(monkeypatch):
    """Every device a ReasonEditModel is moved to, in order; the move itself is skipped."""
    seen = []

    def to(self, *args, **kwargs):
        seen.append(torch.device(args[0] if args else kwargs["device"]))
        return self

    monkeypatch.setattr(ReasonEditModel, "to", to)
    return seen


def test_devices_resolve_or_are_refused_by_name():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device 'gpu0'"):
        resolve_device("gpu0")


def test_one_factory_makes_every_editor_and_thinker(tiny_model_dir):
    pipe = Pipeline.load(tiny_model_dir, device="cpu")
    assert isinstance(build_editor(pipeline=pipe), GeneratorEditor)
    assert isinstance(build_editor(SHAPES_EDITOR, error_rate=0.3), ShapesEditor)
    http = build_editor(["http://127.0.0.1:9,http://127.0.0.1:10"])
    assert isinstance(http, HttpEditor) and len(http.pool.urls) == 2
    assert isinstance(build_thinker(pipeline=pipe), ReasonerThinker)
    assert isinstance(build_thinker("http://127.0.0.1:9/v1", model_name="m"), OpenAIThinker)
    with pytest.raises(ValueError, match="only the shapes editor makes errors"):
        build_editor(pipeline=pipe, error_rate=0.1)
    with pytest.raises(ValueError, match="needs a model"):
        build_editor()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        Pipeline.load(tiny_model_dir.parent)


def test_the_pipeline_edits_what_the_model_alone_predicts(tiny_model_dir):
    pipe = Pipeline.load(tiny_model_dir, device="cpu")
    image = np.zeros((56, 56, 3), np.uint8)
    one = pipe.edit(image, "remove the star", num_inference_steps=1, guidance_scale=1.0)
    both = pipe.edit([image, image], ["remove the star", "x"], num_inference_steps=1, guidance_scale=1.0)
    assert one.shape == image.shape and np.array_equal(one, both[0])


def test_eval_places_the_model_on_the_device_it_is_given(tiny_model_dir, small_dataset, tmp_path, placements):
    code = main(["eval", "--bench", "shapes", "--data", str(small_dataset), "--model", str(tiny_model_dir),
                 "--modes", "base", "--limit", "1", "--steps", "1", "--guidance", "1", "--device", "cuda:1",
                 "--out", str(tmp_path / "eval")])
    assert code == 0
    assert placements == [torch.device("cuda", 1)]


def test_the_runs_edit_and_eval_steps_place_the_model_on_the_configured_device(tmp_path, placements):
    code = main(["run", str(DEMO), f"output_dir={tmp_path / 'run'}", "data.n=4", "data.shard_size=4",
                 "steps=[data,models,edit,eval]", "edit.samples=1", "edit.rounds=1", "edit.sampling_steps=1",
                 "eval.limit=1", "eval.rounds=1", "eval.sampling_steps=1", "eval.modes=[base]",
                 "edit.device=cuda:1", "eval.device=cuda:2"])
    assert code == 0
    # the edit step's model, then the eval step's for the ablation and for the held-out figures
    assert placements == [torch.device("cuda", 1), torch.device("cuda", 2), torch.device("cuda", 2)]


def test_a_bad_device_in_the_config_is_named(tmp_path, capsys):
    assert main(["run", str(DEMO), f"output_dir={tmp_path / 'run'}", "eval.device=gpu"]) == 1
    assert "eval.device: 'gpu'" in capsys.readouterr().err


@pytest.fixture
def casts(monkeypatch):
    """(device, dtype) of every move of a ReasonEditModel, in order; the move itself is skipped."""
    seen = []

    def to(self, *args, **kwargs):
        seen.append((torch.device(args[0] if args else kwargs["device"]), args[1] if len(args) > 1 else None))
        return self

    monkeypatch.setattr(ReasonEditModel, "to", to)
    return seen


def test_the_dtype_is_bfloat16_on_cuda_by_default_and_as_saved_on_a_cpu(tmp_path, tiny_model_dir, small_dataset,
                                                                        casts):
    code = main(["run", str(DEMO), f"output_dir={tmp_path / 'run'}", "data.n=4", "data.shard_size=4",
                 "steps=[data,models,edit,eval]", "edit.samples=1", "edit.rounds=1", "edit.sampling_steps=1",
                 "eval.limit=1", "eval.rounds=1", "eval.sampling_steps=1", "eval.modes=[base]",
                 "edit.device=cuda:1", "eval.device=cpu", "eval.dtype=float16"])
    assert code == 0
    assert casts == [(torch.device("cuda", 1), torch.bfloat16)] + [(torch.device("cpu"), torch.float16)] * 2
    casts.clear()
    assert main(["eval", "--bench", "shapes", "--data", str(small_dataset), "--model", str(tiny_model_dir),
                 "--modes", "base", "--limit", "1", "--steps", "1", "--guidance", "1", "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    assert casts == [(torch.device("cpu"), None)]  # auto on a CPU: the weights stay as saved


def test_a_bad_dtype_in_the_config_is_named(tmp_path, capsys):
    assert main(["run", str(DEMO), f"output_dir={tmp_path / 'run'}", "edit.dtype=half"]) == 1
    assert "edit.dtype: 'half'" in capsys.readouterr().err
