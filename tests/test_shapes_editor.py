"""The exact shapes editor: it executes the synthesizer's concrete instructions byte for byte, leaves what it
cannot parse unchanged (counted by reason), makes errors on purpose at its error rate, and runs behind
`reasonedit serve --editor shapes` and `reasonedit eval --editor shapes`."""

import json
import math
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import ROOT, serving
from reasonedit.cli import main  # imported at collection: its ProgressLine binds the stderr it finds then
from reasonedit.shapes.oracle import Oracle
from reasonedit.shapes.world import Scene, Shape, ShapesWorld, WorldConfig
from reasonedit.shapes.editor import INJECTED_ERRORS, InstructionParseError, ShapesEditor, parse_instruction
from reasonedit.shapes.synth import Synthesizer
from reasonedit.inference.types import EditRequest

SMALL = WorldConfig(image_size=64, grid=4, kinds=("circle", "square", "triangle"),
                    colors=("red", "yellow", "green", "blue", "white"), backgrounds=("black", "navy"),
                    sizes=("small", "large"), min_shapes=1, max_shapes=4)


@pytest.fixture(scope="module")
def small():
    return ShapesWorld(SMALL)


def _requests(records, **kw):
    return [EditRequest(r.source, r.instruction, **kw) for r in records]


# -- exactness --------------------------------------------------------------------------------------
def test_the_oracle_reads_every_shape_of_the_small_world_exactly(small):
    oracle = Oracle(small)
    for background in SMALL.backgrounds:
        for kind in SMALL.kinds:
            for size in SMALL.sizes:
                scene = Scene(background, tuple(Shape(r, c, kind, color, size)
                                                for (r, c), color in zip(small.config.cells, SMALL.colors)))
                reading = oracle.read(small.render(scene))
                assert reading.scene == scene and not reading.unreadable, (background, kind, size)


@pytest.mark.parametrize("config", [WorldConfig(), SMALL], ids=["default_world", "small_world"])
def test_every_generated_concrete_edit_is_executed_byte_for_byte(config):
    world = ShapesWorld(config)
    records = [Synthesizer(world, seed=11).edit_pair("train", i) for i in range(2000)]
    editor = ShapesEditor(world)
    images = editor.edit(_requests(records))
    assert [i for i, (im, r) in enumerate(zip(images, records)) if not np.array_equal(im, r.target)] == []
    assert editor.stats.parsed == 2000 and not editor.stats.unparsed
    assert {r.meta["op"] for r in records} == {"recolor", "add", "remove", "move", "resize", "swap", "background"}


def test_multi_step_instructions_are_applied_in_order_each_step_on_the_scene_before_it(small):
    synth = Synthesizer(small, seed=5)
    records = [synth.thinking_pair("train", i) for i in range(300)]
    assert sum(len(r.steps) > 1 for r in records) > 50  # the check covers real multi-step instructions
    editor = ShapesEditor(small)
    images = editor.edit([EditRequest(r.image, r.concrete_instruction) for r in records])
    assert all(np.array_equal(im, r.target) for im, r in zip(images, records))
    assert editor.stats.parsed == 300


def test_steps_as_plain_sentences_or_lines_read_like_numbered_steps(small):
    synth = Synthesizer(small, seed=5)
    records = [r for r in (synth.thinking_pair("train", i) for i in range(100)) if len(r.steps) > 1]
    editor = ShapesEditor(small)
    for joiner in (" ", "\n"):
        images = editor.edit([EditRequest(r.image, joiner.join(r.steps)) for r in records])
        assert all(np.array_equal(im, r.target) for im, r in zip(images, records))


def test_case_and_surrounding_whitespace_do_not_matter(small):
    records = [Synthesizer(small, seed=2).edit_pair("val", i) for i in range(70)]
    editor = ShapesEditor(small)
    for change in (str.upper, str.lower, lambda t: f"  \n{t}\t "):
        images = editor.edit([EditRequest(r.source, change(r.instruction)) for r in records])
        assert all(np.array_equal(im, r.target) for im, r in zip(images, records))


