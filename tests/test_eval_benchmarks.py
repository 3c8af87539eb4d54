"""Benchmark readers on tiny fixture directories in each official layout, and bad layouts."""

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reasonedit.eval.benchmark import BenchmarkDataError
from reasonedit.eval.benchmarks import get_benchmark
from reasonedit.eval.benchmarks import kris as kris_mod


def png(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(path)
    return path


def test_unknown_benchmark_names_the_choices():
    with pytest.raises(ValueError, match="gedit.*imgedit.*kris.*rise.*shapes"):
        get_benchmark("nope")


# -- GEdit --------------------------------------------------------------------------------------------
def gedit_dir(root, rows=None):
    rows = rows or [
        {"key": "k1", "task_type": "color_alter", "instruction": "make it blue", "instruction_language": "en",
         "input_image": "img/k1.png", "input_image_raw": "raw/k1.png", "Intersection_exist": True},
        {"key": "k1", "task_type": "color_alter", "instruction": "把它变成蓝色", "instruction_language": "cn",
         "input_image": "img/k1.png", "input_image_raw": "raw/k1.png", "Intersection_exist": True},
        {"key": "k2", "task_type": "subject-add", "instruction": "add a cat", "instruction_language": "en",
         "input_image": "img/k2.png", "input_image_raw": "raw/k2.png", "Intersection_exist": False},
    ]
    for r in rows:
        for f in ("input_image", "input_image_raw"):
            if isinstance(r.get(f), str):
                png(root / r[f])
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return root


def test_gedit_reads_both_languages_and_writes_the_official_output_layout(tmp_path):
    bench = get_benchmark("gedit").load(gedit_dir(tmp_path / "gedit"))
    s = bench.samples()
    assert [(x.key, x.language, x.meta["intersection"]) for x in s] == [
        ("k1_en", "en", True), ("k1_cn", "cn", True), ("k2_en", "en", False)]
    assert bench.output_path(tmp_path / "out", s[1], "m") == tmp_path / "out/m/fullset/color_alter/cn/k1.png"
    sc, pq = bench.judge_queries(s[0], tmp_path / "e.png")
    # semantic consistency sees the judged input then the edit; perceptual quality the edit alone
    assert sc.images == [tmp_path / "gedit/img/k1.png", tmp_path / "e.png"] and pq.images == [tmp_path / "e.png"]
    assert "make it blue" in sc.prompt and sc.metrics == ("sc_instruction", "sc_overedit")


def test_gedit_language_filter(tmp_path):
    bench = get_benchmark("gedit", languages=["en"]).load(gedit_dir(tmp_path / "g"))
    assert [x.key for x in bench.samples()] == ["k1_en", "k2_en"]


@pytest.mark.parametrize("change, match", [
    (lambda r: r.pop("Intersection_exist"), "metadata.jsonl:1: missing field 'Intersection_exist'"),
    (lambda r: r.update(task_type="juggling"), "field 'task_type' is 'juggling'"),
    (lambda r: r.update(input_image_raw="raw/none.png"), "field 'input_image_raw' names .*none.png"),
])
def test_gedit_bad_rows_name_the_line_and_field(tmp_path, change, match):
    row = {"key": "k1", "task_type": "color_alter", "instruction": "x", "instruction_language": "en",
           "input_image": "img/k1.png", "input_image_raw": "raw/k1.png", "Intersection_exist": True}
    png(tmp_path / "img/k1.png"), png(tmp_path / "raw/k1.png")
    change(row)
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchmarkDataError, match=match):
        get_benchmark("gedit").load(tmp_path)


def test_gedit_directory_without_metadata_or_data_files_says_what_it_needs(tmp_path):
    with pytest.raises(BenchmarkDataError, match="holds no metadata.jsonl and no .parquet or .arrow files"):
        get_benchmark("gedit").load(tmp_path)


# GEdit as published on the hub: parquet rows whose two image columns are `datasets` Image structs
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
GEDIT_SCHEMA = pa.schema([("task_type", pa.string()), ("key", pa.string()), ("instruction", pa.string()),
                          ("instruction_language", pa.string()), ("input_image", IMAGE_STRUCT),
                          ("input_image_raw", IMAGE_STRUCT), ("Intersection_exist", pa.bool_())])


