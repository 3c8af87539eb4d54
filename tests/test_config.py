from pathlib import Path

import pytest
import yaml

from reasonedit.config import ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


def test_demo_config_merges_the_tiny_preset_and_resolves_interpolations():
    tree, cfg = load_config(DEMO)
    assert cfg.model.name == "tiny" and cfg.model.reasoner.hidden_size == 64
    assert cfg.output_dir == "runs/shapes_tiny"
    assert cfg.world.grid == 4 and isinstance(cfg.world.kinds, tuple)


def test_overrides_change_any_setting_with_its_type():
    _, cfg = load_config(DEMO, ["world.grid=7", "world.image_size=224", "data.splits=[train]", "name=x"])
    assert cfg.world.grid == 7 and cfg.data.splits == ("train",) and cfg.output_dir == "runs/x"


def test_a_mapping_override_replaces_the_files_mapping_and_a_section_override_merges():
    shapes_demo = ROOT / "configs" / "experiment" / "shapes_demo.yaml"
    _, cfg = load_config(shapes_demo)
    assert cfg.stage2.mix == {"edit_pair": 1.0}  # the file's
    _, cfg = load_config(shapes_demo, ["stage2.mix={text_to_image: 1.0}"])
    assert cfg.stage2.mix == {"text_to_image": 1.0}  # not {edit_pair: 1, text_to_image: 1}
    _, cfg = load_config(shapes_demo, ["stage2={steps: 70}"])  # a section is still merged key by key
    assert cfg.stage2.steps == 70 and cfg.stage2.mix == {"edit_pair": 1.0} and cfg.stage2.lr == 1e-3


def test_a_group_override_swaps_the_whole_preset():
    _, cfg = load_config(DEMO, ["model=qwen-image-edit", "model.path=/models/qwen-image-edit"])
    assert cfg.model.generator.num_layers == 60 and cfg.model.reasoner.hidden_size == 3584
    assert cfg.model.reasoner.vocab_size == 152064  # the real preset's vocabulary, not the tiny preset's 1024


def test_real_preset_without_a_path_says_which_key_to_set():
    with pytest.raises(ConfigError, match=r"qwen-image-edit.yaml: model.path: .*model.path=DIR"):
        load_config(DEMO, ["model=qwen-image-edit"])


@pytest.mark.parametrize("override,message", [
    ("world.gird=3", r"command-line override `world.gird=3`: unknown key 'world.gird' \(did you mean 'world.grid'\?\)"),
    ("world.grid=abc", r"key 'world.grid'.*could not be converted"),
    ("data.n=0", r"data.n: must be a positive"),
    ("model=nope", r"no model preset 'nope'"),
    ("steps=[data,fly]", r"steps: unknown \['fly'\]"),
    ("grid", r"expected key=value"),
])
def test_bad_overrides_name_the_key_and_their_source(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_bad_yaml_keys_name_the_file(tmp_path):
    (tmp_path / "experiment").mkdir()
    bad = tmp_path / "experiment" / "bad.yaml"
    bad.write_text("world:\n  image_size: 224\n  colours: [red]\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'world.colours' \(did you mean 'world.colors'\?\)"):
        load_config(bad)
    bad.write_text("world:\n  grid: [1, 2]\n")
    with pytest.raises(ConfigError, match=rf"{bad}: key 'world.grid'"):
        load_config(bad)


def test_semantic_errors_point_at_the_file_that_set_the_value(tmp_path):
    (tmp_path / "experiment").mkdir()
    f = tmp_path / "experiment" / "e.yaml"
    f.write_text("world:\n  image_size: 102\n")
    with pytest.raises(ConfigError, match=rf"{f}: world.image_size: 102 is not a multiple"):
        load_config(f)


def test_missing_file_and_invalid_yaml_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("world: [unclosed\n")
    with pytest.raises(ConfigError, match="x.yaml: not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_saved_config_reloads_to_the_same_settings(tmp_path):
    tree, cfg = load_config(DEMO, ["world.grid=8", "data.n=3"])
    path = save_config(tree, tmp_path / "config.yaml")
    doc = yaml.safe_load(path.read_text())
    assert doc["world"]["grid"] == 8 and doc["output_dir"] == "runs/shapes_tiny"
    _, again = load_config(path, root=ROOT / "configs")
    assert again == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")))
def test_every_packaged_experiment_loads_and_validates(name):
    path = ROOT / "configs" / "experiment" / f"{name}.yaml"
    if name == "paper":  # real weights: it names the one key a user must set, and loads once it is set
        with pytest.raises(ConfigError, match="model.path"):
            load_config(path)
        return
    _, cfg = load_config(path)
    assert cfg.name == name and cfg.steps