# -- what it refuses ------------------------------------------------------------------------------------
def test_abstract_and_garbage_instructions_leave_the_source_unchanged_and_are_counted(small):
    synth = Synthesizer(small, seed=3)
    thinking = [synth.thinking_pair("train", i) for i in range(200)]
    garbage = ["", "   ", "asdf", "Make the red circle blue", "make it pop.", "Remove the.",
               "Step 2: Remove the circle.", "Remove the circle. Step 1: Remove the square.",
               "Move the circle to row 0, column 1.", "Paint the circle rouge."]
    sources = [r.image for r in thinking] + [thinking[0].image] * len(garbage)
    prompts = [r.abstract_instruction for r in thinking] + garbage
    editor = ShapesEditor(small)
    images = editor.edit([EditRequest(s, p) for s, p in zip(sources, prompts)])
    assert all(np.array_equal(im, s) for im, s in zip(images, sources))
    assert editor.stats.parsed == 0 and sum(editor.stats.unparsed.values()) == len(prompts)
    assert {"unknown_phrasing", "unknown_word"} <= set(editor.stats.unparsed)


def _scene_image(world, *shapes, background="black"):
    scene = Scene(background, tuple(Shape(*s) for s in shapes))
    return scene, world.render(scene)


@pytest.mark.parametrize("prompt, reason", [
    ("Remove the red circle.", "ambiguous_reference"),  # two red circles
    ("Remove the circle.", "ambiguous_reference"),
    ("Remove the green triangle.", "no_such_shape"),
    ("Remove the red circle at row 4, column 4.", "no_such_shape"),  # the cell is empty
    ("Remove the red circle at row 5, column 1.", "no_such_cell"),
    ("Make the blue square purple.", "outside_world"),  # purple is a colour, not one of this world's
    ("Make the blue square blue.", "invalid_edit"),  # changes nothing
    ("Add a small red circle in the top-left corner.", "invalid_edit"),  # occupied
    ("Step 1: Remove the blue square. Step 2: Make the blue square red.", "no_such_shape"),  # gone after step 1
    ("Make the blue square bluish.", "unknown_word"),
    ("Remove the red circle at the top-left corner.", "unknown_phrasing"),  # corners take "in"
])
def test_an_instruction_it_cannot_execute_returns_the_source_and_counts_why(small, prompt, reason):
    _, image = _scene_image(small, (0, 0, "circle", "red", "small"), (1, 1, "circle", "red", "large"),
                            (2, 2, "square", "blue", "small"))
    editor = ShapesEditor(small)
    assert np.array_equal(editor.edit([EditRequest(image, prompt)])[0], image)
    assert dict(editor.stats.unparsed) == {reason: 1} and editor.stats.parsed == 0


def test_parse_instruction_resolves_references_and_raises_its_own_error(small):
    scene, _ = _scene_image(small, (0, 0, "circle", "red", "small"), (1, 1, "circle", "red", "large"))
    edits = parse_instruction("Make the large red circle blue. Move the red circle in the top-left corner to "
                              "row 3, column 2.", scene, small)
    assert [e.to_dict() for e in edits] == [{"op": "recolor", "cell": [1, 1], "color": "blue"},
                                            {"op": "move", "cell": [0, 0], "to": [2, 1]}]
    with pytest.raises(InstructionParseError, match="fits 2 shapes") as err:
        parse_instruction("Remove the red circle.", scene, small)
    assert err.value.reason == "ambiguous_reference" and isinstance(err.value, ValueError)


def test_a_later_step_that_fails_undoes_nothing_it_applies_all_or_nothing(small):
    _, image = _scene_image(small, (0, 0, "circle", "red", "small"), (2, 2, "square", "blue", "small"))
    editor = ShapesEditor(small)
    out = editor.edit([EditRequest(image, "Step 1: Remove the square. Step 2: Remove the square.")])[0]
    assert np.array_equal(out, image) and dict(editor.stats.unparsed) == {"no_such_shape": 1}


def test_an_image_of_another_size_is_a_value_error_naming_both_sizes(small):
    with pytest.raises(ValueError, match=r"224x224 .* renders 64x64 \(world.image_size=64\)"):
        ShapesEditor(small).edit([EditRequest(np.zeros((224, 224, 3), np.uint8), "Remove the circle.")])