def png_bytes(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), pixels


def hub_rows():
    """Two keys over two task types, each in English and Chinese (sharing its images); k1 in the intersection."""
    rows, pixels = [], {}
    for key, task, seed, inter in (("k1", "color_alter", 1, True), ("k2", "subject-add", 3, False)):
        (judged, pixels[key, "input_image"]), (raw, pixels[key, "input_image_raw"]) = png_bytes(seed), png_bytes(seed + 1)
        for lang, text in (("en", f"edit {key}"), ("cn", f"编辑 {key}")):
            rows.append({"task_type": task, "key": key, "instruction": text, "instruction_language": lang,
                         "input_image": {"bytes": judged, "path": None},
                         "input_image_raw": {"bytes": raw, "path": None}, "Intersection_exist": inter})
    return rows, pixels


def hub_snapshot(root, rows=None, schema=GEDIT_SCHEMA):
    """The hub layout: data/train-0000i-of-00002.parquet, rows split over the two files."""
    rows = rows if rows is not None else hub_rows()[0]
    (root / "data").mkdir(parents=True, exist_ok=True)
    half = (len(rows) + 1) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), root / f"data/train-{i:05d}-of-00002.parquet")
    return root


def pixels_of(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_gedit_reads_the_hub_parquet_snapshot_and_extracts_its_images(tmp_path, caplog):
    rows, pixels = hub_rows()
    with caplog.at_level(logging.INFO, logger="reasonedit.eval.benchmarks.gedit"):
        bench = get_benchmark("gedit").load(hub_snapshot(tmp_path / "snap", rows))
    assert "reading 4 rows from 2 file(s)" in caplog.text and "4 images extracted, 0 already in" in caplog.text
    s = bench.samples()
    assert [(x.key, x.category, x.language, x.instruction, x.meta["intersection"]) for x in s] == [
        ("k1_en", "color_alter", "en", "edit k1", True), ("k1_cn", "color_alter", "cn", "编辑 k1", True),
        ("k2_en", "subject-add", "en", "edit k2", False), ("k2_cn", "subject-add", "cn", "编辑 k2", False)]
    for x in s:  # the model edits input_image_raw; the judge sees input_image; both decode to the same pixels
        assert np.array_equal(bench.source_images(x)[0], pixels[x.meta["key"], "input_image_raw"])
        assert np.array_equal(pixels_of(x.meta["input_image"]), pixels[x.meta["key"], "input_image"])
        assert x.sources[0].parent == tmp_path / "snap/.reasonedit-images"
    assert s[0].sources == s[1].sources  # a key's two languages share one extracted file
    assert bench.cache.written == 4 and sorted(p.suffix for p in bench.cache.folder.iterdir()) == [".png"] * 4


def test_gedit_second_load_reuses_the_cache_and_rewrites_a_damaged_file(tmp_path):
    snap = hub_snapshot(tmp_path / "snap")
    first = get_benchmark("gedit", languages=["en"], image_cache=tmp_path / "imgs").load(snap)
    files = sorted((tmp_path / "imgs").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    second = get_benchmark("gedit", languages=["en"], image_cache=tmp_path / "imgs").load(snap)
    assert (second.cache.written, second.cache.reused) == (0, 4)
    assert [f.stat().st_mtime_ns for f in files] == stamps and sorted((tmp_path / "imgs").iterdir()) == files
    assert [x.sources for x in second.samples()] == [x.sources for x in first.samples()]
    files[0].write_bytes(b"half a png")  # a file whose content no longer matches its hash is written again
    third = get_benchmark("gedit", languages=["en"], image_cache=tmp_path / "imgs").load(snap)
    assert (third.cache.written, third.cache.reused) == (1, 3)
    assert np.array_equal(third.source_images(third.samples()[0])[0], first.source_images(first.samples()[0])[0])


def test_gedit_reads_one_parquet_file_or_a_datasets_arrow_file(tmp_path):
    rows, pixels = hub_rows()
    one = hub_snapshot(tmp_path / "snap", rows) / "data/train-00001-of-00002.parquet"
    assert [x.key for x in get_benchmark("gedit").load(one).samples()] == ["k2_en", "k2_cn"]
    arrow = tmp_path / "arrow/train/data-00000-of-00001.arrow"  # what `datasets` save_to_disk writes
    arrow.parent.mkdir(parents=True)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, GEDIT_SCHEMA) as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=GEDIT_SCHEMA))
    bench = get_benchmark("gedit").load(tmp_path / "arrow")
    assert [x.key for x in bench.samples()] == ["k1_en", "k1_cn", "k2_en", "k2_cn"]
    assert np.array_equal(bench.source_images(bench.samples()[2])[0], pixels["k2", "input_image_raw"])


