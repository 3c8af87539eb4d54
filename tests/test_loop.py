"""Loop control with a scripted reasoner: the replies are scripted as text, so the real prompt builders and
parsers run; the editor is the real tiny generator, wrapped to record what it was asked."""

import json
import re
from collections import defaultdict

import numpy as np
import pytest

from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.inference.pipeline import Pipeline
from reasonedit.inference.report import write_trace
from reasonedit.models import prompts
from reasonedit.config.model import ModelConfig
from reasonedit.models.model import ReasonEditModel



def source(value: int) -> np.ndarray:
    """A flat source image; its colour says which sample a prompt is about."""
    return np.full((64, 64, 3), value, dtype=np.uint8)


def S(thought="done"):
    return f"<#Think> {thought} <#Success>"


def R(instruction, thought="not yet"):
    return f"<#Think> {thought} <#Reflection> {instruction}"


def F(thought="wrong"):
    return f"<#Think> {thought} <#Failed>"


def score(n, reason="ok"):
    return f"score: {n}\nreason: {reason}"


class ScriptedReasoner:
    """Replies per sample and role, in order. Samples are told apart by their source's colour (think,
    describe, decide) or by their description (score); every batch is logged as (role, size)."""

    def __init__(self, script: dict[int, dict[str, list[str]]]):
        self.script = {k: {role: list(replies) for role, replies in roles.items()} for k, roles in script.items()}
        self.calls: list[tuple[str, int]] = []
        self.descriptions: dict[str, int] = {}

    def __call__(self, batch):
        role = prompts.role_of(batch[0])
        self.calls.append((role, len(batch)))
        replies = []
        for messages in batch:
            parts = messages[1]["content"]
            if role == "score":
                text = next(p["text"] for p in parts if p["type"] == "text")
                key = self.descriptions[re.search(r"Expected: (.*)\n", text).group(1)]
            else:
                key = int(next(p["image"] for p in parts if p["type"] == "image")[0, 0, 0])
            if role == "describe" and not self.script[key].get("describe"):
                reply = f"target of sample {key}"
            else:
                reply = self.script[key][role].pop(0)
            if role == "describe":
                self.descriptions[reply.strip()] = key
            replies.append(reply)
        return replies


class RecordingEditor:
    """The real generator editor, keeping every request it was sent."""

    def __init__(self, model):
        self.inner, self.name, self.requests = GeneratorEditor(model), "recording", []

    def edit(self, requests):
        self.requests.append(list(requests))
        return self.inner.edit(requests)


@pytest.fixture(scope="module")
def model():
    return ReasonEditModel.tiny(ModelConfig(), ["make the red circle blue", "remove the star"], seed=0).eval()


def run(model, script, instructions=None, **options):
    keys = sorted(script)
    reasoner, editor = ScriptedReasoner(script), RecordingEditor(model)
    thinker = ReasonerThinker(generate=reasoner)
    options.setdefault("num_inference_steps", 1)
    traces = edit_with_reasoning(editor, thinker, [source(k) for k in keys],
                                 instructions or [f"request {k}" for k in keys], **options)
    return traces, reasoner, editor, thinker


def test_success_on_round_one_stops(model):
    (trace,), reasoner, editor, _ = run(model, {1: {"think": ["paint it blue"], "score": [score(9)], "decide": [S()]}})
    assert len(trace.rounds) == 1 and trace.stopped == "success" and trace.best == 0
    assert trace.thought == "paint it blue" and editor.requests[0][0].prompt == "paint it blue"
    assert trace.rounds[0].decision == "success" and trace.rounds[0].score == 9
    assert [role for role, _ in reasoner.calls] == ["think", "describe", "score", "decide"]


def test_reflections_edit_the_previous_output_with_the_new_instruction(model):
    script = {1: {"think": ["step one"], "score": [score(3), score(5), score(8)],
                  "decide": [R("step two"), R("step three"), S()]}}
    (trace,), _, editor, _ = run(model, script, rounds=5)
    assert [r.instruction for r in trace.rounds] == ["step one", "step two", "step three"]
    assert [r.edited_from for r in trace.rounds] == ["source", "previous", "previous"]
    for prev, requests in zip(trace.rounds, editor.requests[1:]):
        assert np.array_equal(requests[0].image, prev.image)
    assert trace.stopped == "success" and trace.best == 2


