"""Generation over a benchmark (official layout, resume, shards, modes, external services) and scoring
(missing images, failed parses, the judge's id) on a tiny real model and loopback servers."""

import json

import numpy as np
import pytest
from PIL import Image

from reasonedit.eval.benchmark import BenchmarkDataError
from reasonedit.eval.benchmarks import get_benchmark
from reasonedit.eval.judge import Judge, JudgeSettings
from reasonedit.eval.runner import GenerationSettings, Shard, generate, score, select, write_image
from reasonedit.testing.chat_server import ScriptedChatServer


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from reasonedit.models.model import ReasonEditModel
    return ReasonEditModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def shapes():
    return get_benchmark("shapes", n=3).load(None)  # 3 concrete + 3 abstract held-out scenes


class CountingEditor:
    """The real tiny-model editor, counting what it is asked to edit."""

    def __init__(self, model):
        from reasonedit.inference.builtin import GeneratorEditor
        self.inner, self.name, self.prompts = GeneratorEditor(model), "counting", []

    def edit(self, requests):
        self.prompts += [r.prompt for r in requests]
        return self.inner.edit(requests)


FAST = dict(steps=1, guidance=1.0, batch_size=4)


def test_shards_are_disjoint_and_together_complete(shapes):
    keys = [s.key for s in shapes.samples()]
    parts = [[s.key for s in select(shapes, shard=Shard(i, 4))] for i in range(4)]
    assert sorted(k for p in parts for k in p) == sorted(keys)
    assert len({k for p in parts for k in p}) == len(keys)
    with pytest.raises(ValueError, match="--shard '4/4'"):
        Shard.parse("4/4")


def test_limit_takes_the_first_n_of_each_category(shapes):
    picked = select(shapes, limit=2)
    assert [s.category for s in picked] == ["concrete", "concrete", "abstract", "abstract"]


def test_generation_writes_the_official_layout_and_a_rerun_edits_only_what_is_missing(model, shapes, tmp_path):
    editor = CountingEditor(model)
    first = generate(shapes, editor, None, tmp_path, "m", GenerationSettings(**FAST))
    paths = [shapes.output_path(tmp_path, s, "m") for s in shapes.samples()]
    assert first.generated == 6 and all(p.is_file() for p in paths)
    assert paths[0] == tmp_path / "m" / "shapes" / "concrete" / f"{shapes.samples()[0].key}.png"
    before = {p: p.stat().st_mtime_ns for p in paths}
    paths[4].unlink()  # as if the run had been killed before this sample
    again = generate(shapes, editor, None, tmp_path, "m", GenerationSettings(**FAST))
    assert (again.done_before, again.generated) == (5, 1)
    assert editor.prompts[6:] == [shapes.samples()[4].instruction]
    assert all(p.stat().st_mtime_ns == before[p] for p in paths if p != paths[4])
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_sample_edits_the_same_in_a_shard_as_in_the_whole_run(model, shapes, tmp_path):
    editor = CountingEditor(model)
    generate(shapes, editor, None, tmp_path / "whole", "m", GenerationSettings(**FAST))
    for i in range(2):
        generate(shapes, editor, None, tmp_path / "shards", "m", GenerationSettings(**FAST, shard=Shard(i, 2)))
    for s in shapes.samples():
        whole = np.asarray(Image.open(shapes.output_path(tmp_path / "whole", s, "m")))
        shard = np.asarray(Image.open(shapes.output_path(tmp_path / "shards", s, "m")))
        assert np.array_equal(whole, shard), s.key


def test_a_failed_image_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(Exception):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 7), np.uint8))  # not an image PIL can write
    assert list(tmp_path.iterdir()) == []


def test_think_reflect_runs_the_loop_and_writes_each_samples_trace(model, shapes, tmp_path):
    from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker

    from reasonedit.models import prompts

    replies = {"think": "make the square red", "describe": "a red square", "score": "score: 9\nreason: right",
               "decide": "<#Think> it matches <#Success>"}
    # the reasoner's text replies are scripted per role; the real prompt builders and parsers run
    thinker = ReasonerThinker(generate=lambda batch: [replies[prompts.role_of(conv)] for conv in batch])
    stats = generate(shapes, GeneratorEditor(model), thinker, tmp_path / "img", "m",
                     GenerationSettings(mode="think_reflect", rounds=2, traces_dir=tmp_path / "traces", **FAST))
    assert stats.generated == 6
    trace = json.loads((tmp_path / "traces" / f"{shapes.samples()[0].key}.json").read_text())
    assert trace["thought"] == "make the square red" and trace["stopped"] == "success"
    assert [r["decision"] for r in trace["rounds"]] == ["success"]


