"""The real-model path on a tiny diffusers Qwen-Image-Edit folder: the folder read and checked before anything
runs, a start model that refers to the folder's weights instead of copying them, the scheduler's sigma schedule,
and `reasonedit run configs/experiment/paper.yaml` through the three stages and the eval step on imported data."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift
from PIL import Image

from conftest import ROOT, make_diffusers_folder, run_cli, run_cli_here
from reasonedit.inference.sampler import SamplerConfig, sigma_schedule
from reasonedit.models.diffusers_folder import ModelFolderError, folder_config, read_folder
from reasonedit.models.model import CONFIG_FILE, ReasonEditModel, save_reference

TEXTS = ["make the red circle blue", "add a green star", "remove the square", "a white cup on a table"]
# not diffusers' defaults, so a test sees that the folder's scheduler is what sets the schedule
SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.6, "max_shift": 1.1, "base_image_seq_len": 128,
             "max_image_seq_len": 4096, "shift_terminal": 0.05, "time_shift_type": "exponential"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _, _ = make_diffusers_folder(tmp_path_factory.mktemp("qie") / "Qwen-Image-Edit-tiny", TEXTS,
                                       scheduler=SCHEDULER)
    return path


@pytest.fixture(scope="module")
def plus_folder(tmp_path_factory):
    """2509 / 2511-style: QwenImageEditPlusPipeline with a zero_cond_t transformer."""
    path, _, _ = make_diffusers_folder(tmp_path_factory.mktemp("qie-plus") / "Qwen-Image-Edit-2511-tiny", TEXTS,
                                       pipeline="QwenImageEditPlusPipeline", scheduler=SCHEDULER, zero_cond_t=True)
    return path


def broken_copy(folder, tmp_path, change):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


def set_json(path, **values):
    doc = json.loads(path.read_text())
    doc.update(values)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("change,words", [
    (lambda d: shutil.rmtree(d / "vae"), ["broken: part vae is missing"]),
    (lambda d: (d / "model_index.json").unlink(), ["no model_index.json", "not a diffusers pipeline folder"]),
    (lambda d: set_json(d / "model_index.json", _class_name="FluxKontextPipeline"),
     ["pipeline class 'FluxKontextPipeline'", "QwenImageEditPipeline"]),
    (lambda d: set_json(d / "transformer" / "config.json", joint_attention_dim=96),
     ["transformer", "96-wide text states", "64 wide"]),
    (lambda d: set_json(d / "vae" / "config.json", z_dim=8), ["makes 8 latent channels", "out_channels=8"]),
    (lambda d: (d / "transformer" / "config.json").unlink(), ["part transformer has no config.json"]),
])
def test_a_bad_folder_is_named_with_its_part_before_any_weight_is_read(folder, tmp_path, change, words):
    bad = broken_copy(folder, tmp_path, change)
    with pytest.raises(ModelFolderError) as err:
        folder_config(read_folder(bad))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_overrides_must_be_folders_of_the_right_kind(folder, tmp_path):
    with pytest.raises(ModelFolderError, match="model.reasoner.path: .* is not a folder"):
        read_folder(folder, reasoner_path=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="reasoner has no config.json"):
        read_folder(folder, reasoner_path=tmp_path / "empty")
    parts = read_folder(folder, generator_path=folder / "transformer")  # a transformer folder elsewhere: taken
    assert parts.transformer == folder / "transformer" and parts.pipeline == "QwenImageEditPipeline"


@pytest.mark.parametrize("settings", [SCHEDULER, {"use_dynamic_shifting": False, "shift": 3.0}])
def test_the_sigma_schedule_is_the_folders_scheduler(folder, tmp_path, settings):
    """Our sampler's sigmas for a folder equal what diffusers' scheduler of that folder sets (as the
    Qwen-Image-Edit pipeline calls it: sigmas linspace(1, 1/steps), mu from the image's token count)."""
    copy = broken_copy(folder, tmp_path, lambda d: set_json(d / "scheduler" / "scheduler_config.json", **{
        **{"use_dynamic_shifting": False, "shift_terminal": None}, **settings}))
    cfg = folder_config(read_folder(copy))
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(copy / "scheduler")
    for tokens in (196, 1024, 4096):
        mu = (calculate_shift(tokens, ref.config.base_image_seq_len, ref.config.max_image_seq_len,
                              ref.config.base_shift, ref.config.max_shift)
              if ref.config.use_dynamic_shifting else None)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 20, 20), mu=mu)
        ours = sigma_schedule(20, tokens, SamplerConfig.for_model(cfg.schedule))
        assert torch.allclose(ours, ref.sigmas, atol=1e-6), (tokens, ours, ref.sigmas)