def test_gedit_image_without_bytes_is_read_from_its_path_beside_the_file(tmp_path):
    rows, pixels = hub_rows()
    png(tmp_path / "snap/data/images/raw.png", (10, 20, 30))
    rows[0]["input_image_raw"] = {"bytes": None, "path": "images/raw.png"}
    bench = get_benchmark("gedit").load(hub_snapshot(tmp_path / "snap", rows))
    assert bench.samples()[0].sources == [tmp_path / "snap/data/images/raw.png"]


@pytest.mark.parametrize("column, new_type, value, match", [
    ("Intersection_exist", None, None,
     r"train-00000-of-00002.parquet: missing column\(s\) \['Intersection_exist'\]"),
    ("Intersection_exist", pa.string(), "yes",
     "train-00000-of-00002.parquet: column 'Intersection_exist' has type string, expected bool"),
    ("input_image_raw", pa.string(), "raw.png", "column 'input_image_raw' has type string, expected an Image struct"),
])
def test_gedit_parquet_with_a_missing_or_mistyped_column_names_file_and_column(tmp_path, column, new_type, value,
                                                                               match):
    schema = pa.schema([f for f in GEDIT_SCHEMA if f.name != column] + ([pa.field(column, new_type)] if new_type else []))
    rows = [{**{k: v for k, v in r.items() if k != column}, **({column: value} if new_type else {})}
            for r in hub_rows()[0]]
    with pytest.raises(BenchmarkDataError, match=match):
        get_benchmark("gedit").load(hub_snapshot(tmp_path / "snap", rows, schema))
    assert not (tmp_path / "snap/.reasonedit-images").exists()  # nothing extracted from a bad snapshot


def test_gedit_corrupt_image_bytes_name_file_row_key_and_column(tmp_path):
    rows, _ = hub_rows()
    rows[3]["input_image"] = {"bytes": b"\x89PNG\r\n\x1a\n not really", "path": None}
    with pytest.raises(BenchmarkDataError, match=r"train-00001-of-00002.parquet row 1 \(key 'k2'\): "
                       r"column 'input_image' holds \d+ bytes that do not decode as an image"):
        get_benchmark("gedit").load(hub_snapshot(tmp_path / "snap", rows))
    assert not [p for p in (tmp_path / "snap/.reasonedit-images").iterdir() if p.suffix == ".tmp"]


# -- ImgEdit ------------------------------------------------------------------------------------------
def imgedit_dir(root):
    edits = {"1082": {"id": "animal/1.jpg", "prompt": "Smooth the shell.", "edit_type": "adjust"},
             "673": {"id": "style/2.jpg", "prompt": "Make it ukiyo-e.", "edit_type": "style"}}
    prompts = {"adjust": "Rate this attribute edit. Instruction: <edit_prompt>\nAnswer three lines.",
               "style": "Rate this style edit: <edit_prompt>"}
    for e in edits.values():
        png(root / e["id"])
    (root / "basic_edit.json").write_text(json.dumps(edits))
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def test_imgedit_judges_with_the_benchmarks_own_prompt_for_the_edit_type(tmp_path):
    bench = get_benchmark("imgedit").load(imgedit_dir(tmp_path / "ie"))
    s = {x.key: x for x in bench.samples()}
    (query,) = bench.judge_queries(s["1082"], tmp_path / "e.png")
    assert query.prompt == "Rate this attribute edit. Instruction: Smooth the shell.\nAnswer three lines."
    assert query.images == [tmp_path / "ie/animal/1.jpg", tmp_path / "e.png"] and query.scale == (1, 5)
    assert bench.output_path(tmp_path / "out", s["673"], "m") == tmp_path / "out/m/673.png"