def _gedit(root, n=3):
    """A GEdit-Bench copy in its official layout: metadata.jsonl and the input images."""
    root.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"in{i}.png")
        rows.append({"key": f"k{i}", "task_type": ["color_alter", "subject-add"][i % 2], "instruction": f"edit {i}",
                     "instruction_language": "en", "input_image": f"in{i}.png", "input_image_raw": f"in{i}.png",
                     "Intersection_exist": i == 0})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return get_benchmark("gedit").load(root)


def test_scoring_reports_missing_images_and_unparsable_replies_and_records_the_judge(tmp_path):
    bench = _gedit(tmp_path / "gedit")
    k0, k1, _ = bench.samples()
    for s in (k0, k1):  # the third sample's image was never made
        write_image(bench.output_path(tmp_path / "images", s, "m"), np.zeros((16, 16, 3), np.uint8))

    def respond(req):
        if "edit 1" in req.text:
            return "I would rather not say"  # no JSON score: a failed parse, never a guess
        return '{"score": [8, 6], "reasoning": "fine"}'

    with ScriptedChatServer(respond) as server:
        settings = JudgeSettings(base_url=server.base_url, model="judge-x", temperature=0.0)
        with Judge(settings, cache=tmp_path / "cache.jsonl") as judge:
            results, stats = score(bench, tmp_path / "images", "m", judge)
    by_key = {r.key: r for r in results}
    assert [r.status for r in results] == ["ok", "failed", "missing"]
    assert by_key[k0.key].scores == {"sc_instruction": 8, "sc_overedit": 6, "pq_naturalness": 8, "pq_artifacts": 6}
    assert by_key[k0.key].judge == settings.judge_id and by_key[k0.key].temperature == 0.0
    assert "semantic_consistency" in by_key[k1.key].error and by_key[k1.key].scores == {}
    assert "no image at" in by_key[bench.samples()[2].key].error
    assert (stats.missing, stats.failed) == (1, 1)
    assert bench.score(results)["counts"] == {"total": 3, "ok": 1, "missing": 1, "failed": 1}


def test_external_editor_and_thinker_over_http(model, shapes, tmp_path):
    from reasonedit.inference.builtin import GeneratorEditor
    from reasonedit.inference.http_editor import HttpEditor
    from reasonedit.inference.openai_thinker import OpenAIThinker
    from reasonedit.serve.app import create_app
    from reasonedit.serve.runner import ServerThread

    verdict = '<think>done</think><score>{"semantic": 9, "quality": 9}</score><answer>make it red</answer>'
    with ServerThread(create_app(GeneratorEditor(model))) as service, ScriptedChatServer(lambda r: verdict) as chat:
        editor = HttpEditor(service.url)
        thinker = OpenAIThinker(chat.base_url, chat.model, contract="editthinker")
        stats = generate(shapes, editor, thinker, tmp_path, "ext",
                         GenerationSettings(mode="think_reflect", limit=1, **FAST))
    assert stats.generated == 2
    assert all(shapes.output_path(tmp_path, s, "ext").is_file() for s in select(shapes, limit=1))
    assert chat.requests == 4  # a think and a reflect per sample; Success stops after round 1


class SceneEditor:
    """A reference editor for the shapes world: draws the exact target scene of each request (or, with
    `change=False`, hands back the source), so the whole generate -> PNG -> oracle path can be checked."""

    name = "reference"

    def __init__(self, bench, change=True):
        from reasonedit.shapes.world import Scene
        self.change = change
        self.targets = {(s.instruction, bench.source_images(s)[0].tobytes()):
                        bench.world.render(Scene.from_dict(s.meta["target_scene"])) for s in bench.samples()}

    def edit(self, requests):
        if not self.change:
            return [r.image for r in requests]
        return [self.targets[(r.prompt, r.image.tobytes())] for r in requests]