def test_failed_restarts_from_the_source_with_the_thought_out_instruction(model):
    script = {7: {"think": ["concrete steps"], "score": [score(2), score(9)], "decide": [F(), S()]}}
    (trace,), _, editor, _ = run(model, script)
    second = editor.requests[1][0]
    assert np.array_equal(second.image, source(7)) and second.prompt == "concrete steps"
    assert trace.rounds[1].edited_from == "source"
    assert second.seed == editor.requests[0][0].seed + 1  # a restart draws new noise


MALFORMED = {
    "score_not_an_integer": ("score", {"score": [score("high")]}),
    "score_out_of_range": ("score", {"score": [score(11)]}),
    "score_without_reason": ("score", {"score": ["score: 5"]}),
    "two_decision_tags": ("decide", {"score": [score(5)], "decide": ["<#Think> hm <#Success> <#Failed>"]}),
    "no_decision_tag": ("decide", {"score": [score(5)], "decide": ["<#Think> looks fine"]}),
    "unknown_tag": ("decide", {"score": [score(5)], "decide": ["<#Think> hm <#Maybe>"]}),
    "reflection_without_instruction": ("decide", {"score": [score(5)], "decide": ["<#Think> hm <#Reflection>"]}),
    "no_think_tag": ("decide", {"score": [score(5)], "decide": ["<#Success>"]}),
    "empty_description": ("describe", {"describe": ["  "]}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_replies_are_recorded_and_taken_as_failed(model, kind):
    phase, replies = MALFORMED[kind]
    (trace,), _, editor, thinker = run(model, {2: {"think": ["do it"], **replies}}, rounds=1)
    verdict = trace.rounds[0].reflection
    assert verdict.decision == "failed" and verdict.parse_error.startswith(f"{phase}:")
    assert thinker.parse_errors == 1 and trace.parse_errors == 1
    assert trace.stopped == "round_limit"


def test_a_parse_failure_restarts_from_the_source(model):
    script = {4: {"think": ["do it"], "score": [score(4), score(6)], "decide": ["<#Think> <#Success> <#Success>", S()]}}
    (trace,), _, editor, _ = run(model, script)
    assert np.array_equal(editor.requests[1][0].image, source(4)) and editor.requests[1][0].prompt == "do it"
    assert trace.rounds[0].reflection.parse_error and trace.stopped == "success"


def test_the_round_limit_stops_the_loop(model):
    script = {1: {"think": ["a"], "score": [score(4)] * 3, "decide": [R("b"), R("c"), R("d")]}}
    (trace,), reasoner, _, _ = run(model, script, rounds=3)
    assert len(trace.rounds) == 3 and trace.stopped == "round_limit"
    assert sum(role == "decide" for role, _ in reasoner.calls) == 3


def test_the_best_scored_round_is_the_result(model):
    script = {1: {"think": ["a"], "score": [score(3), score(9), score(2)], "decide": [R("b"), R("c"), F()]}}
    (trace,), _, _, _ = run(model, script, rounds=3)
    assert trace.best == 1 and np.array_equal(trace.image, trace.rounds[1].image)


def test_a_tied_score_goes_to_success(model):
    script = {1: {"think": ["a"], "score": [score(8), score(8)], "decide": [R("b"), S()]}}
    (trace,), _, _, _ = run(model, script, rounds=3)
    assert trace.best == 1


def test_samples_share_each_phase_and_stopped_ones_drop_out(model):
    script = {1: {"think": ["a"], "score": [score(9)], "decide": [S()]},
              2: {"think": ["b"], "score": [score(3), score(9)], "decide": [R("b2"), S()]},
              3: {"think": ["c"], "score": [score(1), score(2), score(3)], "decide": [F(), F(), F()]}}
    traces, reasoner, editor, thinker = run(model, script, rounds=3)
    assert [len(t.rounds) for t in traces] == [1, 2, 3]
    assert [len(batch) for batch in editor.requests] == [3, 2, 1]
    sizes = defaultdict(list)
    for role, size in reasoner.calls:
        sizes[role].append(size)
    # one call per phase for all live samples; the target is described once per sample, in round 1
    assert sizes == {"think": [3], "describe": [3], "score": [3, 2, 1], "decide": [3, 2, 1]}
    assert thinker.calls == {"think": 3, "describe": 3, "score": 6, "decide": 6}
    assert [r.reflection.description for r in traces[2].rounds] == ["target of sample 3"] * 3


def test_a_description_that_did_not_parse_is_asked_again(model):
    script = {5: {"think": ["a"], "describe": ["  ", "a blue square"], "score": [score(9)], "decide": [S()]}}
    (trace,), reasoner, _, thinker = run(model, script, rounds=3)
    assert [r.reflection.description for r in trace.rounds] == [None, "a blue square"]
    assert thinker.calls["describe"] == 2 and trace.stopped == "success"


def test_without_think_and_reflect_the_loop_is_one_plain_edit(model):
    traces = edit_with_reasoning(GeneratorEditor(model), None, [source(1)], ["remove the star"], think=False,
                                 reflect=False, num_inference_steps=1)
    assert len(traces[0].rounds) == 1 and traces[0].thought is None and traces[0].stopped == "no_reflection"
    assert np.array_equal(traces[0].image, Pipeline(model).edit(source(1), "remove the star", num_inference_steps=1))


def test_pipeline_methods_take_one_sample_or_lists(model):
    script = {1: {"think": ["x"], "score": [score(9)], "decide": [S()]},
              2: {"think": ["y"], "score": [score(9)], "decide": [S()]}}
    pipe = Pipeline(model)
    one = pipe.edit_with_reasoning(source(1), "r1", generate=ScriptedReasoner(script), num_inference_steps=1)
    many = pipe.edit_with_reasoning([source(1), source(2)], ["r1", "r2"], generate=ScriptedReasoner(script),
                                    num_inference_steps=1)
    assert one.thought == "x" and [t.thought for t in many] == ["x", "y"]
    assert np.array_equal(one.image, many[0].image)  # a sample's result does not depend on its batch


def test_the_real_reasoner_runs_the_whole_loop(model):
    thought = Pipeline(model).think(source(5), "remove the star")
    verdict = Pipeline(model).reflect(source(5), source(6), "remove the star")
    assert isinstance(thought, str) and thought
    assert verdict.decision in ("success", "reflection", "failed") and "describe" in verdict.raw


def test_the_trace_folder_holds_every_round(model, tmp_path):
    script = {1: {"think": ["a"], "score": [score(3), score(6)], "decide": [R("b"), S("good now")]}}
    (trace,), _, _, _ = run(model, script)
    out = write_trace(trace, tmp_path / "trace")
    data = json.loads((out / "trace.json").read_text())
    assert data["best_round"] == 2 and data["final"] == "final.png" and data["stopped"] == "success"
    assert [r["decision"] for r in data["rounds"]] == ["reflection", "success"]
    assert [r["instruction"] for r in data["rounds"]] == ["a", "b"] and data["thought"] == "a"
    assert set(data["timings"]) >= {"think", "edit", "describe", "score", "decide"}
    names = {p.name for p in out.iterdir()}
    assert names == {"source.png", "round_1.png", "round_2.png", "final.png", "trace.json", "index.html",
                     "contact_sheet.png"}
    assert "good now" in (out / "index.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["trace"]  # no staging folder left behind


def test_the_vision_cache_answers_as_plain_generation_with_one_tower_run_per_image(model):
    from reasonedit.inference.vision_cache import VisionCache, cached_generate
    a, b = source(10), np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    batch = [prompts.think(a, "x"), prompts.describe_target(b, "y"), prompts.decide(a, "x", "z", 3, "w")]
    runs = []
    hook = model.reasoner.model.model.visual.register_forward_hook(lambda *_: runs.append(1))
    try:
        plain = model.reasoner.generate(batch, max_new_tokens=12)
        cache = VisionCache()
        first = cached_generate(model.reasoner, batch, cache, max_new_tokens=12)
        again = cached_generate(model.reasoner, batch, cache, max_new_tokens=12)
    finally:
        hook.remove()
    assert first == plain and again == plain
    assert len(runs) == 2 and (cache.misses, cache.hits) == (2, 4)  # plain: 1 run; cached: 1, then none


def test_max_new_tokens_is_one_number_or_per_role(model, monkeypatch):
    import argparse

    from reasonedit.inference.cli import max_new_tokens_arg
    assert max_new_tokens_arg("64") == 64
    assert max_new_tokens_arg("think=128,score=32") == {"think": 128, "score": 32}
    for bad in ("think=0", "judge=3", "think", "think=1,think=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            max_new_tokens_arg(bad)
    thinker = ReasonerThinker(model, max_new_tokens={"score": 3, "decide": 5})
    assert thinker.max_new_tokens == {"think": 128, "describe": 128, "score": 3, "decide": 5}
    asked = []
    monkeypatch.setattr(thinker.prefix_cache, "generate",
                        lambda batch, max_new_tokens, keep: asked.append(max_new_tokens) or ["x"] * len(batch))
    thinker.generate([prompts.score(source(1), "a blue circle")])
    thinker.generate([prompts.decide(source(1), "x", "y", 3, "z")])
    assert asked == [3, 5]