def test_a_reference_model_holds_no_weights_and_loads_as_the_folder(folder, tmp_path):
    direct = ReasonEditModel.from_diffusers(folder).eval()
    ref = save_reference(tmp_path / "start", read_folder(folder), direct.config)
    assert sorted(p.name for p in ref.iterdir()) == [CONFIG_FILE]
    loaded = ReasonEditModel.from_pretrained(ref).eval()
    for a, b in zip(direct.state_dict().items(), loaded.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    # saved untouched, it stays a reference; a changed part is written in full
    loaded.save_pretrained(tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [CONFIG_FILE]
    loaded.changed("generator")
    loaded.save_pretrained(tmp_path / "trained")
    meta = json.loads((tmp_path / "trained" / CONFIG_FILE).read_text())
    assert sorted(meta["references"]) == ["reasoner", "vae"] and (tmp_path / "trained" / "generator").is_dir()
    again = ReasonEditModel.from_pretrained(tmp_path / "trained")
    assert all(torch.equal(p, q) for p, q in zip(again.generator.parameters(), direct.generator.parameters()))
    # a part written to in place since it was loaded is saved in full, without being told
    edited = ReasonEditModel.from_pretrained(ref)
    with torch.no_grad():
        next(edited.vae.parameters()).add_(1.0)
    edited.save_pretrained(tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / CONFIG_FILE).read_text())
    assert sorted(meta["references"]) == ["generator", "reasoner"] and (tmp_path / "edited" / "vae").is_dir()
    # a folder that moved away is named, not half-loaded
    shutil.move(folder / "vae", tmp_path / "vae-moved")
    try:
        with pytest.raises(ModelFolderError, match="vae's folder is read from .* which is gone"):
            ReasonEditModel.from_pretrained(tmp_path / "trained")
    finally:
        shutil.move(tmp_path / "vae-moved", folder / "vae")


def write_images(folder, names, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Three imported datasets: edit and thinking pairs (jsonl), captions, and EditThinker RL critiques."""
    from reasonedit.data.importers import import_dataset

    root = tmp_path_factory.mktemp("imported")
    write_images(root / "img", [f"{i}{s}.png" for i in range(5) for s in ("", "_edit")], seed=0)
    rows = [{"source": f"img/{i}.png", "target": f"img/{i}_edit.png", "instruction": TEXTS[i % 3],
             "abstract_instruction": "make it look like autumn", **({"split": "val"} if i == 4 else {})}
            for i in range(5)]
    (root / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_images(root / "captions", [f"c{i}.png" for i in range(4)], seed=1)
    for i in range(4):
        (root / "captions" / f"c{i}.txt").write_text(TEXTS[3])
    rl = [{"origin_prompt": TEXTS[i % 3], "rewritten_prompt": TEXTS[(i + 1) % 3], "origin_image_path": f"img/{i}.png",
           "edited_image_path": f"img/{i}_edit.png", "evaluation": {"semantics": 3 + 2 * i, "quality": 9}}
          for i in range(4)]
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl))
    multi = [{**r, "extra_sources": [f"img/{(i + 1) % 5}.png"] * (1 + i % 2)} for i, r in enumerate(rows)]
    (root / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multi))  # 2-3 sources (2509 / 2511)
    out = {}
    for name, fmt, src in (("edits", "jsonl", root / "edits.jsonl"), ("captions", "captions", root / "captions"),
                           ("critiques", "editthinker-rl", root / "rl.jsonl"), ("multi", "jsonl", root / "multi.jsonl")):
        out[name] = root / "datasets" / name
        import_dataset(fmt, [src], out[name], shard_size=4)
    return out


def paper_run(folder, imported, out, plus: bool) -> list[str]:
    """`reasonedit run paper.yaml` arguments at a CPU scale: two steps a stage, small budgets and image areas,
    the imported datasets as each stage's data (several sources a record for the Plus pipelines)."""
    d = {k: f"{{path: {v}}}" for k, v in imported.items()}
    scale = ["model.dtype=float32", "train.data_streams=0", "train.activation_checkpointing=false",
             "train.checkpoint_every=0", "batches.pixel_budget=50176", "batches.window=8", "eval.limit=1",
             "model.images.area=16384", "model.images.condition_area=4096",
             "eval.sampling_steps=2", "eval.rounds=1", "eval.modes=[base,think_reflect]", "eval.device=cpu"]
    for n in (1, 2, 3):
        scale += [f"stage{n}.steps=2", f"stage{n}.warmup_steps=0", f"stage{n}.reasoner_budget=1024",
                  f"stage{n}.generator_budget=1024"]
    edits = d["multi"] if plus else d["edits"]  # the Plus pipelines take several sources
    data = [f"stage1.data=[{d['edits']},{d['critiques']}]", f"stage2.data=[{d['captions']},{edits}]",
            f"stage3.data=[{edits},{d['captions']},{d['critiques']}]"]
    return [str(ROOT / "configs" / "experiment" / "paper.yaml"), f"model.path={folder}", f"output_dir={out}",
            *scale, *data]


# the 2511-style folder in the default tier (several sources, zero_cond_t); the first Qwen-Image-Edit's in the slow
# tier, with the torchrun runs on both (the suite's 10 minutes)
@pytest.mark.parametrize("which,pipeline", [pytest.param("folder", "QwenImageEditPipeline", marks=pytest.mark.slow),
                                            ("plus_folder", "QwenImageEditPlusPipeline")], ids=["edit", "plus-2511"])
def test_the_paper_recipe_runs_on_a_diffusers_folder_without_copying_its_weights(which, pipeline, imported, tmp_path,
                                                                                  request):
    folder = request.getfixturevalue(which)
    out = tmp_path / "run"
    res = run_cli("run", *paper_run(folder, imported, out, pipeline == "QwenImageEditPlusPipeline"),
                  "train.parallel=none")
    assert res.returncode == 0, res.stderr[-3000:]
    # the start model refers to the folder; each stage writes only what it trained
    assert sorted(p.name for p in (out / "model").iterdir()) == [CONFIG_FILE]
    refs = {n: sorted(json.loads((out / n / "model" / CONFIG_FILE).read_text()).get("references", {}))
            for n in ("stage1", "stage2", "stage3")}
    # stage 2 keeps stage 1's reasoner (frozen) where stage 1 saved it
    assert refs == {"stage1": ["generator", "vae"], "stage2": ["reasoner", "vae"], "stage3": ["vae"]}
    assert not (out / "stage1" / "model" / "generator").exists() and (out / "stage2" / "model" / "generator").is_dir()
    stage2 = json.loads((out / "stage2" / "model" / CONFIG_FILE).read_text())["references"]
    assert stage2["reasoner"] == {"saved": str((out / "stage1" / "model" / "reasoner").resolve())}
    meta = json.loads((out / "model" / CONFIG_FILE).read_text())["model"]
    assert meta["pipeline"] == pipeline and meta["generator"]["num_layers"] == 2
    assert meta["generator"]["zero_cond_t"] == (pipeline == "QwenImageEditPlusPipeline")
    assert meta["images"] == {"policy": "auto", "area": 16384, "condition_area": 4096}  # the run's, kept
    assert meta["schedule"]["base_shift"] == 0.6 and meta["schedule"]["shift_terminal"] == 0.05
    # every stage read the datasets it was given, and the eval step scored the stage-3 model
    for n in (1, 2, 3):
        history = json.loads((out / f"stage{n}" / "model" / CONFIG_FILE).read_text())
        assert history["format"] == "reasonedit"
    assert "stage2 fm" in res.stdout and "| base |" in res.stdout
    assert (out / "eval" / "report.md").is_file() and (out / "latent_cache").is_dir()
    assert json.loads((out / "stage1" / "validation.json").read_text())["split"] == "val"


def test_a_run_on_a_broken_folder_stops_before_its_first_step(folder, tmp_path):
    bad = broken_copy(folder, tmp_path, lambda d: shutil.rmtree(d / "transformer"))
    res = run_cli_here("run", ROOT / "configs" / "experiment" / "paper.yaml", f"model.path={bad}",
                  f"output_dir={tmp_path / 'run'}", "stage1.data=[{path: /nowhere}]")
    assert res.returncode == 1 and "part transformer is missing" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()
    res = run_cli_here("run", ROOT / "configs" / "experiment" / "paper.yaml", f"model.path={folder}",
                  f"output_dir={tmp_path / 'run'}", "steps=[models,stage1]")
    assert res.returncode == 1 and "stage1.data: empty" in res.stderr
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("which,parallel", [("folder", ["train.parallel=fsdp"]),
                                            ("folder", ["train.parallel=deepspeed", "train.zero_stage=3"]),
                                            ("plus_folder", ["train.parallel=fsdp"]),
                                            ("plus_folder", ["train.parallel=deepspeed", "train.zero_stage=3"])],
                         ids=["edit-fsdp2", "edit-zero3", "plus-fsdp2", "plus-zero3"])
def test_the_paper_recipe_runs_under_torchrun_on_two_ranks(which, parallel, imported, tmp_path, request):
    """The whole run under torchrun (2 gloo ranks): the stages on both ranks, each reading half the records (the
    real VAE whole on each rank under FSDP2, as it encodes in preprocessing); the models step, each stage's
    validation and the eval on rank 0 alone. In stage 3 a rank whose batch holds no image or no generator sample
    still runs the vision tower and the generator (FSDP2 and ZeRO-3 need the same modules on every rank)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "-m", "reasonedit", "run", *paper_run(request.getfixturevalue(which), imported, out,
                                                                which == "plus_folder"), *parallel],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    kind = "fsdp" if "train.parallel=fsdp" in parallel else "deepspeed"
    for n in (1, 2, 3):
        assert f"stage{n}: trains" in res.stderr and f"{kind} on 2 rank(s)" in res.stderr
        assert f"stage{n}: rank 1 read and preprocessed" in res.stderr
    assert "rank 1: done; the main rank runs eval" in res.stderr and "latent cache:" in res.stderr
    assert res.stdout.count("experiment paper: steps") == 1 and res.stdout.count("| base |") == 1
    assert res.stderr.count("step models") == 1 and res.stderr.count("step eval") == 1
    assert (out / "eval" / "report.md").is_file() and (out / "stage3" / "model" / CONFIG_FILE).is_file()
