"""The output folders hold exactly the files each benchmark's official scoring script opens: for each benchmark a
tiny copy in its official layout is edited (the "editor" returns its source), and the files written under
<images>/<model> are compared with the paths the official script builds, written here from its own path
templates (not from our benchmark classes):

- GEdit-Bench, stepfun-ai/Step1X-Edit GEdit-Bench/test_gedit_score.py (commit 570eba6e, lines 122-125):
  {save_path}/fullset/{task_type}/{instruction_language}/{key}.png and {key}_SRCIMG.png, save_path =
  <save_path_dir>/<model>; a sample without either is skipped.
- ImgEdit-Bench, PKU-YuanGroup/ImgEdit Benchmark/Basic/basic_bench.py (commit 547185d1, line 58):
  <result_img_folder>/{key}.png.
- KRIS-Bench, mercurystraw/Kris_Bench metrics_common.py / metrics_knowledge.py / metrics_multi_element.py /
  metrics_temporal_prediction.py: results/{model}/{category}/{image_id}.jpg; EditThinker's copy
  (appletea233/EditThinker eval/kris/metrics_common.py, commit 803d1a79): {results_dir}/{category}/{image_id}.png.
- RISEBench, PhoenixZ810/RISEBench gpt_eval.py find_image (commit ce8cba37): {output}/images/{category}/{index}.png
  (then .jpg, .jpeg), output = outputs/<model>.
"""

import json

import numpy as np
import pytest
from PIL import Image

from reasonedit.eval.benchmarks import get_benchmark
from reasonedit.eval.paths import OutsidePathError
from reasonedit.eval.runner import JPEG_QUALITY, GenerationSettings, generate

MODEL = "my-model"


class SourceEditor:
    """Returns each source unchanged and counts the edits asked for."""

    name = "source"

    def __init__(self):
        self.calls = 0

    def edit(self, requests):
        self.calls += len(requests)
        return [np.asarray(r.image) for r in requests]