def test_imgedit_edit_type_without_a_prompt_is_named(tmp_path):
    root = imgedit_dir(tmp_path / "ie")
    (root / "prompts.json").write_text(json.dumps({"adjust": "<edit_prompt>"}))
    with pytest.raises(BenchmarkDataError, match="edit_type 'style' has no prompt"):
        get_benchmark("imgedit").load(root)


def test_imgedit_missing_prompt_file_lists_the_names_looked_for(tmp_path):
    root = imgedit_dir(tmp_path / "ie")
    (root / "prompts.json").unlink()
    with pytest.raises(BenchmarkDataError, match="no judge prompt file .*prompts.json"):
        get_benchmark("imgedit").load(root)


# -- KRIS ---------------------------------------------------------------------------------------------
def kris_dir(root, skip=()):
    for cat in kris_mod.CATEGORIES:
        if cat in skip:
            continue
        folder = root / cat
        ann = {"1": {"ori_img": "1.jpg", "gt_img": "1_gt.jpg", "ins_en": f"do {cat}", "explain_en": "because"}}
        if cat in ("multi-element_composition", "temporal_prediction"):
            ann["1"]["ori_img"] = ["1a.jpg", "1b.jpg", "1c.jpg"]
        for name in (ann["1"]["ori_img"] if isinstance(ann["1"]["ori_img"], list) else [ann["1"]["ori_img"]]):
            png(folder / name)
        png(folder / "1_gt.jpg")
        (folder / "annotation.json").write_text(json.dumps(ann))
    return root


def test_kris_reads_twenty_categories_with_list_sources_and_knowledge_queries(tmp_path):
    bench = get_benchmark("kris").load(kris_dir(tmp_path / "k"))
    s = {x.category: x for x in bench.samples()}
    assert len(s) == 20 and len(s["multi-element_composition"].sources) == 3
    edited = tmp_path / "e.png"
    queries = bench.judge_queries(s["biology"], edited)
    assert [q.name for q in queries] == ["consistency", "instruction_knowledge", "quality"]
    assert '{"consistency_score": <integer 1-5>' in queries[0].prompt and "do biology" in queries[0].prompt
    assert '{"quality_score": <integer 1-5>' in queries[2].prompt
    assert [q.name for q in bench.judge_queries(s["color_change"], edited)] == ["consistency", "instruction", "quality"]
    # the viewpoint task shows the ground-truth view before the edit
    view = bench.judge_queries(s["viewpoint_change"], edited)[1]
    assert view.images == [tmp_path / "k/viewpoint_change/1.jpg", tmp_path / "k/viewpoint_change/1_gt.jpg", edited]
    # the official metrics_*.py open <model>/<category>/<image_id>.jpg only; EditThinker's copy opens .png
    assert bench.output_path(tmp_path / "o", s["physics"], "m") == tmp_path / "o/m/physics/1.jpg"


def test_kris_missing_category_folder_is_named(tmp_path):
    with pytest.raises(BenchmarkDataError, match=r"lacks the category folder\(s\) \['physics'\]"):
        get_benchmark("kris").load(kris_dir(tmp_path / "k", skip=("physics",)))


def test_kris_malformed_ori_img_and_json_are_named(tmp_path):
    root = kris_dir(tmp_path / "k")
    (root / "biology/annotation.json").write_text(json.dumps({"7": {"ori_img": 3, "ins_en": "x"}}))
    with pytest.raises(BenchmarkDataError, match="biology/annotation.json: sample 7: field 'ori_img'"):
        get_benchmark("kris").load(root)
    (root / "biology/annotation.json").write_text("{not json")
    with pytest.raises(BenchmarkDataError, match="biology/annotation.json is not valid JSON"):
        get_benchmark("kris").load(root)