@pytest.mark.parametrize("change, success", [(True, 100.0), (False, 0.0)])
def test_exact_target_edits_score_full_marks_and_unchanged_sources_score_none(shapes, tmp_path, change, success):
    generate(shapes, SceneEditor(shapes, change), None, tmp_path, "ref", GenerationSettings(**FAST))
    results, _ = score(shapes, tmp_path, "ref")
    overall = shapes.score(results)["sections"]["all"]["by_category"]
    assert overall["concrete"]["success"] == overall["abstract"]["success"] == success
    if change:
        assert all(r.scores["score"] == 10 for r in results)


def test_judge_prompts_from_a_file_replace_ours_by_query_name(tmp_path):
    bench = _gedit(tmp_path / "gedit", n=2)
    for s in bench.samples():
        write_image(bench.output_path(tmp_path / "images", s, "m"), np.zeros((16, 16, 3), np.uint8))
    prompts = tmp_path / "official.json"
    prompts.write_text(json.dumps({"semantic_consistency": "OFFICIAL SC for [{instruction}] ({category})"}))
    bench.use_judge_prompts(prompts)
    with ScriptedChatServer(lambda req: '{"score": [7, 9], "reasoning": "ok"}') as server:
        with Judge(JudgeSettings(base_url=server.base_url, model="j"), cache=tmp_path / "c.jsonl") as judge:
            results, _ = score(bench, tmp_path / "images", "m", judge)
        texts = [r.text for r in server.log]
    assert [r.status for r in results] == ["ok", "ok"]
    assert "OFFICIAL SC for [edit 0] (color_alter)" in texts and "OFFICIAL SC for [edit 1] (subject-add)" in texts
    # the quality prompt stays ours; both samples ask it of the same black image, so the judge sees it once
    assert sum("OFFICIAL" in t for t in texts) == 2 and len(texts) == 3

    prompts.write_text(json.dumps({"semantic_consistensy": "typo"}))
    with pytest.raises(BenchmarkDataError, match="semantic_consistensy"):
        score(bench.use_judge_prompts(prompts), tmp_path / "images", "m", judge=object())
    prompts.write_text(json.dumps({"semantic_consistency": "{no_such_field}"}))
    with pytest.raises(BenchmarkDataError, match="no_such_field"):
        score(bench.use_judge_prompts(prompts), tmp_path / "images", "m", judge=object())


def test_a_category_specific_judge_prompt_wins_over_the_plain_name(tmp_path):
    bench = _gedit(tmp_path / "gedit", n=2)
    for s in bench.samples():
        write_image(bench.output_path(tmp_path / "images", s, "m"), np.full((16, 16, 3), 9, np.uint8))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"semantic_consistency": "ANY {instruction}",
                                   "semantic_consistency:subject-add": "ADD {instruction}"}))
    with ScriptedChatServer(lambda req: '{"score": [7, 9], "reasoning": "ok"}') as server:
        with Judge(JudgeSettings(base_url=server.base_url, model="j"), cache=tmp_path / "c.jsonl") as judge:
            score(bench.use_judge_prompts(prompts), tmp_path / "images", "m", judge)
        texts = {r.text for r in server.log}
    assert {"ANY edit 0", "ADD edit 1"} <= texts


def test_a_rerun_with_another_model_or_settings_is_refused_not_mixed(model, shapes, tmp_path):
    from reasonedit.inference.builtin import GeneratorEditor
    editor = GeneratorEditor(model)
    settings = GenerationSettings(steps=1, guidance=1.0, limit=1)
    generate(shapes, editor, None, tmp_path / "img", "m", settings, origin="model@1")
    again = generate(shapes, editor, None, tmp_path / "img", "m", settings, origin="model@1")
    assert again.generated == 0 and again.done_before == again.total  # same maker: resumed
    with pytest.raises(ValueError, match=r"origin \('model@1' -> 'model@2'\)"):
        generate(shapes, editor, None, tmp_path / "img", "m", settings, origin="model@2")
    with pytest.raises(ValueError, match=r"steps \(1 -> 2\)"):
        generate(shapes, editor, None, tmp_path / "img", "m", GenerationSettings(steps=2, guidance=1.0, limit=1),
                 origin="model@1")
