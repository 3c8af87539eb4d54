"""The pretrain stage (stage 0, tiny presets): exact scene questions, what it trains, that it learns, the run
step, the reasoner's image size, and its config errors."""

import json
import random

import numpy as np
import pytest
import torch

from reasonedit.config import ConfigError, load_config
from reasonedit.shapes.world import Scene, Shape, ShapesWorld, WorldConfig
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
# the demo world: 64-px renders of a 4x4 grid, which the reasoner sees as 4x4 tokens
WORLD = dict(image_size=64, grid=4, min_shapes=1, max_shapes=4, kinds=["circle", "square", "triangle"],
             colors=["red", "yellow", "green", "blue", "white"], backgrounds=["black", "navy"],
             sizes=["small", "large"])
SMALL = [f"world.{k}={json.dumps(v).replace(' ', '')}" for k, v in WORLD.items()] + [
    "model.reasoner.image_min_pixels=12544", "batches.pixel_budget=12544", "batches.window=8",
    "pretrain.reasoner_budget=512", "pretrain.warmup_steps=0", "train.log_every=1"]


def small_cfg(tmp_path, *extra):
    return load_config(DEMO, [f"output_dir={tmp_path}", "data.n=12", "data.shard_size=12", *SMALL, *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The data and models steps of the demo world, once: the start model of the pretrain stage."""
    from reasonedit.experiment import run_experiment
    out = tmp_path_factory.mktemp("pretrain")
    tree, cfg = small_cfg(out, "steps=[data,models]")
    run_experiment(tree, cfg)
    return out


def world_config() -> WorldConfig:
    return WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in WORLD.items()})


# -- questions ------------------------------------------------------------------------------------


def test_every_answer_agrees_with_what_the_oracle_reads_from_the_render():
    from reasonedit.shapes.language import at, describe, shape_words, where
    from reasonedit.shapes.oracle import Oracle
    from reasonedit.shapes.scene_qa import NOTHING, QUESTION_KINDS, ask, plural

    world = ShapesWorld(world_config())
    cfg, oracle = world.config, Oracle(world)
    rng = random.Random(3)
    seen = set()
    for _ in range(150):
        scene = oracle.read(world.render(world.random_scene(rng))).scene  # what the pixels show
        for kind in QUESTION_KINDS:
            q = ask(kind, scene, cfg, rng)
            seen.add(kind) if q is not None else None
            if kind == "cell":
                cell = next(c for c in cfg.cells if q.question.endswith(f" {at(c, cfg.grid)}?"))
                shape = scene.shape_at(cell)
                assert q.answer == (f"a {shape_words(shape)}" if shape else NOTHING)
            elif kind == "count":
                kinds = [k for k in cfg.kinds if f" {plural(k)} " in q.question]
                colors = [c for c in cfg.colors if f" {c} shapes" in q.question]
                expected = (sum(s.kind in kinds for s in scene.shapes) if kinds else
                            sum(s.color in colors for s in scene.shapes) if colors else len(scene.shapes))
                assert q.answer == str(expected), q.question
            elif kind == "background":
                assert q.answer == scene.background
            elif kind == "where":
                if q is None:  # no shape can be named without its position
                    continue
                cell = next(c for c in cfg.cells if where(c, cfg.grid) == q.answer)
                ref = q.question.split(" is the ", 1)[1].rstrip("?").split()
                # the phrase names the shape in that cell and no other, and does not give its place away
                assert [s for s in scene.shapes if set(ref) <= {s.size, s.color, s.kind}] == [scene.shape_at(cell)], q
            else:
                assert q.answer == describe(scene, cfg.grid)
    assert seen == set(QUESTION_KINDS)


def test_questions_are_a_pure_function_of_the_rng_seed():
    from reasonedit.shapes.scene_qa import scene_questions

    world = ShapesWorld(world_config())
    scene = world.random_scene(random.Random(0))
    one = scene_questions(scene, world.config, random.Random("7/key"), 3)
    assert one == scene_questions(scene, world.config, random.Random("7/key"), 3)
    assert len({q.kind for q in one}) == 3
    others = [scene_questions(scene, world.config, random.Random(f"{s}/key"), 3) for s in range(8)]
    assert any(o != one for o in others)


def test_an_empty_scene_gets_no_where_question_and_counts_zero():
    from reasonedit.shapes.scene_qa import ask, scene_questions

    cfg = world_config()
    empty = Scene("navy", ())
    assert ask("where", empty, cfg, random.Random(0)) is None
    assert [q.kind for q in scene_questions(empty, cfg, random.Random(0), 5)].count("where") == 0
    assert ask("count", empty, cfg, random.Random(1)).answer == "0"


def test_train_records_never_give_questions_about_held_out_scenes(run_dir):
    from reasonedit.shapes.scene_qa import record_views
    from reasonedit.data.shards import read_records
    from reasonedit.shapes.synth import split_of

    views = [v for r in read_records(run_dir / "data", split="train") for v in record_views(r)]
    assert len(views) > 40 and all(split_of(scene) == "train" for _, _, scene in views)
    val = [v for r in read_records(run_dir / "data", split="val") for v in record_views(r)]
    assert val and all(split_of(scene) == "val" for _, _, scene in val)


def test_a_scene_of_another_split_than_its_record_is_left_out():
    from reasonedit.data.samples import EditPair
    from reasonedit.shapes.scene_qa import record_views
    from reasonedit.shapes.synth import split_of

    world = ShapesWorld(world_config())
    rng = random.Random(5)
    scenes = [world.random_scene(rng) for _ in range(60)]
    train = next(s for s in scenes if split_of(s) == "train")
    held = next(s for s in scenes if split_of(s) != "train")
    image = world.render(train)
    record = EditPair("train_edit_x", image, "Do it.", world.render(held),
                      meta={"source_scene": train.to_dict(), "target_scene": held.to_dict()})
    assert [(f, s) for f, _, s in record_views(record)] == [("source", train)]


def test_segments_label_only_the_answer_and_put_the_image_first(run_dir, tmp_path):
    from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
    from reasonedit.data.shards import read_records
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.stages import stage_for

    _, cfg = small_cfg(tmp_path)
    model = ReasonEditModel.from_pretrained(run_dir / "model", components=("reasoner",))
    pre = Preprocessor.from_model(model, PreprocessConfig(buckets=buckets_for(model, cfg.batches.pixel_budget)))
    stage = stage_for(0, cfg)
    record = next(read_records(run_dir / "data", split="train", kind="text_to_image"))
    segments = stage.segments(pre, record)
    assert segments[0].role == "caption" and len(segments) == 1 + cfg.pretrain.questions_per_image
    assert [s.answer for s in stage.segments(pre, record)] == [s.answer for s in segments]  # the same every time
    tok = model.reasoner.tokenizer
    for seg in segments:
        labelled = tok.decode(seg.input_ids[0][seg.labels[0] != -100])
        assert labelled == seg.answer + "<|im_end|>"
        ids = seg.input_ids[0].tolist()
        image_at = ids.index(model.reasoner.processor.image_token_id)
        assert "Question:" in tok.decode(ids[image_at:]) or seg.role == "caption"
        assert "Question:" not in tok.decode(ids[:image_at])


# -- the stage ------------------------------------------------------------------------------------


def test_the_stage_trains_every_reasoner_parameter_and_carries_the_generator_over(run_dir, tmp_path):
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.stages import stage_for
    from reasonedit.training import load_stage_model, train_stage

    _, cfg = small_cfg(tmp_path, "pretrain.steps=2", "pretrain.lr=1e-2")
    stage = stage_for(0, cfg)
    before = load_stage_model(stage, run_dir / "model")
    assert before.generator is None and before.reasoner.peft_model is None
    params = dict(before.reasoner.model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert any(".visual.merger." in n for n in params) and any(".visual.blocks." in n for n in params)
    res = train_stage(cfg, 0, run_dir / "model", run_dir / "data", tmp_path / "pretrain")
    after = dict(ReasonEditModel.from_pretrained(res.model, components=("reasoner",)).reasoner.model.named_parameters())
    unchanged = [n for n, p in params.items() if torch.equal(p, after[n])]
    # every weight matrix moved, the vision tower's included (an untouched row of the embedding may not)
    assert not [n for n in unchanged if "embed_tokens" not in n and "lm_head" not in n], unchanged
    start, end = (ReasonEditModel.from_pretrained(p) for p in (run_dir / "model", res.model))
    for (name, a), (_, b) in zip(start.generator.named_parameters(), end.generator.named_parameters()):
        assert torch.equal(a, b), f"generator {name} changed"
    assert json.loads((tmp_path / "pretrain" / "stage.json").read_text())["stage"] == "pretrain"


def test_the_stage_refuses_a_start_model_with_lora(run_dir):
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.stages.pretrain import train_whole_reasoner

    model = ReasonEditModel.from_pretrained(run_dir / "model", components=("reasoner",))
    model.reasoner.add_lora(model.config.reasoner.lora)
    with pytest.raises(ValueError, match="LoRA"):
        train_whole_reasoner(model)


def test_a_short_run_lowers_the_held_out_next_token_loss(run_dir, tmp_path):
    from reasonedit.stages import stage_for
    from reasonedit.stages.validation import validation_batches, validation_losses
    from reasonedit.training import load_stage_model, train_stage

    _, cfg = small_cfg(tmp_path, "pretrain.steps=25", "pretrain.lr=3e-3")
    stage = stage_for(0, cfg)
    start = load_stage_model(stage, run_dir / "model")
    batches = validation_batches(stage, start, cfg, run_dir / "data", split="val", records_per_kind=4)
    res = train_stage(cfg, 0, run_dir / "model", run_dir / "data", tmp_path / "pretrain")
    before = validation_losses(stage, start, batches, cfg)["ntp"]
    after = validation_losses(stage, load_stage_model(stage, res.model), batches, cfg)["ntp"]
    assert after < before - 1.0, (before, after)


def test_reading_accuracy_scores_exact_replies_per_kind(run_dir, tmp_path, monkeypatch):
    from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
    from reasonedit.shapes.scene_qa import NOTHING
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.stages.pretrain import heldout_scene_records, reading_accuracy

    _, cfg = small_cfg(tmp_path)
    model = ReasonEditModel.from_pretrained(run_dir / "model", components=("reasoner",))
    pre = Preprocessor.from_model(model, PreprocessConfig(buckets=buckets_for(model, cfg.batches.pixel_budget)))
    split, records = heldout_scene_records(run_dir / "data", 6)
    assert split == "val" and len(records) == 6
    monkeypatch.setattr(model.reasoner, "generate", lambda batch, max_new_tokens: [NOTHING] * len(batch))
    report = reading_accuracy(model, records, cfg.world, pre)
    empty = 0
    for r in records:  # the cell each record is asked about: the reading's own draw
        from reasonedit.shapes.scene_qa import ask
        scene = Scene.from_dict(r.meta["scene"])
        empty += ask("cell", scene, cfg.world, random.Random(f"{cfg.seed}/{r.key}/reading")).answer == NOTHING
    assert report.accuracy["cell"] == empty / len(records)
    assert report.accuracy["background"] == 0.0 and report.accuracy["caption"] == 0.0
    assert report.asked["caption"] == 6 and "cell" in report.line()


def test_reading_accuracy_counts_any_caption_phrasing_as_right(run_dir, tmp_path, monkeypatch):
    from reasonedit.shapes.language import captions
    from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
    from reasonedit.models import prompts
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.stages.pretrain import heldout_scene_records, reading_accuracy

    _, cfg = small_cfg(tmp_path)
    model = ReasonEditModel.from_pretrained(run_dir / "model", components=("reasoner",))
    pre = Preprocessor.from_model(model, PreprocessConfig(buckets=buckets_for(model, cfg.batches.pixel_budget)))
    _, records = heldout_scene_records(run_dir / "data", 4)
    by_image = {pre.bucket(r.image).tobytes(): captions(Scene.from_dict(r.meta["scene"]), 4) for r in records}

    def reply(batch, max_new_tokens):
        out = []
        for m in batch:
            image = next(p["image"] for p in m[1]["content"] if p.get("type") == "image")
            task = m[1]["content"][-1]["text"]
            out.append(by_image[image.tobytes()][-1] if task == prompts.CAPTION_TASK else "?")
        return out

    monkeypatch.setattr(model.reasoner, "generate", reply)
    assert reading_accuracy(model, records, cfg.world, pre).accuracy["caption"] == 1.0


# -- the run step ---------------------------------------------------------------------------------


def test_the_run_step_writes_the_model_and_its_reading(run_dir, tmp_path):
    import shutil

    from reasonedit.experiment import run_experiment
    from reasonedit.models.model import ReasonEditModel

    for part in ("data", "model"):
        shutil.copytree(run_dir / part, tmp_path / part)
    tree, cfg = small_cfg(tmp_path, "steps=[data,models,pretrain]", "pretrain.steps=2", "pretrain.reading_scenes=3")
    result = run_experiment(tree, cfg)
    model = ReasonEditModel.from_pretrained(tmp_path / "pretrain" / "model")
    assert model.generator is not None and model.vae is not None
    reading = json.loads((tmp_path / "pretrain" / "reading.json").read_text())
    assert reading["split"] == "val" and reading["scenes"] == 3
    assert set(reading["accuracy"]) == {"cell", "count", "background", "where", "list", "caption"}
    assert result.reading == reading and "pretrain" in result.validation


def test_the_run_step_is_skipped_for_a_released_reasoner(tmp_path, caplog):
    from reasonedit.experiment import RunResult, step_pretrain

    _, cfg = small_cfg(tmp_path, "model.source=diffusers", "model.path=/nowhere")
    with caplog.at_level("INFO", logger="reasonedit.experiment"):
        step_pretrain(cfg, tmp_path, RunResult(tmp_path), None)
    assert "comes pretrained" in caplog.text and not (tmp_path / "pretrain").exists()


def test_reasonedit_train_runs_stage_0(run_dir, tmp_path):
    from tests.conftest import run_cli

    overrides = [o for o in SMALL]
    proc = run_cli("train", "--config", DEMO, "--stage", "0", "--start", run_dir / "model", "--data", run_dir / "data",
                   "--out", tmp_path / "pre", f"output_dir={tmp_path}", "pretrain.steps=1", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert "pretrain: 1 steps" in proc.stdout and (tmp_path / "pre" / "model" / "reasonedit.json").is_file()


# -- the reasoner's image size and the config ---------------------------------------------------------


def test_image_min_pixels_upscales_a_64px_render_to_4x4_tokens_and_survives_save_and_load(tmp_path):
    from reasonedit.config import load_config as load
    from reasonedit.models import prompts
    from reasonedit.models.model import ReasonEditModel

    image = ShapesWorld(world_config()).render(Scene("navy", (Shape(0, 0, "circle", "red", "large"),)))

    def tokens(model) -> int:
        ids = model.reasoner.processor.encode_one(prompts.read_scene(image, "What is in the top-left corner?"))
        return int((ids["input_ids"] == model.reasoner.processor.image_token_id).sum())

    _, cfg = load(DEMO, ["model.reasoner.image_min_pixels=12544"])
    model = ReasonEditModel.tiny(cfg.model, ["a red circle"], components=("reasoner",))
    assert tokens(model) == 16
    again = ReasonEditModel.from_pretrained(model.save_pretrained(tmp_path / "m"), components=("reasoner",))
    assert tokens(again) == 16
    _, default = load(DEMO)
    assert tokens(ReasonEditModel.tiny(default.model, ["a red circle"], components=("reasoner",))) == 4  # 56 px


def test_reasoner_rope_keys_are_saved_in_the_language_model_config_and_turn_image_columns_apart(tmp_path):
    """reasoner.rope_theta / mrope_section reach text_config.rope_parameters and survive save and load; with
    Qwen's defaults the fastest w frequency of a 32-dim head turns by under 1e-3 rad per image column."""
    from reasonedit.config import load_config as load
    from reasonedit.models.model import ReasonEditModel

    def fastest_w(model) -> float:
        text = model.reasoner.model.config.text_config
        t, h, _ = text.rope_parameters["mrope_section"]
        head = text.hidden_size // text.num_attention_heads
        return text.rope_parameters["rope_theta"] ** (-2 * (t + h) / head)

    base = ["model.reasoner.hidden_size=128", "model.reasoner.num_heads=4", "model.generator.joint_attention_dim=128"]
    _, default = load(DEMO, base + ["model.reasoner.rope_theta=1e6", "model.reasoner.mrope_section=null"])
    qwen = ReasonEditModel.tiny(default.model, ["a red circle"], components=("reasoner",))
    assert qwen.reasoner.model.config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    assert fastest_w(qwen) < 1e-3
    _, cfg = load(DEMO, base + ["model.reasoner.rope_theta=10", "model.reasoner.mrope_section=[2,7,7]"])
    model = ReasonEditModel.tiny(cfg.model, ["a red circle"], components=("reasoner",))
    again = ReasonEditModel.from_pretrained(model.save_pretrained(tmp_path / "m"), components=("reasoner",))
    rope = again.reasoner.model.config.text_config.rope_parameters
    assert rope["rope_theta"] == 10.0 and rope["mrope_section"] == [2, 7, 7]
    assert fastest_w(again) > 0.2


@pytest.mark.parametrize("override,key", [
    ("model.reasoner.rope_theta=1", "model.reasoner.rope_theta"),
    ("model.reasoner.mrope_section=[4,4,4]", "model.reasoner.mrope_section"),
    ("model.reasoner.mrope_section=[0,8,8]", "model.reasoner.mrope_section"),
    ("pretrain.questions_per_image=6", "pretrain.questions_per_image"),
    ("pretrain.reading_scenes=-1", "pretrain.reading_scenes"),
    ("pretrain.lr=0", "pretrain.lr"),
    ("pretrain.mix={caption:1.0}", "pretrain.mix"),
    ("model.reasoner.image_min_pixels=0", "model.reasoner.image_min_pixels"),
    ("model.reasoner.image_max_pixels=1000", "model.reasoner.image_min_pixels"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_stage_numbers_name_their_sections():
    from reasonedit.stages import STAGES, stage_for

    _, cfg = load_config(DEMO, ["pretrain.lr=5e-3"])
    assert STAGES[0].name == "pretrain" and stage_for(0, cfg).config.lr == 5e-3
    assert stage_for(1, cfg).config is cfg.stage1
    assert stage_for("rl", cfg).config is cfg.rl and type(stage_for(4, cfg)) is type(stage_for("rl", cfg))
    for bad in (5, "stage9"):
        with pytest.raises(ValueError, match="choose from"):
            stage_for(bad, cfg)


def test_the_tiny_tokenizer_merges_the_fixed_prompt_texts(run_dir):
    from reasonedit.models import prompts
    from reasonedit.models.model import ReasonEditModel

    tok = ReasonEditModel.from_pretrained(run_dir / "model", components=("reasoner",)).reasoner.tokenizer
    # the fixed texts are in the tokenizer's corpus often enough to be merged into words
    assert len(tok.encode(prompts.READ_TASK, add_special_tokens=False)) <= 10
    assert np.mean([len(tok.encode(w, add_special_tokens=False)) for w in ("assistant\n", "Question: ")]) <= 3