# -- errors on purpose ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def error_records(small):
    """1,000 concrete requests: 700 single edits and 300 multi-step instructions (thinking pairs' concrete side)."""
    synth = Synthesizer(small, seed=21)
    edits = [synth.edit_pair("val", i) for i in range(700)]
    multi = [synth.thinking_pair("val", 5 * i + 4) for i in range(300)]  # category multi_step
    records = [(r.source, r.instruction, r.meta) for r in edits] + [(r.image, r.concrete_instruction, r.meta)
                                                                     for r in multi]
    requests = [EditRequest(src, text, seed=i) for i, (src, text, _) in enumerate(records)]
    return requests, [m["target_scene"] for _, _, m in records]


def test_at_an_error_rate_that_share_of_outputs_is_wrong_and_every_error_type_occurs(small, error_records):
    requests, targets = error_records
    p, n = 0.3, len(requests)
    editor = ShapesEditor(small, error_rate=p, seed=1)
    images = editor.edit(requests)
    oracle = Oracle(small)
    wrong = [not oracle.score(im, Scene.from_dict(t)).success for im, t in zip(images, targets)]
    assert abs(sum(wrong) - p * n) <= 4 * math.sqrt(n * p * (1 - p)), sum(wrong)
    assert set(editor.stats.injected) == set(INJECTED_ERRORS), editor.stats.injected
    # every injected error is a real error, and nothing else is wrong
    outcomes = [ShapesEditor(small, error_rate=p, seed=1).outcome(r) for r in requests]
    assert wrong == [o.injected is not None for o in outcomes]
    assert sum(editor.stats.injected.values()) == sum(wrong) and editor.stats.parsed == n


def test_the_same_seed_gives_the_same_images_in_any_batch_order_and_another_seed_others(small, error_records):
    requests = error_records[0][:200]
    first = ShapesEditor(small, error_rate=0.5, seed=7).edit(requests)
    again = ShapesEditor(small, error_rate=0.5, seed=7).edit(requests[::-1])[::-1]
    one_by_one = [ShapesEditor(small, error_rate=0.5, seed=7).edit([r])[0] for r in requests[:20]]
    other = ShapesEditor(small, error_rate=0.5, seed=8).edit(requests)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(a, b) for a, b in zip(first, one_by_one))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_error_settings_are_checked_and_named(small):
    with pytest.raises(ValueError, match="error_rate"):
        ShapesEditor(small, error_rate=1.5)
    with pytest.raises(ValueError, match="error_types"):
        ShapesEditor(small, error_rate=0.1, error_types=("typo",))
    assert ShapesEditor(small).name == "shapes (exact)"
    assert ShapesEditor(small, error_rate=0.3).name == "shapes (exact, error rate 0.30)"


def test_the_editor_imports_and_edits_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from reasonedit.shapes.world import ShapesWorld\n"
            "from reasonedit.shapes.synth import Synthesizer\n"
            "from reasonedit.shapes.editor import ShapesEditor\n"
            "from reasonedit.inference.types import EditRequest\n"
            "w = ShapesWorld(); r = Synthesizer(w, 0).edit_pair('train', 0)\n"
            "assert (ShapesEditor(w).edit([EditRequest(r.source, r.instruction)])[0] == r.target).all()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- served over HTTP -------------------------------------------------------------------------------------
SERVED = WorldConfig(image_size=96)


@pytest.fixture(scope="module")
def shapes_server():
    with serving("--editor", "shapes", "world.image_size=96", "--no-auth", what="reasonedit serve --editor shapes") as url:
        yield url


def test_reasonedit_serve_editor_shapes_edits_over_http_byte_for_byte(shapes_server):
    from reasonedit.inference.http_editor import HttpEditor

    assert httpx.get(shapes_server + "/health").json()["editor"] == "shapes (exact)"
    record = Synthesizer(ShapesWorld(SERVED), seed=4).edit_pair("train", 3)
    with HttpEditor(shapes_server) as editor:
        edited = editor.edit([EditRequest(record.source, record.instruction)])[0]
    np.testing.assert_array_equal(edited, record.target)


def test_the_shapes_service_answers_422_for_an_image_of_another_world(shapes_server):
    from reasonedit.clients.http import ServiceError
    from reasonedit.inference.http_editor import HttpEditor

    with HttpEditor(shapes_server) as editor, pytest.raises(ServiceError, match="422.*64x64 but this shapes world "
                                                                                 "renders 96x96"):
        editor.edit([EditRequest(np.zeros((64, 64, 3), np.uint8), "Remove the circle.")])