# -- RISE ---------------------------------------------------------------------------------------------
def rise_dir(root, items=None):
    items = items or [
        {"index": "t1", "category": "temporal_reasoning", "instruction": "age it 50 years",
         "image": "temporal_reasoning_images/t1.png", "reference": "an old tree", "subtask": "Life Progression"},
        {"index": "c1", "category": "causal_reasoning", "instruction": "drop the glass",
         "image": "causal_reasoning_images/c1.png", "reference": "broken glass", "consistency_free": True},
        {"index": "s1", "category": "spatial_reasoning", "instruction": "assemble",
         "image": "spatial_reasoning_images/s1.png", "reference_img": "spatial_reasoning_images/s1_ref.png"},
        {"index": "l1", "category": "logical_reasoning", "instruction": "solve the sudoku",
         "image": "logical_reasoning_images/l1.png", "reference_txt": "row 1: 1 2 3"},
    ]
    for it in items:
        for f in ("image", "reference_img"):
            if isinstance(it.get(f), str):
                png(root / it[f])
    (root / "datav2_total_w_subtask.json").write_text(json.dumps(items))
    return root


def test_rise_queries_follow_category_reference_and_consistency_free(tmp_path):
    bench = get_benchmark("rise").load(rise_dir(tmp_path / "r"))
    s = {x.meta["index"]: x for x in bench.samples()}
    e = tmp_path / "e.png"
    assert [q.name for q in bench.judge_queries(s["t1"], e)] == ["consistency", "reasoning", "plausibility"]
    assert [q.name for q in bench.judge_queries(s["c1"], e)] == ["reasoning", "plausibility"]  # consistency-free
    spatial = bench.judge_queries(s["s1"], e)[1]
    assert spatial.images == [tmp_path / "r/spatial_reasoning_images/s1_ref.png", e]
    logical = bench.judge_queries(s["l1"], e)
    assert [q.name for q in logical] == ["consistency", "reasoning"]
    assert all(q.scale == (0, 1) and q.integers for q in logical)  # a 0/1 judgement: 0.5 is not a reply
    assert "row 1: 1 2 3" in logical[1].prompt
    assert bench.output_path(tmp_path / "o", s["l1"], "m") == tmp_path / "o/m/images/logical_reasoning/l1.png"


def test_rise_flags_are_read_as_gpt_eval_reads_them(tmp_path):
    base = {"category": "causal_reasoning", "instruction": "x", "image": "a.png", "reference": "y"}
    items = [{**base, "index": "t", "consistency_free": True}, {**base, "index": "f", "consistency_free": False},
             {**base, "index": "n", "consistency_free": None}, {**base, "index": "absent"}]
    meta = {x.meta["index"]: x.meta for x in get_benchmark("rise").load(rise_dir(tmp_path / "r", items)).samples()}
    # judging and solving: consistency-free when the field holds anything but null (not pd.isna), even false
    assert {k: m["consistency_free"] for k, m in meta.items()} == {"t": True, "f": True, "n": False, "absent": False}
    # calculate_score: the row's value taken for truth, NaN (true) where the field is absent from an item
    assert {k: m["weighed_without_consistency"] for k, m in meta.items()} == {
        "t": True, "f": False, "n": False, "absent": True}
    # a file where no item has the field weighs every sample with consistency
    plain = get_benchmark("rise").load(rise_dir(tmp_path / "p", [{**base, "index": "p"}])).samples()[0].meta
    assert not plain["consistency_free"] and not plain["weighed_without_consistency"]


def test_rise_sample_without_a_reference_and_bad_category_are_named(tmp_path):
    item = {"index": 1, "category": "temporal_reasoning", "instruction": "x", "image": "a.png"}
    with pytest.raises(BenchmarkDataError, match="item 0: needs 'reference' or 'reference_img'"):
        get_benchmark("rise").load(rise_dir(tmp_path / "a", [item]))
    with pytest.raises(BenchmarkDataError, match="field 'category' is 'magic'"):
        get_benchmark("rise").load(rise_dir(tmp_path / "b", [{**item, "category": "magic"}]))


