import random

import numpy as np
import pytest

from reasonedit.shapes.oracle import Oracle, decide, scene_errors, score_from_errors
from reasonedit.shapes.world import Edit, Scene, Shape, apply_edit, apply_edits

SOURCE = Scene("white", (Shape(0, 0, "circle", "red", "small"), Shape(1, 2, "star", "blue", "large"),
                         Shape(3, 3, "circle", "green", "medium")))
TARGET = apply_edit(SOURCE, Edit("recolor", cell=(0, 0), color="yellow"))  # make the red circle yellow


def kinds(errors):
    return sorted(e.kind for e in errors)


def test_exact_target_is_success_ten():
    assert scene_errors(TARGET, TARGET) == []
    assert score_from_errors(0) == 10
    assert decide(SOURCE, TARGET, []) == "Success"


def test_wrong_colour_is_one_error_and_a_reflection():
    cand = apply_edit(SOURCE, Edit("recolor", cell=(0, 0), color="orange"))
    errs = scene_errors(cand, TARGET)
    assert kinds(errs) == ["wrong_color"]
    assert decide(SOURCE, cand, errs) == "Reflection"
    assert apply_edit(cand, errs[0].fix()) == TARGET
    assert score_from_errors(len(errs)) == 7


def test_unchanged_source_is_failed_even_with_one_error():
    errs = scene_errors(SOURCE, TARGET)
    assert kinds(errs) == ["wrong_color"]
    assert decide(SOURCE, SOURCE, errs) == "Failed"


def test_wrong_object_is_two_errors_and_failed():
    cand = apply_edit(SOURCE, Edit("recolor", cell=(3, 3), color="yellow"))  # the other circle
    errs = scene_errors(cand, TARGET)
    assert len(errs) == 2
    assert decide(SOURCE, cand, errs) == "Failed"


def test_a_swap_costs_two_moves_and_a_move_costs_one():
    swapped = apply_edit(SOURCE, Edit("swap", cell=(0, 0), to=(1, 2)))
    assert kinds(scene_errors(swapped, SOURCE)) == ["wrong_position", "wrong_position"]
    moved = apply_edit(SOURCE, Edit("move", cell=(1, 2), to=(2, 0)))
    assert kinds(scene_errors(moved, SOURCE)) == ["wrong_position"]


def test_missing_extra_and_background_errors_are_named():
    cand = Scene("black", SOURCE.shapes[:2] + (Shape(2, 2, "square", "pink", "small"),))
    assert kinds(scene_errors(cand, SOURCE)) == ["extra", "missing", "wrong_background"]


def test_a_different_kind_is_a_removal_and_an_addition():
    cand = Scene("white", (Shape(0, 0, "square", "red", "small"),) + SOURCE.shapes[1:])
    assert kinds(scene_errors(cand, SOURCE)) == ["extra", "missing"]


def test_single_error_fix_always_restores_the_target(world):
    """Any one-atomic-edit deviation from a scene is found, and its fix edit undoes it."""
    from reasonedit.shapes.world import random_edit
    rng = random.Random(11)
    for _ in range(300):
        target = world.random_scene(rng)
        edit = random_edit(world, target, rng, ops=("recolor", "add", "remove", "move", "resize", "background"))
        cand = apply_edit(target, edit)
        errs = scene_errors(cand, target)
        assert len(errs) == 1, (edit, errs)
        assert apply_edit(cand, errs[0].fix()) == target


def test_error_count_is_symmetric_and_zero_only_for_equal_scenes(world):
    rng = random.Random(5)
    for _ in range(200):
        a, b = world.random_scene(rng), world.random_scene(rng)
        assert len(scene_errors(a, b)) == len(scene_errors(b, a))
        assert (len(scene_errors(a, b)) == 0) == (a == b)


def test_read_recovers_every_random_scene_exactly(world):
    oracle, rng = Oracle(world), random.Random(2)
    for _ in range(200):
        scene = world.random_scene(rng)
        reading = oracle.read(world.render(scene))
        assert reading.scene == scene and reading.min_iou == 1.0 and not reading.unreadable


def test_read_tolerates_pixel_noise(world):
    oracle, rng = Oracle(world), random.Random(4)
    noise = np.random.default_rng(0)
    for _ in range(20):
        scene = world.random_scene(rng)
        img = world.render(scene).astype(int) + noise.integers(-25, 26, (224, 224, 3))
        assert oracle.read(np.clip(img, 0, 255).astype(np.uint8)).scene == scene


def test_score_uses_source_pixels_for_the_decision(world):
    oracle = Oracle(world)
    rep = oracle.score(world.render(SOURCE), TARGET, source=world.render(SOURCE))
    assert (rep.success, rep.score, rep.decision) == (False, 7, "Failed")
    assert rep.reasons(world.config.grid) == ["the red circle in the top-left corner should be yellow"]


def test_wrong_image_size_names_the_setting(world):
    with pytest.raises(ValueError, match="world.image_size"):
        Oracle(world).read(np.zeros((64, 64, 3), np.uint8))


def test_multi_step_errors_count_each_step(world):
    steps = [Edit("recolor", cell=(0, 0), color="yellow"), Edit("background", color="black")]
    target = apply_edits(SOURCE, steps)
    assert len(scene_errors(SOURCE, target)) == 2