@pytest.mark.parametrize("args, words", [
    (["--model", "somewhere", "--error-rate", "0.3"], "--error-rate: only with --editor shapes"),
    (["--editor", "shapes", "data.n=5"], "data.n=5: the shapes editor takes world settings only"),
    (["--editor", "shapes", "--error-rate", "2"], "--error-rate 2.0: must lie in [0, 1]"),
])
def test_reasonedit_serve_names_a_shapes_setting_it_cannot_use(args, words, capsys):
    assert main(["serve", *args]) == 1
    assert words in capsys.readouterr().err


# -- in the eval harness ----------------------------------------------------------------------------------
def test_eval_with_the_shapes_editor_and_a_thinker_model_stamps_both(tiny_model_dir, small_dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--bench", "shapes", "--data", str(small_dataset), "--editor", "shapes", "--thinker-model",
                 str(tiny_model_dir), "--modes", "base,think,think_reflect", "--limit", "2", "--rounds", "2",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    doc = json.loads((out / "results.json").read_text())
    assert doc["stamp"]["editor"] == "shapes (exact)"
    assert doc["stamp"]["thinker"] == f"reasonedit-reasoner ({tiny_model_dir})"
    assert f"editor shapes (exact) | thinker reasonedit-reasoner ({tiny_model_dir})" in printed.out
    for mode, entry in doc["modes"].items():
        assert entry["report"]["counts"] == {"total": 4, "ok": 4, "missing": 0, "failed": 0}, mode
    base = doc["modes"]["base"]["report"]["sections"]["all"]["by_category"]
    # concrete instructions are executed exactly; abstract ones are not parsed, so the source stays
    assert base["concrete"]["success"] == 100.0 and base["abstract"]["success"] == 0.0
    assert "shapes (exact): " in printed.err and "not parsed" in printed.err


@pytest.mark.parametrize("extra, words", [
    (["--editor", "http://127.0.0.1:9", "--editor-error-rate", "0.2"], "--editor-error-rate: only the shapes editor"),
    (["--editor", "shapes", "--editor-error-rate", "1.5"], "--editor-error-rate 1.5: must lie in [0, 1]"),
    (["--editor", "shapes", "--thinker-model", "gpt-4o", "--modes", "think"], "--thinker-model gpt-4o: without "
                                                                             "--thinker URL it names a model folder"),
    (["--editor", "shapes", "--modes", "think"], "needs a thinker"),
])
def test_eval_names_a_shapes_editor_setting_it_cannot_use(extra, words, tmp_path, capsys):
    assert main(["eval", "--bench", "shapes", *extra, "--limit", "1", "--out", str(tmp_path / "out")]) == 1
    assert words in capsys.readouterr().err


def test_eval_refuses_the_shapes_editor_on_another_benchmark(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "gedit"
    root.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "in0.png")
    row = {"key": "k0", "task_type": "color_alter", "instruction": "edit", "instruction_language": "en",
           "input_image": "in0.png", "input_image_raw": "in0.png", "Intersection_exist": True}
    (root / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    code = main(["eval", "--bench", "gedit", "--data", str(root), "--editor", "shapes", "--judge-url",
                 "http://127.0.0.1:9/v1", "--judge-model", "j", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "use it with --bench shapes, not gedit" in err, err


@pytest.mark.parametrize("error_rate, concrete_success", [(0.0, 100.0), (1.0, 0.0)])
def test_the_ablation_takes_the_shapes_editor_and_its_error_rate(error_rate, concrete_success, small_dataset, tmp_path):
    from reasonedit.eval.ablation import run_shapes_ablation

    ablation = run_shapes_ablation(None, small_dataset, tmp_path / "ablation", modes=("base",), limit=3,
                                   editor="shapes", error_rate=error_rate)
    cats = ablation.reports["base"]["sections"]["all"]["by_category"]
    assert cats["concrete"]["success"] == concrete_success and cats["abstract"]["success"] == 0.0
    assert ablation.editor == ShapesEditor(None, error_rate=error_rate).name and ablation.thinker is None
    assert ablation.editor_stats["parsed"] == 3 and sum(ablation.editor_stats["unparsed"].values()) == 3