def test_find_output_accepts_jpg_and_reports_missing_as_none(tmp_path):
    bench = get_benchmark("rise").load(rise_dir(tmp_path / "r"))
    t1 = next(x for x in bench.samples() if x.meta["index"] == "t1")
    assert bench.find_output(tmp_path / "o", t1, "m") is None
    jpg = png(tmp_path / "o/m/images/temporal_reasoning/t1.jpg")
    assert bench.find_output(tmp_path / "o", t1, "m") == jpg


# -- shapes -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory, world):
    from reasonedit.shapes.synth import SynthConfig, synthesize
    out = tmp_path_factory.mktemp("shapes") / "ds"
    synthesize(out, SynthConfig(n=3, seed=3, splits=("train", "test"), kinds=("edit_pair", "thinking_pair")), world)
    return out


def test_shapes_reads_the_test_split_of_a_synth_dataset(tiny_synth, tmp_path):
    bench = get_benchmark("shapes").load(tiny_synth)
    s = bench.samples()
    assert [x.category for x in s] == ["concrete"] * 3 + ["abstract"] * 3
    assert all(x.key.startswith("test_") for x in s)
    assert bench.source_images(s[0])[0].shape == (224, 224, 3)
    assert bench.output_path(tmp_path, s[3], "m") == tmp_path / "m/shapes/abstract" / f"{s[3].key}.png"


def test_shapes_dataset_without_a_test_split_is_refused(tmp_path, world):
    from reasonedit.shapes.synth import SynthConfig, synthesize
    synthesize(tmp_path / "ds", SynthConfig(n=1, splits=("train",), kinds=("edit_pair",)), world)
    with pytest.raises(BenchmarkDataError, match="no 'test' split"):
        get_benchmark("shapes").load(tmp_path / "ds")
    with pytest.raises(BenchmarkDataError, match="manifest.json does not exist"):
        get_benchmark("shapes").load(tmp_path)


def test_shapes_on_the_fly_scenes_are_held_out_and_reproducible():
    from reasonedit.shapes.world import Scene
    from reasonedit.shapes.synth import split_of
    a = get_benchmark("shapes", n=3, seed=11).load(None).samples()
    b = get_benchmark("shapes", n=3, seed=11).load(None).samples()
    assert [x.instruction for x in a] == [x.instruction for x in b]
    assert {split_of(Scene.from_dict(x.meta["source_scene"])) for x in a} == {"test"}


def test_sample_result_round_trips_through_json_and_rejects_unknown_status():
    from reasonedit.eval.benchmark import SampleResult
    r = SampleResult("k", "add", "failed", {"score_1": 3.0}, {"id": "a.jpg"}, "unparsable", "judge-x", 0.0, "en")
    assert SampleResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="status 'done'"):
        SampleResult("k", "add", "done")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['status'\]"):
        SampleResult.from_dict({"key": "k", "category": "add"})


def test_gedit_queries_replies_and_scoring_fit_together(tmp_path):
    from reasonedit.eval.benchmark import SampleResult, parse_reply
    bench = get_benchmark("gedit", languages=["en"]).load(gedit_dir(tmp_path / "g"))
    sample = bench.samples()[0]
    replies = {"semantic_consistency": '{"score": [9, 6], "reasoning": "blue, background kept"}',
               "perceptual_quality": '{"score": [8, 7], "reasoning": "clean"}'}
    scores = {}
    for query in bench.judge_queries(sample, tmp_path / "e.png"):
        scores.update(parse_reply(query, replies[query.name]))
    result = SampleResult(sample.key, sample.category, "ok", scores, dict(sample.meta), language=sample.language)
    # SC = min(9, 6) = 6, PQ = min(8, 7) = 7, O = sqrt(42); one task type of 11 scored: no official overall
    overall = bench.score([result])["sections"]["en/fullset"]["overall"]
    assert overall["SC"] is None and overall["task_types_scored"] == 1
    assert overall["SC_over_scored_types"] == 6 and overall["PQ_over_scored_types"] == 7
    assert overall["O_over_scored_types"] == pytest.approx(42 ** 0.5)
