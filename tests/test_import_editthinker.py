"""EditThinker data as a drop-in: multi-line prompts and loose scores import, unmappable rows are skipped and
reported, imported critiques train only the roles they carry, and EditThinker's refine-from-the-original is a
first-class restart that the record, the decision text and the loop all keep."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli_here
from reasonedit.data.samples import ReflectionSample, SchemaError, record_from_wds
from reasonedit.data.shards import read_records
from reasonedit.inference.builtin import ReasonerThinker
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.models import prompts
from reasonedit.models.preprocess import Preprocessor, reasoner_roles
from reasonedit.models.processor import ReasonerProcessor, build_image_processor
from reasonedit.models.tokenizer import build_tokenizer

TEMPLATE = ("<image><image>\n# Edit Evaluation and Prompt Refinement System\n\n"
            "Original User Instruction (user's initial editing request): \"{origin}\"\n"
            "Rewritten Prompt (last refined instruction that was used for editing): \"{rewritten}\"\n\n"
            "## Evaluation Criteria (Score 0-10)\n...")
MULTILINE = 'Write "SALE" on the sign.\nThen make the "OPEN" light red.'


def critique(origin, score_json, answer, rewritten="Add text", imgs=("a.png", "b.png")):
    return {"messages": [
        {"role": "user", "content": TEMPLATE.format(origin=origin, rewritten=rewritten)},
        {"role": "assistant", "content": f"<think>\nThe text is missing.\n</think>\n\n<score>\n{score_json}\n"
                                         f"</score>\n\n<answer>\n{answer}\n</answer>"}],
        "images": list(imgs)}


@pytest.fixture
def folder(tmp_path):
    for i, name in enumerate("ab"):
        Image.fromarray(np.full((8, 8, 3), 60 * i + 30, np.uint8)).save(tmp_path / f"{name}.png")
    return tmp_path


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_multi_line_instructions_and_loose_scores_import(folder):
    src = write_rows(folder / "sft.jsonl", [
        critique(MULTILINE, '{"semantic": [4], "quality": "9/10"}', "Write SALE in red on the sign"),
        critique("Add a hat", '{"semantic": 7/10, "quality": "8.5"}', "Add text"),  # bare 7/10: not JSON as such
        critique("Add a hat", '{"semantic": "[9]", "quality": 8}', "Add text"),
    ])
    res = run_cli_here("data", "import", "--format", "sharegpt", "--out", folder / "out", src)
    assert res.returncode == 0, res.stderr
    got = {r.key: r for r in read_records(folder / "out")}
    first, second, third = (got[f"sft-000000{i}"] for i in range(3))
    assert first.instruction == MULTILINE  # kept as written: both lines, inner quotes
    assert (first.meta["semantic"], first.meta["quality"], first.score) == (4.0, 9.0, 4)
    assert (first.decision, first.restart, first.new_instruction) == ("Reflection", True, "Write SALE in red on the sign")
    assert (second.meta["semantic"], second.meta["quality"], second.decision, second.restart) == (7.0, 8.5, "Failed",
                                                                                                 False)
    assert (third.score, third.decision, third.restart) == (8, "Success", False)

    rl = write_rows(folder / "rl.jsonl", [{"origin_prompt": "Add a hat\non the man", "rewritten_prompt": "x",
                                           "origin_image_path": "a.png", "edited_image_path": "b.png",
                                           "evaluation": {"semantics": "[6]", "quality": [9.5]}}])
    assert run_cli_here("data", "import", "--format", "editthinker-rl", "--out", folder / "rl", rl).returncode == 0
    (r,) = read_records(folder / "rl")
    assert (r.instruction, r.score, r.meta["quality"], r.decision) == ("Add a hat\non the man", 6, 9.5, "Failed")


def test_unmappable_rows_stop_the_import_or_are_skipped_counted_and_reported(folder):
    good = critique("Add a hat", '{"semantic": 9, "quality": 9}', "Add text")
    src = write_rows(folder / "mixed.jsonl", [
        good,
        critique("Add a hat", '{"semantic": "high", "quality": 9}', "x"),   # 2: no number
        '{"messages": [',                                                  # 3: not JSON
        critique("Add a hat", '{"semantic": 5, "quality": 9}', "x", imgs=("a.png", "gone.png")),  # 4
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},  # 5
        good,
    ])
    out = folder / "out"
    res = run_cli_here("data", "import", "--format", "sharegpt", "--out", out, src)
    assert res.returncode == 1 and "Traceback" not in res.stderr and not out.exists()
    assert "mixed.jsonl:2: field 'messages[1].content <score>.semantic'" in res.stderr

    res = run_cli_here("data", "import", "--format", "sharegpt", "--skip-unmapped", "--out", out, src)
    assert res.returncode == 0, res.stderr
    assert "skipped 4 row(s)" in res.stdout and "import_report.jsonl" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": {"reflection": 2}}
    assert manifest["skipped"]["count"] == 4 and manifest["skipped"]["report"] == "import_report.jsonl"
    assert manifest["skipped"]["reasons"] == {"bad_json": 1, "bad_score": 1, "fits_no_kind": 1, "missing_image": 1}
    report = [json.loads(line) for line in (out / "import_report.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"], e["field"]) for e in report] == [
        (2, "bad_score", "messages[1].content <score>.semantic"), (3, "bad_json", None),
        (4, "missing_image", "images[1]"), (5, "fits_no_kind", None)]
    assert all(e["file"] == str(src) and e["message"].startswith(f"{src}:{e['line']}: ") for e in report)

    # every format skips the same way; a row that cannot be mapped is never half-imported
    edits = write_rows(folder / "edits.jsonl", [{"source": "a.png", "target": "b.png", "instruction": "x"},
                                                {"source": "a.png", "target": "b.png"}])
    res = run_cli_here("data", "import", "--format", "jsonl", "--skip-unmapped", "--out", folder / "e", edits)
    assert res.returncode == 0, res.stderr
    (entry,) = [json.loads(line) for line in (folder / "e" / "import_report.jsonl").read_text().splitlines()]
    assert (entry["line"], entry["reason"], entry["field"]) == (2, "missing_field", "instruction")


@pytest.fixture(scope="module")
def preprocessor():
    tokenizer = build_tokenizer(prompts.template_texts(), vocab_size=300)
    return Preprocessor(ReasonerProcessor(tokenizer, build_image_processor(min_pixels=56 * 56, max_pixels=56 * 56)))


def test_an_imported_critique_trains_only_its_decision_with_the_restart(folder, preprocessor):
    src = write_rows(folder / "sft.jsonl", [
        critique("Add a sign", '{"semantic": 3, "quality": 9}', "Write SALE in red on the sign"),
        critique("Add a sign", '{"semantic": 9, "quality": 9}', "Add text")])
    assert run_cli_here("data", "import", "--format", "sharegpt", "--out", folder / "out", src).returncode == 0
    restart, success = sorted(read_records(folder / "out"), key=lambda r: r.key)
    for record in (restart, success):
        assert reasoner_roles(record) == ("decide",)  # no description: neither describe nor score
        (segment,) = preprocessor.reasoner_segments(record)
        assert segment.role == "decide" and segment.answer.strip() and (segment.labels[0] != -100).sum() > 1
        user = "".join(p.get("text", "") for p in preprocessor.reasoner_turns(record)[0][2][1]["content"])
        assert "Expected:" not in user  # no empty expectation shown either
    decision = prompts.parse_decision(preprocessor.reasoner_segments(restart)[0].answer)
    assert decision == prompts.Decision("reflection", "The text is missing.", "Write SALE in red on the sign", True)
    assert "<#Reflection> restart: Write SALE" in prompts.format_decision(decision)


def _stored(record: ReflectionSample, **doc_change) -> dict:
    sample = record.to_wds()
    doc = json.loads(sample["json"])
    doc.update(doc_change)
    doc = {k: v for k, v in doc.items() if v is not ...}
    return {**sample, "json": json.dumps(doc).encode()}


def test_restart_is_stored_validated_and_absent_means_the_old_meaning():
    img = np.zeros((4, 4, 3), np.uint8)
    record = ReflectionSample("k", img, "Add a hat", img, "", 3, "no hat", "no hat", "Reflection", "Add a red hat",
                              "imported", restart=True)
    assert json.loads(record.to_wds()["json"])["restart"] is True
    assert record_from_wds(record.to_wds()).restart is True
    assert record_from_wds(_stored(record, restart=...)).restart is False  # a shard written before the field
    for change, words in (({"restart": 1}, "expected true or false"), ({"decision": "Failed"}, "belongs to Reflection"),
                          ({"new_instruction": ""}, "'new_instruction' is empty")):
        with pytest.raises(SchemaError, match=words):
            record_from_wds(_stored(record, **change))
    with pytest.raises(SchemaError, match="record k: field 'restart' is true but the decision is 'Success'"):
        ReflectionSample("k", img, "x", img, "", 9, "ok", "ok", "Success", "", "imported", restart=True).to_wds()


@pytest.mark.parametrize("text, why", [
    ("<#Think> t <#Reflection> restart:", "new instruction after 'restart:'"),
    ("<#Think> t <#Failed> restart: do it", "unexpected text after <#Failed>"),
])
def test_a_restart_marker_needs_a_reflection_and_an_instruction(text, why):
    with pytest.raises(prompts.ThinkerReplyError, match=why):
        prompts.parse_decision(text)


class EchoEditor:
    """Returns each request's image brightened by 1, keeping the requests it was sent."""

    name = "echo"

    def __init__(self):
        self.requests = []

    def edit(self, requests):
        self.requests.append(list(requests))
        return [np.minimum(r.image.astype(int) + 1, 255).astype(np.uint8) for r in requests]


def test_the_loop_re_edits_the_source_after_a_restart_reflection():
    replies = {"think": ["draw a hat"], "score": ["score: 3\nreason: no hat", "score: 9\nreason: hat"],
               "decide": ["<#Think> no hat <#Reflection> restart: draw a red hat on the man", "<#Think> ok <#Success>"]}

    def generate(batch):  # the reasoner's replies, role by role
        role = prompts.role_of(batch[0])
        return ["a man with a hat" if role == "describe" else replies[role].pop(0) for _ in batch]

    editor, source = EchoEditor(), np.full((16, 16, 3), 40, np.uint8)
    (trace,) = edit_with_reasoning(editor, ReasonerThinker(generate=generate), [source], ["add a hat"], rounds=3,
                                   num_inference_steps=1)
    assert trace.rounds[0].reflection.restart and trace.rounds[1].edited_from == "source"
    second = editor.requests[1][0]
    assert np.array_equal(second.image, source) and second.prompt == "draw a red hat on the man"
    assert trace.stopped == "success"
