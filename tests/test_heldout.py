"""Held-out learning figures (reasonedit.eval.heldout), the trainer's periodic evaluation and the curves PNG."""

import json

import numpy as np
import pytest

from reasonedit.shapes.world import Scene, Shape, ShapesWorld, WorldConfig
from reasonedit.shapes.synth import Synthesizer
from reasonedit.eval.heldout import HeldOut, copy_figures, figures_table, generator_figures, think_figures

SMALL = WorldConfig(image_size=64, grid=4, kinds=("circle", "square", "triangle"),
                    colors=("red", "yellow", "green", "blue", "white"), backgrounds=("black", "navy"),
                    sizes=("small", "large"), min_shapes=1, max_shapes=4)


@pytest.fixture(scope="module")
def small():
    world = ShapesWorld(SMALL)
    synth = Synthesizer(world, seed=3)
    return world, [synth.edit_pair("val", i) for i in range(40)], [synth.thinking_pair("val", i) for i in range(30)]


class SourceEditor:
    """Returns every source unchanged: keeps every cell, carries out no edit."""
    name = "identity"

    def edit(self, requests):
        return [r.image.copy() for r in requests]


class NoiseEditor:
    name = "noise"

    def edit(self, requests):
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, r.image.shape, dtype=np.uint8) for r in requests]


def test_copy_figures_count_only_the_cells_the_instruction_leaves_alone():
    source = Scene("black", (Shape(0, 0, "circle", "red", "small"), Shape(1, 1, "square", "blue", "large")))
    target = Scene("black", (Shape(0, 0, "circle", "green", "small"), Shape(1, 1, "square", "blue", "large")))
    assert copy_figures(target, source, target) == (1, 1, True)
    moved = Scene("black", (Shape(0, 0, "circle", "green", "small"), Shape(2, 2, "square", "blue", "large")))
    assert copy_figures(moved, source, target) == (0, 2, False)  # (1,1) lost, (2,2) appeared
    wrong_background = Scene("navy", target.shapes)
    assert copy_figures(wrong_background, source, target)[2] is False


def test_the_exact_editor_scores_everything_and_the_source_scores_copy_only(small):
    from reasonedit.shapes.editor import ShapesEditor
    world, edits, _ = small
    exact = generator_figures(ShapesEditor(world), edits, world)
    assert exact["concrete"] == 1.0 and exact["copy"] == 1.0 and exact["score"] == 10.0
    same = generator_figures(SourceEditor(), edits, world)
    assert same["concrete"] == 0.0 and same["score"] == pytest.approx(same["source_score"])
    # a background edit changes no cell but the background: returning the source then fails to copy nothing
    assert same["copy_cells"] == 1.0 and 0.5 < same["copy"] <= 1.0
    noise = generator_figures(NoiseEditor(), edits, world)
    assert noise["copy"] < 0.1 and noise["concrete"] == 0.0 and noise["score"] < same["score"]


def test_think_figures_execute_the_thought_with_the_exact_editor(small):
    world, _, pairs = small

    class Oracle:
        name = "oracle-thinker"

        def think(self, sources, instructions):
            assert list(instructions) == [p.abstract_instruction for p in pairs]
            return [p.concrete_instruction for p in pairs]  # the right steps, in the order asked

    class Parrot:
        name = "parrot"

        def think(self, sources, instructions):
            return list(instructions)  # the abstract instruction itself: the shapes grammar cannot run it

    assert think_figures(Oracle(), pairs, world) == {"think": 1.0, "think_parse": 1.0}
    assert think_figures(Parrot(), pairs, world)["think"] < 0.2


def test_heldout_loads_a_fixed_split_and_names_a_missing_one(tmp_path):
    from reasonedit.shapes.synth import SynthConfig, synthesize
    synthesize(tmp_path / "d", SynthConfig(n=6, seed=1, shard_size=6, splits=("train", "val")), ShapesWorld(SMALL))
    held = HeldOut.load(tmp_path / "d", split="val", n=4)
    assert len(held.edits) == len(held.thinking) == len(held.reflections) == 4
    assert [r.key for r in held.edits] == [r.key for r in HeldOut.load(tmp_path / "d", split="val", n=4).edits]
    with pytest.raises(FileNotFoundError, match="test"):
        HeldOut.load(tmp_path / "d", split="test")


def test_figures_table_prints_percentages_and_scores():
    table = figures_table({"copy": 0.8125, "score": 7.25, "decision": 0.5})
    assert "81.2 %" in table and "7.25" in table and "50.0 %" in table and "think" not in table


def test_curves_png_from_stage_histories_and_evals(tmp_path):
    from reasonedit.eval.curves import collect, plot_curves
    assert plot_curves(tmp_path) is None
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "history.json").write_text(json.dumps([{"ntp": 3.0 - 0.1 * i, "loss": 1.0} for i in range(10)]))
    (tmp_path / "stage1" / "evals.json").write_text(json.dumps([{"step": 0, "think": 0.0}, {"step": 10, "think": 0.4}]))
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "history.json").write_text(json.dumps([{"fm": 1.0 / (i + 1)} for i in range(5)]))
    stages = collect(tmp_path)
    assert [s["stage"] for s in stages] == ["stage1", "stage2"] and stages[1]["offset"] == 10
    png = plot_curves(tmp_path)
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
