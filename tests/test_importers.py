import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reasonedit.data.importers import (
    FORMATS,
    DataImportError,
    editthinker_score,
    import_captions,
    import_dataset,
    import_editthinker_rl,
    import_jsonl,
    import_sharegpt,
    split_steps,
)
from reasonedit.data.samples import EditPair, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.data.shards import read_records


# -- helpers ----------------------------------------------------------------------------------------
def noise(path: Path, seed: int, size=(6, 4), mode="RGB") -> np.ndarray:
    """Write a small random image; return the RGB array an import must give back."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)
    return np.repeat(arr, 3, axis=2) if mode == "L" else arr[..., :3]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def assert_records(out: Path, expected: list) -> None:
    got = sorted(read_records(out), key=lambda r: (r.KIND, r.key))
    expected = sorted(expected, key=lambda r: (r.KIND, r.key))
    assert [(r.KIND, r.key) for r in got] == [(r.KIND, r.key) for r in expected]
    for g, e in zip(got, expected):
        assert g.equals(e), (g.key, {k: v for k, v in vars(g).items() if not isinstance(v, np.ndarray)},
                             {k: v for k, v in vars(e).items() if not isinstance(v, np.ndarray)})


@pytest.fixture
def images(tmp_path):
    """Four distinct images under tmp/in/img, by name."""
    return {name: noise(tmp_path / "in" / "img" / f"{name}.png", seed) for seed, name in enumerate("abcd")}


EDITTHINKER_PROMPT = (
    "<image><image>\n# Edit Evaluation and Prompt Refinement System\n\nYou are an expert image editing evaluator.\n"
    "Original User Instruction (user's initial editing request): \"{origin}\"\n"
    "Rewritten Prompt (last refined instruction that was used for editing): \"{rewritten}\"\n\n"
    "## Evaluation Criteria (Score 0-10)\n...")


def critique(origin, rewritten, think, semantic, quality, answer, imgs=("img/a.png", "img/b.png")):
    return {"messages": [
        {"role": "user", "content": EDITTHINKER_PROMPT.format(origin=origin, rewritten=rewritten)},
        {"role": "assistant", "content": f"<think>\n{think}\n</think>\n\n<score>\n"
                                         f"{json.dumps({'semantic': semantic, 'quality': quality}, indent=4)}\n"
                                         f"</score>\n\n<answer>\n{answer}\n</answer>"}],
        "images": list(imgs)}


# -- each format imports to exactly the expected records --------------------------------------------
def test_jsonl_rows_become_edit_pairs_and_thinking_pairs(tmp_path, images):
    src = write_jsonl(tmp_path / "in" / "edits.jsonl", [
        {"source": "img/a.png", "target": "img/b.png", "instruction": "Turn the cup red.", "id": 7},
        "",  # blank lines are allowed
        {"source": str(tmp_path / "in" / "img" / "c.png"), "target": "img/d.png", "split": "val",
         "instruction": "Step 1: Remove the cat. Step 2: Add a dog.", "abstract_instruction": "Swap the pet.",
         "category": "multi_step"},
    ])
    calls = []
    manifest = import_jsonl(src, tmp_path / "out", progress=lambda *a: calls.append(a))
    assert manifest["counts"] == {"train": {"edit_pair": 1}, "val": {"thinking_pair": 1, "edit_pair": 1}}
    assert calls == [("train/edit_pair", 1, 3), ("val/thinking_pair", 2, 3), ("val/edit_pair", 3, 3)]
    assert manifest["importer"] == "jsonl" and manifest["sources"][0]["path"] == str(src.resolve())
    m1 = {"origin": {"file": "edits.jsonl", "line": 1, "row": 0}, "source_path": "img/a.png",
          "target_path": "img/b.png", "extra": {"id": 7}}
    m2 = {"origin": {"file": "edits.jsonl", "line": 3, "row": 1}, "source_path": str(tmp_path / "in/img/c.png"),
          "target_path": "img/d.png", "extra": {}}
    assert_records(tmp_path / "out", [
        EditPair("edits-0000000", images["a"], "Turn the cup red.", images["b"], m1),
        EditPair("edits-0000001", images["c"], "Step 1: Remove the cat. Step 2: Add a dog.", images["d"], m2),
        ThinkingPair("edits-0000001", images["c"], "Swap the pet.", "Step 1: Remove the cat. Step 2: Add a dog.",
                     ["Remove the cat.", "Add a dog."], "multi_step", images["d"], m2),
    ])


def test_jsonl_extra_sources_make_a_multi_image_edit_pair(tmp_path, images):
    src = write_jsonl(tmp_path / "in" / "edits.jsonl", [
        {"source": "img/a.png", "extra_sources": ["img/c.png", "img/d.png"], "target": "img/b.png",
         "instruction": "Put the cup of picture 2 on the table of picture 1."}])
    import_jsonl(src, tmp_path / "out")
    (record,) = read_records(tmp_path / "out")
    assert [s.tobytes() for s in record.sources] == [images[n].tobytes() for n in "acd"]
    assert record.meta["extra_source_paths"] == ["img/c.png", "img/d.png"]
    for bad, words in (("img/c.png", "extra_sources.: expected a list of at most 8 image paths, got a string"),
                       (["img/nothere.png"], "field 'extra_sources[0]': image file"),
                       (["img/c.png"] * 9, "got 9 paths")):
        src = write_jsonl(tmp_path / "in" / "bad.jsonl", [
            {"source": "img/a.png", "extra_sources": bad, "target": "img/b.png", "instruction": "x"}])
        with pytest.raises(DataImportError, match=words.replace("[", r"\[").replace("]", r"\]")):
            import_jsonl(src, tmp_path / "bad-out")
        assert not (tmp_path / "bad-out").exists()


def test_sharegpt_editthinker_critiques_become_reflection_samples(tmp_path, images):
    rows = [
        critique("Make it sunset", "Change the sky to orange", "The sky is a warm sunset.", 9, 8,
                 "Change the sky to orange"),
        critique("Make it sunset", "Change the sky to orange", "The sky is orange but there is no sun.", 5, 9.5,
                 "Change the sky to an orange sunset with a low sun on the horizon"),
        critique("Make it sunset", "Change the sky to orange", "Nothing changed.", 2, 9, "Change the sky to orange",
                 imgs=("img/a.png", "img/a.png")),
    ]
    src = tmp_path / "in" / "sft_train.json"
    src.write_text(json.dumps(rows, indent=2))  # LLaMA-Factory's .json: one array, rows over many lines
    starts = [i + 1 for i, ln in enumerate(src.read_text().split("\n")) if ln == "  {"]
    manifest = import_sharegpt(src, tmp_path / "out")
    assert manifest["counts"] == {"train": {"reflection": 3}} and manifest["skipped"]["count"] == 0

    def meta(i, sem, qual, refined, images_=("img/a.png", "img/b.png")):
        return {"origin": {"file": "sft_train.json", "line": starts[i], "row": i}, "image_paths": list(images_),
                "semantic": float(sem), "quality": float(qual), "overall": round((sem * qual) ** 0.5, 4),
                "rewritten_prompt": "Change the sky to orange", "refined_prompt": refined}
    new = "Change the sky to an orange sunset with a low sun on the horizon"
    assert_records(tmp_path / "out", [
        ReflectionSample("sft_train-0000000", images["a"], "Make it sunset", images["b"], "", 8,
                         "The sky is a warm sunset.", "The sky is a warm sunset.", "Success", "", "imported",
                         meta(0, 9, 8, "Change the sky to orange")),
        ReflectionSample("sft_train-0000001", images["a"], "Make it sunset", images["b"], "", 5,
                         "The sky is orange but there is no sun.", "The sky is orange but there is no sun.",
                         "Reflection", new, "imported", meta(1, 5, 9.5, new), restart=True),
        ReflectionSample("sft_train-0000002", images["a"], "Make it sunset", images["a"], "", 2, "Nothing changed.",
                         "Nothing changed.", "Failed", "", "imported",
                         meta(2, 2, 9, "Change the sky to orange", ("img/a.png", "img/a.png"))),
    ])


def test_sharegpt_request_answered_with_steps_becomes_thinking_pair(tmp_path, images):
    src = write_jsonl(tmp_path / "in" / "think.jsonl", [
        {"messages": [{"role": "system", "content": "Rewrite the request as steps."},
                      {"role": "user", "content": "<image><image>Request: Make the cup look like a ripe banana."},
                      {"role": "assistant", "content": "<think>Bananas are yellow.</think>\n"
                                                       "Step 1: Turn the cup yellow. Step 2: Add brown spots."}],
         "images": ["img/a.png", "img/b.png"], "split": "test"},
        # LLaMA-Factory's other spelling: conversations of from/value with human/gpt
        {"conversations": [{"from": "human", "value": "<image><image>Make the sky gloomy."},
                           {"from": "gpt", "value": "<think>Gloomy means grey.</think><answer>Turn the sky grey."
                                                    "</answer>"}],
         "images": ["img/c.png", "img/d.png"]},
    ])
    import_sharegpt(src, tmp_path / "out")
    assert_records(tmp_path / "out", [
        ThinkingPair("think-0000000", images["a"], "Make the cup look like a ripe banana.",
                     "Step 1: Turn the cup yellow. Step 2: Add brown spots.",
                     ["Turn the cup yellow.", "Add brown spots."], "imported", images["b"],
                     {"origin": {"file": "think.jsonl", "line": 1, "row": 0}, "image_paths": ["img/a.png", "img/b.png"],
                      "thought": "Bananas are yellow."}),
        ThinkingPair("think-0000001", images["c"], "Make the sky gloomy.", "Turn the sky grey.",
                     ["Turn the sky grey."], "imported", images["d"],
                     {"origin": {"file": "think.jsonl", "line": 2, "row": 1}, "image_paths": ["img/c.png", "img/d.png"],
                      "thought": "Gloomy means grey."}),
    ])
    assert {r.key: s for s in ("train", "test") for r in read_records(tmp_path / "out", split=s)} == {
        "think-0000000": "test", "think-0000001": "train"}


def test_sharegpt_row_fitting_no_kind_is_an_error_unless_skipped_and_counted(tmp_path, images):
    rows = [critique("Make it sunset", "", "Fine.", 10, 10, ""),
            {"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                          {"role": "assistant", "content": "A cup."}], "images": ["img/gone.png"]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]}]
    src = write_jsonl(tmp_path / "in" / "mixed.jsonl", rows)
    with pytest.raises(DataImportError, match=r"mixed\.jsonl:2: fits no record kind.*--skip-unmapped"):
        import_sharegpt(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = import_sharegpt(src, tmp_path / "out", skip_unmapped=True)
    assert manifest["counts"] == {"train": {"reflection": 1}}
    assert manifest["skipped"]["count"] == 2
    assert "mixed.jsonl:2" in manifest["skipped"]["first"][0] and "mixed.jsonl:3" in manifest["skipped"]["first"][1]
    (r,) = read_records(tmp_path / "out")
    assert (r.decision, r.score, r.instruction) == ("Success", 10, "Make it sunset")


def test_editthinker_rl_rows_become_reflection_samples(tmp_path, images):
    src = write_jsonl(tmp_path / "in" / "rl_train.jsonl", [
        {"origin_prompt": "Add a hat", "rewritten_prompt": "Add a red wool hat on the man's head",
         "origin_image_path": "img/a.png", "edited_image_path": "img/b.png",
         "evaluation": {"semantics": 6, "quality": 9}, "task": "add"},
        {"origin_prompt": "Add a hat", "rewritten_prompt": "",
         "origin_image_path": "img/a.png", "edited_image_path": "img/c.png",
         "evaluation": {"semantics": 8.5, "quality": 8, "reasoning": "The hat is there and looks natural."}},
    ])
    manifest = import_editthinker_rl(src, tmp_path / "out", split="val")
    assert manifest["counts"] == {"val": {"reflection": 2}}

    def meta(i, sem, qual, rewritten, cand, extra):
        return {"origin": {"file": "rl_train.jsonl", "line": i + 1, "row": i}, "semantic": float(sem),
                "quality": float(qual), "overall": round((sem * qual) ** 0.5, 4), "rewritten_prompt": rewritten,
                "source_path": "img/a.png", "candidate_path": cand, "extra": extra}
    assert_records(tmp_path / "out", [
        ReflectionSample(
            "rl_train-0000000", images["a"], "Add a hat", images["b"], "", 6,
            "EditThinker evaluation: semantic 6/10 (instruction following and preservation), quality 9/10 "
            "(naturalness and artifacts).",
            "Semantic 6/10 and quality 9/10: not both 8 or more, so the edit is not good enough; start again "
            "from the source.", "Failed", "", "imported",
            meta(0, 6, 9, "Add a red wool hat on the man's head", "img/b.png", {"task": "add"})),
        ReflectionSample(
            "rl_train-0000001", images["a"], "Add a hat", images["c"], "", 8, "The hat is there and looks natural.",
            "Semantic 8.5/10 and quality 8/10: both reach 8, the edit is done.", "Success", "", "imported",
            meta(1, 8.5, 8, "", "img/c.png", {})),
    ])


def test_editthinker_score_is_the_weaker_axis_rounded_down():
    assert editthinker_score(9, 7.5) == 7
    assert editthinker_score(8, 10) == 8 and editthinker_score(7.99, 10) == 7
    assert editthinker_score(0, 10) == 0 and editthinker_score(10, 10) == 10


def test_split_steps_reads_step_markers_or_lines():
    assert split_steps("Step 1: Remove the cat. Step 2: Add a dog.") == ["Remove the cat.", "Add a dog."]
    assert split_steps("Remove the cat.\nAdd a dog.\n") == ["Remove the cat.", "Add a dog."]
    assert split_steps("Turn the cup red.") == ["Turn the cup red."]


def test_caption_folder_pairs_become_text_to_image(tmp_path):
    folder = tmp_path / "in" / "pics"
    a = noise(folder / "x.png", 1)
    b = noise(folder / "sub" / "y.png", 2, mode="RGBA")  # alpha is dropped
    c = noise(folder / "z.png", 3, mode="L")  # grey is repeated into three channels
    (folder / "x.txt").write_text("A red cup.\n")
    (folder / "sub" / "y.txt").write_text("  A dog on grass. ")
    (folder / "z.txt").write_text("A grey sky.")
    (folder / ".hidden.png").write_bytes(b"not read")
    manifest = import_captions(folder, tmp_path / "out")
    assert manifest["counts"] == {"train": {"text_to_image": 3}}
    assert_records(tmp_path / "out", [
        TextToImage("pics-x", "A red cup.", a, {"origin": {"file": "x.txt", "line": 1}, "image_path": "x.png"}),
        TextToImage("pics-sub_y", "A dog on grass.", b,
                    {"origin": {"file": "sub/y.txt", "line": 1}, "image_path": "sub/y.png"}),
        TextToImage("pics-z", "A grey sky.", c, {"origin": {"file": "z.txt", "line": 1}, "image_path": "z.png"}),
    ])


def test_captions_jsonl_becomes_text_to_image(tmp_path, images):
    write_jsonl(tmp_path / "in" / "captions.jsonl", [
        {"image": "img/a.png", "caption": "A red cup."},
        {"image": "img/b.png", "caption": "A blue car.", "split": "test"}])
    import_captions(tmp_path / "in", tmp_path / "out")  # the folder's captions.jsonl wins over pairs
    assert_records(tmp_path / "out", [
        TextToImage("in-0000000", "A red cup.", images["a"],
                    {"origin": {"file": "captions.jsonl", "line": 1, "row": 0}, "image_path": "img/a.png"}),
        TextToImage("in-0000001", "A blue car.", images["b"],
                    {"origin": {"file": "captions.jsonl", "line": 2, "row": 1}, "image_path": "img/b.png"}),
    ])


def test_crlf_lines_and_byte_order_mark_are_read(tmp_path, images):
    src = tmp_path / "in" / "e.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(_edit()).encode() + b"\r\n" + json.dumps(_edit()).encode() + b"\r\n")
    assert import_jsonl(src, tmp_path / "out")["counts"] == {"train": {"edit_pair": 2}}


def test_image_root_and_several_inputs_with_one_name(tmp_path, images):
    rows = [{"source": "a.png", "target": "b.png", "instruction": "Do it."}]
    first = write_jsonl(tmp_path / "in" / "one" / "data.jsonl", rows)
    second = write_jsonl(tmp_path / "in" / "two" / "data.jsonl", rows)
    import_dataset("jsonl", [first, second], tmp_path / "out", image_root=tmp_path / "in" / "img")
    assert sorted(r.key for r in read_records(tmp_path / "out")) == ["data0-0000000", "data1-0000000"]


# -- malformed rows: file, line and field named; nothing left behind --------------------------------
def _rl(**change):
    row = {"origin_prompt": "Add a hat", "rewritten_prompt": "Add a red hat", "origin_image_path": "img/a.png",
           "edited_image_path": "img/b.png", "evaluation": {"semantics": 6, "quality": 9}}
    row.update(change)
    return {k: v for k, v in row.items() if v is not ...}


def _edit(**change):
    row = {"source": "img/a.png", "target": "img/b.png", "instruction": "Turn the cup red."}
    row.update(change)
    return {k: v for k, v in row.items() if v is not ...}


def _chat(**change):
    row = critique("Make it sunset", "Change the sky", "Orange.", 5, 9, "Change the sky to a sunset")
    row.update(change)
    return row


def _answer(text):
    return _chat(messages=[_chat()["messages"][0], {"role": "assistant", "content": text}])


GOOD_EDIT, GOOD_RL, GOOD_CHAT = _edit(), _rl(), _chat()
MALFORMED = {
    # id: (format, file name, rows (the bad one second), substrings the message must hold)
    "jsonl-bad-json": ("jsonl", "e.jsonl", [GOOD_EDIT, '{"source": "img/a.png",'], ["e.jsonl:2", "bad JSON"]),
    "jsonl-not-object": ("jsonl", "e.jsonl", [GOOD_EDIT, "[1, 2]"], ["e.jsonl:2", "JSON object"]),
    "jsonl-missing-field": ("jsonl", "e.jsonl", [GOOD_EDIT, _edit(instruction=...)],
                            ["e.jsonl:2", "'instruction'", "missing"]),
    "jsonl-wrong-type": ("jsonl", "e.jsonl", [GOOD_EDIT, _edit(target=3)], ["e.jsonl:2", "'target'", "number"]),
    "jsonl-missing-image": ("jsonl", "e.jsonl", [GOOD_EDIT, _edit(source="img/nope.png")],
                            ["e.jsonl:2", "'source'", "nope.png not found"]),
    "jsonl-bad-split": ("jsonl", "e.jsonl", [GOOD_EDIT, _edit(split="dev")], ["e.jsonl:2", "'split'", "'dev'"]),
    "jsonl-empty-abstract": ("jsonl", "e.jsonl", [GOOD_EDIT, _edit(abstract_instruction=" ")],
                             ["e.jsonl:2", "'abstract_instruction'", "empty"]),
    "sharegpt-unknown-role": ("sharegpt", "s.jsonl", [GOOD_CHAT, _chat(messages=[
        {"role": "user", "content": "<image><image>x"}, {"role": "tool", "content": "y"}])],
        ["s.jsonl:2", "'messages[1].role'", "unknown role 'tool'"]),
    "sharegpt-content-type": ("sharegpt", "s.jsonl", [GOOD_CHAT, _chat(messages=[
        {"role": "user", "content": ["<image>"]}, {"role": "assistant", "content": "y"}])],
        ["s.jsonl:2", "'messages[0].content'", "array"]),
    "sharegpt-missing-messages": ("sharegpt", "s.jsonl", [GOOD_CHAT, {"images": []}],
                                  ["s.jsonl:2", "'messages'", "missing"]),
    "sharegpt-placeholders": ("sharegpt", "s.jsonl", [GOOD_CHAT, _chat(images=["img/a.png"])],
                              ["s.jsonl:2", "'images'", "placeholder"]),
    "sharegpt-missing-image": ("sharegpt", "s.jsonl", [GOOD_CHAT, _chat(images=["img/a.png", "img/zz.png"])],
                               ["s.jsonl:2", "'images[1]'", "zz.png not found"]),
    "sharegpt-score-not-json": ("sharegpt", "s.jsonl", [GOOD_CHAT, _answer(
        "<think>t</think><score>semantic: 5</score><answer>a</answer>")],
        ["s.jsonl:2", "'messages[1].content'", "<score> block is not JSON"]),
    "sharegpt-score-missing-axis": ("sharegpt", "s.jsonl", [GOOD_CHAT, _answer(
        '<think>t</think><score>{"quality": 5}</score><answer>a</answer>')],
        ["s.jsonl:2", "'messages[1].content <score>.semantics'", "missing"]),
    "sharegpt-no-answer-block": ("sharegpt", "s.jsonl", [GOOD_CHAT, _answer(
        '<think>t</think><score>{"semantic": 5, "quality": 5}</score>')],
        ["s.jsonl:2", "'messages[1].content'", "<answer>"]),
    "sharegpt-no-instruction": ("sharegpt", "s.jsonl", [GOOD_CHAT, _chat(messages=[
        {"role": "user", "content": "<image><image>Judge this."}, _chat()["messages"][1]])],
        ["s.jsonl:2", "'messages[0].content'", "Original User Instruction"]),
    "sharegpt-array-bad-json": ("sharegpt", "s.json", [f'[\n  {json.dumps(GOOD_CHAT)},\n  {{"messages": [}}\n]'],
                                ["s.json:3", "bad JSON"]),
    "rl-missing-evaluation": ("editthinker-rl", "r.jsonl", [GOOD_RL, _rl(evaluation=...)],
                              ["r.jsonl:2", "'evaluation'", "missing"]),
    "rl-score-out-of-range": ("editthinker-rl", "r.jsonl", [GOOD_RL, _rl(evaluation={"semantics": 6, "quality": 11})],
                              ["r.jsonl:2", "'evaluation.quality'", "outside 0-10"]),
    "rl-score-wrong-type": ("editthinker-rl", "r.jsonl", [GOOD_RL, _rl(evaluation={"semantics": "six", "quality": 9})],
                            ["r.jsonl:2", "'evaluation.semantics'", "number"]),
    "rl-prompt-wrong-type": ("editthinker-rl", "r.jsonl", [GOOD_RL, _rl(origin_prompt=None)],
                             ["r.jsonl:2", "'origin_prompt'", "null"]),
    "rl-missing-image": ("editthinker-rl", "r.jsonl", [GOOD_RL, _rl(edited_image_path="img/gone.png")],
                         ["r.jsonl:2", "'edited_image_path'", "gone.png not found"]),
    "captions-missing-caption": ("captions", "captions.jsonl", [{"image": "img/a.png", "caption": "x"},
                                                                {"image": "img/b.png"}],
                                 ["captions.jsonl:2", "'caption'", "missing"]),
    "captions-missing-image": ("captions", "captions.jsonl", [{"image": "img/a.png", "caption": "x"},
                                                              {"image": "img/q.png", "caption": "y"}],
                               ["captions.jsonl:2", "'image'", "q.png not found"]),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_row_names_file_line_and_field_and_leaves_nothing(tmp_path, images, case):
    fmt, name, rows, needles = MALFORMED[case]
    src = write_jsonl(tmp_path / "in" / name, rows)
    (tmp_path / "outs").mkdir()
    with pytest.raises(DataImportError) as err:
        import_dataset(fmt, src, tmp_path / "outs" / "ds")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert list((tmp_path / "outs").iterdir()) == []


@pytest.mark.parametrize("problem,needles", [
    ("no-caption", ["lonely.png", "'caption'", "lonely.txt"]),
    ("no-image", ["orphan.txt:1", "'image'"]),
    ("empty-caption", ["blank.txt:1", "'caption'", "empty"]),
    ("two-images", ["twin.txt:1", "'image'", "twin.jpg, twin.png"]),
])
def test_malformed_caption_folder_names_file_and_field(tmp_path, problem, needles):
    folder = tmp_path / "in" / "pics"
    noise(folder / "ok.png", 0)
    (folder / "ok.txt").write_text("fine")
    if problem == "no-caption":
        noise(folder / "lonely.png", 1)
    elif problem == "no-image":
        (folder / "orphan.txt").write_text("a caption")
    elif problem == "empty-caption":
        noise(folder / "blank.png", 2)
        (folder / "blank.txt").write_text(" \n")
    else:
        noise(folder / "twin.png", 3)
        noise(folder / "twin.jpg", 4)
        (folder / "twin.txt").write_text("which one?")
    (tmp_path / "outs").mkdir()
    with pytest.raises(DataImportError) as err:
        import_captions(folder, tmp_path / "outs" / "ds")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert list((tmp_path / "outs").iterdir()) == []


def test_unreadable_image_found_while_writing_leaves_nothing(tmp_path, images):
    (tmp_path / "in" / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [_edit()] * 3 + [_edit(target="img/broken.png")]
    src = write_jsonl(tmp_path / "in" / "e.jsonl", rows)
    (tmp_path / "outs").mkdir()
    with pytest.raises(DataImportError) as err:
        import_jsonl(src, tmp_path / "outs" / "ds", shard_size=1)  # three shards are done before it fails
    assert "e.jsonl:4" in str(err.value) and "'target'" in str(err.value) and "cannot be decoded" in str(err.value)
    assert list((tmp_path / "outs").iterdir()) == []


def test_non_empty_out_is_refused_unless_overwrite(tmp_path, images):
    src = write_jsonl(tmp_path / "in" / "e.jsonl", [_edit()])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataImportError, match="not empty; pass --overwrite"):
        import_jsonl(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    import_jsonl(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and len(list(read_records(out))) == 1


def test_bad_arguments_are_refused(tmp_path, images):
    src = write_jsonl(tmp_path / "in" / "e.jsonl", [_edit()])
    with pytest.raises(DataImportError, match="unknown import format 'csv'; choose one of jsonl, sharegpt"):
        import_dataset("csv", src, tmp_path / "out")
    with pytest.raises(DataImportError, match="--split 'dev'"):
        import_jsonl(src, tmp_path / "out", split="dev")
    with pytest.raises(DataImportError, match="no records"):
        import_jsonl(write_jsonl(tmp_path / "in" / "empty.jsonl", []), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert set(FORMATS) == {"jsonl", "sharegpt", "editthinker-rl", "captions"}
    assert all(isinstance(d, str) and d for d in FORMATS.values())


# -- determinism ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_reimport_gives_byte_identical_shards(tmp_path, images, fmt):
    if fmt == "captions":
        src = tmp_path / "in" / "pics"
        for i in range(3):
            noise(src / f"p{i}.png", 10 + i)
            (src / f"p{i}.txt").write_text(f"caption {i}")
    else:
        rows = {"jsonl": [_edit(), _edit(abstract_instruction="Make it warm.", split="val")],
                "sharegpt": [GOOD_CHAT, _chat(split="test")],
                "editthinker-rl": [GOOD_RL, _rl(evaluation={"semantics": 9, "quality": 9})]}[fmt]
        src = write_jsonl(tmp_path / "in" / "rows.jsonl", rows * 2)
    first = import_dataset(fmt, src, tmp_path / "one", shard_size=3)
    second = import_dataset(fmt, src, tmp_path / "two", shard_size=3)
    assert first["shards"] == second["shards"]
    tars = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.tar"))
    assert tars and tars == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.tar"))
    for rel in tars:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()
