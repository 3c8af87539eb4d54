import itertools
import random

import numpy as np
import pytest

from reasonedit.shapes.world import (KINDS, PALETTE, SIZES, Edit, EditError, Scene, Shape, ShapesWorld, WorldConfig,
                                    apply_edit, random_edit, shape_mask)


def test_render_is_deterministic_and_uses_only_palette_colours(world):
    scene = world.random_scene(random.Random(1), 6)
    a, b = world.render(scene), world.render(scene)
    assert a.tobytes() == b.tobytes()
    colours = {tuple(c) for c in a.reshape(-1, 3)}
    assert colours == {PALETTE[scene.background]} | {PALETTE[s.color] for s in scene.shapes}


def test_default_image_gives_the_reasoner_2x2_tokens_per_cell(world):
    # Qwen2.5-VL sees one token per 28x28 block: a cell must be a whole number of blocks.
    assert world.config.image_size % 28 == 0 and world.config.cell_px % 28 == 0
    assert (world.config.image_size // 28) ** 2 == 64


@pytest.mark.parametrize("cell", [56, 28, 16])
def test_every_shape_template_is_distinct_and_inside_its_cell(cell):
    masks = {(k, z): shape_mask(k, z, cell) for k in KINDS for z in SIZES}
    for m in masks.values():
        assert m.sum() > 0
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())  # a background gutter
    for a, b in itertools.combinations(masks, 2):
        assert not np.array_equal(masks[a], masks[b]), (a, b)


def test_each_scene_samples_one_to_six_shapes_on_distinct_cells(world):
    rng = random.Random(0)
    counts = set()
    for _ in range(300):
        s = world.random_scene(rng)
        counts.add(len(s.shapes))
        assert len({sh.cell for sh in s.shapes}) == len(s.shapes)
        assert all(sh.color != s.background for sh in s.shapes)
    assert counts == set(range(1, 7))


def test_edits_change_exactly_what_they_name():
    scene = Scene("white", (Shape(0, 0, "circle", "red", "small"), Shape(1, 1, "star", "blue", "large")))
    assert apply_edit(scene, Edit("recolor", cell=(0, 0), color="green")).shape_at((0, 0)).color == "green"
    moved = apply_edit(scene, Edit("move", cell=(0, 0), to=(3, 3)))
    assert moved.shape_at((0, 0)) is None and moved.shape_at((3, 3)).kind == "circle"
    swapped = apply_edit(scene, Edit("swap", cell=(0, 0), to=(1, 1)))
    assert swapped.shape_at((0, 0)).kind == "star" and swapped.shape_at((1, 1)).kind == "circle"
    assert apply_edit(scene, Edit("background", color="black")).background == "black"
    assert len(apply_edit(scene, Edit("remove", cell=(1, 1))).shapes) == 1
    added = apply_edit(scene, Edit("add", cell=(2, 2), kind="hexagon", color="pink", size="medium"))
    assert added.shape_at((2, 2)) == Shape(2, 2, "hexagon", "pink", "medium")


@pytest.mark.parametrize("edit", [
    Edit("recolor", cell=(0, 0), color="red"),           # no change
    Edit("recolor", cell=(0, 0), color="white"),         # background colour
    Edit("move", cell=(0, 0), to=(1, 1)),                # occupied
    Edit("remove", cell=(2, 2)),                         # nothing there
    Edit("background", color="blue"),                    # clashes with a shape
    Edit("add", cell=(1, 1), kind="star", color="red", size="small"),
])
def test_invalid_or_no_op_edits_are_refused(edit):
    scene = Scene("white", (Shape(0, 0, "circle", "red", "small"), Shape(1, 1, "star", "blue", "large")))
    with pytest.raises(EditError):
        apply_edit(scene, edit)


def test_random_edit_covers_every_op(world):
    rng = random.Random(3)
    ops = {random_edit(world, world.random_scene(rng, 4), rng).op for _ in range(300)}
    assert ops == {"recolor", "add", "remove", "move", "resize", "swap", "background"}


@pytest.mark.parametrize("kwargs,key", [
    ({"image_size": 225}, "world.image_size"), ({"grid": 1}, "world.grid"), ({"max_shapes": 20}, "world.max_shapes"),
    ({"kinds": ("circle", "blob")}, "world.kinds"), ({"image_size": 40, "grid": 4}, "world.image_size"),
])
def test_bad_world_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ShapesWorld(WorldConfig(**kwargs))


def test_scene_key_is_content_addressed():
    a = Scene("white", (Shape(1, 1, "star", "blue", "large"), Shape(0, 0, "circle", "red", "small")))
    b = Scene("white", (Shape(0, 0, "circle", "red", "small"), Shape(1, 1, "star", "blue", "large")))
    assert a == b and a.key() == b.key()
    assert Scene.from_dict(a.to_dict()) == a
    assert a.key() != Scene("black", a.shapes).key()