def picture(path, seed):
    """A small noisy RGB image (noise, so a lossy encoding shows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path)
    return path


def written(images, model=MODEL):
    """Every file generation left under <images>/<model>, as paths relative to it (the run stamp aside)."""
    root = images / model
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def run(bench, images, editor=None):
    editor = editor or SourceEditor()
    stats = generate(bench, editor, None, images, MODEL, GenerationSettings(steps=1, batch_size=4))
    return editor, stats


# -- GEdit ----------------------------------------------------------------------------------------------------------
GEDIT_ROWS = [
    {"key": "a1", "task_type": "color_alter", "instruction": "make it blue", "instruction_language": "en",
     "input_image": "judged/a1.png", "input_image_raw": "raw/a1.png", "Intersection_exist": True},
    {"key": "a1", "task_type": "color_alter", "instruction": "变成蓝色", "instruction_language": "cn",
     "input_image": "judged/a1.png", "input_image_raw": "raw/a1.png", "Intersection_exist": True},
    {"key": "b2", "task_type": "subject-add", "instruction": "add a cat", "instruction_language": "en",
     "input_image": "judged/b2.png", "input_image_raw": "raw/b2.png", "Intersection_exist": False},
]


def gedit_data(root):
    for i, r in enumerate(GEDIT_ROWS):
        picture(root / r["input_image"], i)
        picture(root / r["input_image_raw"], 100 + i)  # the model edits the raw image; the judge sees the other
    (root / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GEDIT_ROWS))
    return root


def test_gedit_folder_holds_each_edit_and_its_srcimg_as_test_gedit_score_opens_them(tmp_path):
    data = gedit_data(tmp_path / "gedit")
    bench = get_benchmark("gedit").load(data)
    run(bench, tmp_path / "images")
    official = set()
    for r in GEDIT_ROWS:
        folder = f"fullset/{r['task_type']}/{r['instruction_language']}"
        official |= {f"{folder}/{r['key']}.png", f"{folder}/{r['key']}_SRCIMG.png"}
    assert written(tmp_path / "images") == official
    # the source beside the edit is the judged input_image, pixel for pixel (the official example saves it as PNG)
    src = tmp_path / "images" / MODEL / "fullset/color_alter/cn/a1_SRCIMG.png"
    assert Image.open(src).format == "PNG"
    assert np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(data / "judged/a1.png")))


def test_gedit_srcimg_is_added_to_a_folder_made_before_it_without_editing_again(tmp_path):
    bench = get_benchmark("gedit").load(gedit_data(tmp_path / "gedit"))
    run(bench, tmp_path / "images")
    for p in (tmp_path / "images" / MODEL).rglob("*_SRCIMG.png"):
        p.unlink()  # a folder written before <key>_SRCIMG.png was part of the layout
    editor, stats = run(bench, tmp_path / "images")
    assert editor.calls == 0 and stats.done_before == 3 and stats.companions == 3
    assert len(list((tmp_path / "images" / MODEL).rglob("*_SRCIMG.png"))) == 3


def test_gedit_srcimg_path_is_proved_inside_the_images_folder(tmp_path):
    bench = get_benchmark("gedit").load(gedit_data(tmp_path / "gedit"))
    run(bench, tmp_path / "images")
    target = tmp_path / "images" / MODEL / "fullset/subject-add/en/b2_SRCIMG.png"
    target.unlink()
    target.symlink_to(tmp_path / "elsewhere.png")  # a dangling link leading out of the images folder
    with pytest.raises(OutsidePathError, match="b2_SRCIMG.png"):
        run(bench, tmp_path / "images")
    assert not (tmp_path / "elsewhere.png").exists()


# -- ImgEdit --------------------------------------------------------------------------------------------------------
def test_imgedit_folder_holds_key_png_as_basic_bench_opens_it(tmp_path):
    root = tmp_path / "ie"
    edits = {"1082": {"id": "animal/1.jpg", "prompt": "smooth the shell", "edit_type": "adjust"},
             "673": {"id": "style/2.jpg", "prompt": "make it ukiyo-e", "edit_type": "style"}}
    for i, rec in enumerate(edits.values()):
        picture(root / rec["id"], i)
    (root / "basic_edit.json").write_text(json.dumps(edits))
    (root / "prompts.json").write_text(json.dumps({"adjust": "rate <edit_prompt>", "style": "rate <edit_prompt>"}))
    run(get_benchmark("imgedit").load(root), tmp_path / "images")
    assert written(tmp_path / "images") == {f"{key}.png" for key in edits}


# -- KRIS -----------------------------------------------------------------------------------------------------------
KRIS_CATEGORIES = ("color_change", "multi-element_composition")


def kris_data(root):
    for c, cat in enumerate(KRIS_CATEGORIES):
        ann = {}
        for i in ("1", "2"):
            names = [f"{i}{x}.png" for x in "abc"] if cat == "multi-element_composition" else [f"{i}.png"]
            for k, name in enumerate(names):
                picture(root / cat / name, 10 * c + k + int(i))
            ann[i] = {"ori_img": names if len(names) > 1 else names[0], "ins_en": f"edit {cat} {i}"}
        (root / cat / "annotation.json").write_text(json.dumps(ann))
    return root


def kris_official(ext):
    return {f"{cat}/{i}.{ext}" for cat in KRIS_CATEGORIES for i in ("1", "2")}


def test_kris_folder_holds_image_id_jpg_as_the_official_metrics_scripts_open_it(tmp_path):
    data = kris_data(tmp_path / "k")
    run(get_benchmark("kris", categories=KRIS_CATEGORIES).load(data), tmp_path / "images")
    assert written(tmp_path / "images") == kris_official("jpg")
    out = tmp_path / "images" / MODEL / "color_change/1.jpg"
    source = np.asarray(Image.open(data / "color_change/1.png"), dtype=float)
    assert Image.open(out).format == "JPEG" and JPEG_QUALITY == 95
    # quality 95 with full-resolution chroma: close to, not equal to, the PNG of the same pixels
    diff = np.abs(np.asarray(Image.open(out), dtype=float) - source)
    assert 0 < diff.mean() < 8


def test_kris_ext_png_writes_lossless_png_as_editthinkers_copy_opens_it(tmp_path):
    data = kris_data(tmp_path / "k")
    run(get_benchmark("kris", categories=KRIS_CATEGORIES, ext="png").load(data), tmp_path / "images")
    # EditThinker's scripts take --results_dir <images>/<model> and open <category>/<image_id>.png under it
    assert written(tmp_path / "images") == kris_official("png")
    out = tmp_path / "images" / MODEL / "color_change/2.png"
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(data / "color_change/2.png")))


def test_kris_png_edits_of_an_earlier_run_are_re_encoded_to_jpg_not_edited_again(tmp_path):
    data = kris_data(tmp_path / "k")
    run(get_benchmark("kris", categories=KRIS_CATEGORIES, ext="png").load(data), tmp_path / "images")
    editor, stats = run(get_benchmark("kris", categories=KRIS_CATEGORIES).load(data), tmp_path / "images")
    assert editor.calls == 0 and stats.converted == 4 and stats.done_before == 4
    assert kris_official("jpg") <= written(tmp_path / "images")  # the .png files stay where they were


def test_kris_ext_is_a_kris_option_of_the_eval_command(tmp_path, monkeypatch):
    import argparse

    from reasonedit.eval import cli
    from reasonedit.eval.benchmarks.kris import KrisBenchmark
    monkeypatch.setattr(KrisBenchmark, "load", lambda self, data: self)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli._bench(parser.parse_args(["--bench", "kris", "--kris-ext", "png"])).ext == "png"
    assert cli._bench(parser.parse_args(["--bench", "kris"])).ext == "jpg"
    with pytest.raises(ValueError, match="--kris-ext: only kris"):
        cli._bench(parser.parse_args(["--bench", "rise", "--kris-ext", "png", "--data", str(tmp_path)]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--bench", "kris", "--kris-ext", "webp"])


# -- RISE -----------------------------------------------------------------------------------------------------------
RISE_ITEMS = [
    {"index": "temporal_reasoning_1", "category": "temporal_reasoning", "instruction": "a year later",
     "image": "temporal_reasoning_images/1.png", "reference": "a rotten banana"},
    {"index": 7, "category": "logical_reasoning", "instruction": "solve it", "image": "logical_reasoning_images/7.png",
     "reference_txt": "3"},
    {"index": "s2", "category": "spatial_reasoning", "instruction": "assemble", "image": "spatial_reasoning_images/2.png",
     "reference_img": "spatial_reasoning_images/2_ref.png", "consistency_free": True},
]


def test_rise_folder_holds_images_category_index_png_as_gpt_eval_finds_it(tmp_path):
    root = tmp_path / "r"
    for i, it in enumerate(RISE_ITEMS):
        for field in ("image", "reference_img"):
            if field in it:
                picture(root / it[field], i)
    (root / "datav2_total_w_subtask.json").write_text(json.dumps(RISE_ITEMS))
    bench = get_benchmark("rise").load(root)
    run(bench, tmp_path / "images")
    assert written(tmp_path / "images") == {f"images/{it['category']}/{it['index']}.png" for it in RISE_ITEMS}
    # gpt_eval.py opens .jpg too: an edit saved so elsewhere counts as done and is left as it is
    done = tmp_path / "images" / MODEL / "images/temporal_reasoning/temporal_reasoning_1.png"
    Image.open(done).save(done.with_suffix(".jpg"))
    done.unlink()
    editor, stats = run(bench, tmp_path / "images")
    assert editor.calls == 0 and stats.converted == 0 and not done.exists()
