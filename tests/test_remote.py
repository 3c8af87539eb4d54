"""HttpEditor against our edit service on loopback; OpenAIThinker against the scripted chat server, in both contracts."""

import json
import socket
import time

import numpy as np
import pytest

from reasonedit.inference.builtin import GeneratorEditor
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.clients.http import RetryPolicy, ServiceError
from reasonedit.inference.editthinker import parse_editthinker
from reasonedit.inference.http_editor import HttpEditor
from reasonedit.inference.openai_thinker import OpenAIThinker
from reasonedit.inference.types import EditRequest
from reasonedit.models import prompts
from reasonedit.config.model import ModelConfig
from reasonedit.models.model import ReasonEditModel
from reasonedit.models.prompts import ThinkerReplyError
from reasonedit.serve import ServeConfig, ServerThread, create_app
from reasonedit.testing import Reply, ScriptedChatServer

STEPS = 2
FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, jitter=0.0)


@pytest.fixture(scope="module")
def model():
    return ReasonEditModel.tiny(ModelConfig(), ["make the red square blue", "add a circle"], seed=0).eval()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def two_servers(model):
    with ServerThread(create_app(GeneratorEditor(model), ServeConfig())) as a, \
            ServerThread(create_app(GeneratorEditor(model), ServeConfig())) as b:
        yield a, b


class BrokenEditor:
    name = "broken"

    def edit(self, requests):
        raise RuntimeError("GPU fell off the bus")


def _served(server):
    return server.config.app.state.batcher.stats.served


def _dead_url():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _requests(image, n):
    return [EditRequest(image, "make the red square blue", seed=i, num_inference_steps=STEPS) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# HttpEditor


def test_http_editor_returns_what_the_editor_makes_locally(two_servers, model, image):
    with HttpEditor(two_servers[0].url, retry=FAST) as editor:
        remote = editor.edit(_requests(image, 3))
    local = GeneratorEditor(model).edit(_requests(image, 3))
    for r, l in zip(remote, local):
        np.testing.assert_array_equal(r, l)


def test_http_editor_goes_round_robin_over_two_servers(two_servers, image):
    a, b = two_servers
    before = _served(a), _served(b)
    with HttpEditor([a.url, b.url], retry=FAST, concurrency=1) as editor:
        editor.edit(_requests(image, 6))
    assert (_served(a) - before[0], _served(b) - before[1]) == (3, 3)


def test_a_failing_endpoint_is_skipped_for_the_other_and_sits_out(two_servers, image):
    good = two_servers[0]
    with ServerThread(create_app(BrokenEditor(), ServeConfig())) as broken:
        before = _served(good)
        with HttpEditor([broken.url, good.url], retry=FAST, concurrency=1, cooldown=60) as editor:
            images = editor.edit(_requests(image, 4))
            assert editor.pool.is_down(broken.url) and not editor.pool.is_down(good.url)
        assert len(images) == 4 and _served(good) - before == 4
        assert broken.config.app.state.batcher.stats.failed == 1  # tried once, then left alone


def test_a_dead_endpoint_is_retried_with_backoff_then_named_in_the_error(image):
    dead = [_dead_url(), _dead_url()]
    policy = RetryPolicy(attempts=3, backoff=0.1, max_backoff=1.0, jitter=0.0)
    started = time.perf_counter()
    with HttpEditor(dead, retry=policy, timeout=2) as editor, pytest.raises(ServiceError) as err:
        editor.edit(_requests(image, 1))
    assert time.perf_counter() - started >= 0.1 + 0.2  # two waits: 0.1, then 0.2
    assert "after 3 attempt(s)" in str(err.value) and all(url in str(err.value) for url in dead)


def test_a_rejected_request_is_not_retried_and_the_error_names_the_url(image):
    with ServerThread(create_app(BrokenEditor(), ServeConfig(token="k"))) as s:
        with HttpEditor(s.url, retry=FAST) as editor, pytest.raises(ServiceError) as err:
            editor.edit(_requests(image, 1))
        assert s.url in str(err.value) and "401" in str(err.value)
        assert s.config.app.state.counters.unauthorized == 1
        with HttpEditor(s.url, retry=FAST, token="k") as editor, pytest.raises(ServiceError, match="500"):
            editor.edit(_requests(image, 1))  # authorised: now the editor's own failure, retried


def test_a_slow_answer_times_out_and_is_retried(image):
    class Slow:
        name, calls = "slow", 0

        def edit(self, requests):
            Slow.calls += 1
            if Slow.calls == 1:
                time.sleep(0.7)  # past the client timeout; the retry queues behind it and fits
            return [r.image for r in requests]

    with ServerThread(create_app(Slow(), ServeConfig())) as s, HttpEditor(s.url, retry=FAST, timeout=0.4) as editor:
        out = editor.edit(_requests(image, 1))
    np.testing.assert_array_equal(out[0], image)


def test_health_reports_each_endpoint(two_servers):
    dead = _dead_url()
    with HttpEditor([two_servers[0].url, dead]) as editor:
        assert editor.health() == {two_servers[0].url: True, dead: False}


def test_backoff_grows_and_stays_within_its_bound():
    policy = RetryPolicy(attempts=10, backoff=0.5, max_backoff=4.0, jitter=0.25)
    assert [RetryPolicy(backoff=0.5, max_backoff=4.0, jitter=0).wait(k) for k in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    waits = [policy.wait(k) for k in range(8) for _ in range(20)]
    assert max(waits) <= 4.0 * 1.25 and min(waits) >= 0.5 * 0.75 and len(set(waits)) > 1


# ---------------------------------------------------------------------------------------------------
# OpenAIThinker, our contract: think; reflect = describe, score, decide


def _by_role(replies):
    """A respond function answering by the role's task, which the role builders write first in the user text."""
    def respond(req):
        assert req.system == prompts.REASONER_SYSTEM_PROMPT
        return replies[next(r for r, task in prompts.ROLE_TASKS.items() if req.text.startswith(task + "\n"))]
    return respond


def test_think_sends_the_role_prompt_with_the_image_as_a_data_url(image):
    with ScriptedChatServer(_by_role({"think": " make the square blue \n"}), model="vl") as chat:
        with OpenAIThinker(chat.base_url, "vl", api_key="x", retry=FAST) as thinker:
            assert thinker.think([image], ["make it look like the sea"]) == ["make the square blue"]
    request = chat.log[0]
    assert request.model == "vl" and request.text == f"{prompts.THINK_TASK}\nRequest: make it look like the sea"
    np.testing.assert_array_equal(request.images()[0], image)


@pytest.mark.parametrize("decide,decision,instruction,restart", [
    ("<#Think> it is blue <#Success>", "success", None, False),
    ("<#Think> too small <#Reflection> make the square larger", "reflection", "make the square larger", False),
    ("<#Think> wrong shape <#Failed>", "failed", None, True),
])
def test_reflect_in_our_contract_describes_scores_and_decides(image, decide, decision, instruction, restart):
    replies = {"describe": "a blue square", "score": "score: 6\nreason: roughly right", "decide": decide}
    with ScriptedChatServer(_by_role(replies)) as chat, OpenAIThinker(chat.base_url, "m", retry=FAST) as thinker:
        [r] = thinker.reflect([image], [255 - image], ["make it blue"], ["paint it blue"])
    assert (r.decision, r.instruction, r.restart, r.parse_error) == (decision, instruction, restart, None)
    assert (r.description, r.score, r.reason) == ("a blue square", 6.0, "roughly right")
    assert set(r.raw) == set(r.timings) == {"describe", "score", "decide"}
    score_request, decide_request = chat.log[1], chat.log[2]
    np.testing.assert_array_equal(score_request.images()[0], 255 - image)  # the edit, alone
    # the instruction that made this edit
    assert decide_request.text.startswith(f"{prompts.DECIDE_TASK}\nEdit: paint it blue")


def test_our_contract_describes_each_source_once_across_rounds(image):
    replies = {"describe": "a blue square", "score": "score: 6\nreason: ok", "decide": "<#Think> hm <#Reflection> bluer"}
    with ScriptedChatServer(_by_role(replies)) as chat, OpenAIThinker(chat.base_url, "m", retry=FAST) as thinker:
        for _ in range(3):  # three rounds
            verdicts = thinker.reflect([image, 255 - image], [image, image], ["make it blue"] * 2, [None, None])
    assert [v.description for v in verdicts] == ["a blue square"] * 2 and verdicts[0].raw["describe"] == "a blue square"
    assert thinker.calls == {"think": 0, "describe": 2, "score": 6, "decide": 6, "reflect": 0}
    assert chat.requests == 14


@pytest.mark.parametrize("replies,phase,calls", [
    ({"describe": "  ", "score": "", "decide": ""}, "describe", 1),
    ({"describe": "a blue square", "score": "score: eight\nreason: ok", "decide": ""}, "score", 2),
    ({"describe": "a blue square", "score": "score: 11\nreason: ok", "decide": ""}, "score", 2),
    ({"describe": "a blue square", "score": "score: 5\nreason: ok", "decide": "<#Think> hm <#Success> <#Failed>"}, "decide", 3),
    ({"describe": "a blue square", "score": "score: 5\nreason: ok", "decide": "looks fine"}, "decide", 3),
])
def test_an_unparsable_reply_in_our_contract_is_failed_with_the_phase_named(image, replies, phase, calls):
    with ScriptedChatServer(_by_role(replies)) as chat, OpenAIThinker(chat.base_url, "m", retry=FAST) as thinker:
        [r] = thinker.reflect([image], [image], ["make it blue"], [None])
        assert thinker.parse_errors == 1
    assert r.decision == "failed" and r.restart and r.parse_error.startswith(phase + ":")
    assert chat.requests == calls  # later phases are not asked after a parse failure


# ---------------------------------------------------------------------------------------------------
# OpenAIThinker, EditThinker's contract


def _et(think, semantic, quality, answer):
    return f"<think>{think}</think>\n<score>{json.dumps({'semantic': semantic, 'quality': quality})}</score>\n" \
           f"<answer>{answer}</answer>"


@pytest.mark.parametrize("reply,decision,instruction", [
    (_et("done", 9, 8, "a different wording"), "success", None),  # both scores reach the threshold
    (_et("fine", 5, 5, "paint it blue"), "success", None),  # the answer repeats the instruction used
    (_et("still red", 9, 3, "paint the square deep blue"), "reflection", "paint the square deep blue"),
])
def test_reflect_in_editthinkers_contract(image, reply, decision, instruction):
    with ScriptedChatServer(lambda req: reply) as chat, \
            OpenAIThinker(chat.base_url, "editthinker-8b", contract="editthinker", retry=FAST) as thinker:
        [r] = thinker.reflect([image], [255 - image], ["make it blue"], ["paint it blue"])
    assert (r.decision, r.instruction, r.parse_error) == (decision, instruction, None)
    assert r.restart == (decision == "reflection")  # EditThinker re-edits the source
    s, q = json.loads(reply.split("<score>")[1].split("</score>")[0]).values()
    assert r.score == pytest.approx((s * q) ** 0.5)
    source, edited = chat.log[0].images()  # the original first, then the edit
    np.testing.assert_array_equal(source, image)
    np.testing.assert_array_equal(edited, 255 - image)
    assert '"make it blue"' in chat.log[0].text and '"paint it blue"' in chat.log[0].text


@pytest.mark.parametrize("reply,words", [
    ("<think>x</think><score>{\"semantic\": 9, \"quality\": 9}</score>", "<answer>"),
    ("<think>x</think><score>semantic 9</score><answer>y</answer>", "not JSON"),
    ("<think>x</think><score>{\"semantic\": 12, \"quality\": 9}</score><answer>y</answer>", "semantic"),
    ("<think>x</think><score>{\"semantic\": 9}</score><answer>y</answer>", "quality"),
    ("<think>x</think><score>{\"semantic\": 9, \"quality\": 9}</score><answer> </answer>", "empty"),
    ("Sure! The edit looks great.", "<think>"),
])
def test_an_unparsable_editthinker_reply_is_failed_with_parse_error(image, reply, words):
    with pytest.raises(ThinkerReplyError, match=words):
        parse_editthinker(reply)
    with ScriptedChatServer(lambda req: reply) as chat, \
            OpenAIThinker(chat.base_url, "m", contract="editthinker", retry=FAST) as thinker:
        [r] = thinker.reflect([image], [image], ["make it blue"], ["paint it blue"])
    assert r.decision == "failed" and r.parse_error.startswith("reflect:") and r.raw["reflect"] == reply


def test_editthinker_think_judges_the_source_and_takes_its_answer(image):
    with ScriptedChatServer(lambda req: _et("needs a plan", 0, 10, "turn the red square blue")) as chat, \
            OpenAIThinker(chat.base_url, "m", contract="editthinker", retry=FAST) as thinker:
        assert thinker.think([image], ["make it look like the sea"]) == ["turn the red square blue"]
    assert '""' in chat.log[0].text  # no instruction used yet


def test_a_prompt_template_file_is_used_with_its_placeholders(image, tmp_path):
    template = tmp_path / "eval_prompt.txt"
    template.write_text("<image><image>\nUser: {original_instruction}\nUsed: {rewritten_prompt}\nAnswer with tags.")
    with ScriptedChatServer(lambda req: _et("ok", 9, 9, "x")) as chat, \
            OpenAIThinker(chat.base_url, "m", contract="editthinker", prompt_template=template) as thinker:
        thinker.reflect([image], [image], ["make it blue"], ["paint it blue"])
    # as EditThinker's client sends it: the file stripped, then the <image> markers dropped (their newline stays)
    assert chat.log[0].text == "\nUser: make it blue\nUsed: paint it blue\nAnswer with tags."
    with pytest.raises(ValueError, match="rewritten_prompt"):
        OpenAIThinker("http://127.0.0.1:1/v1", "m", contract="editthinker", prompt_template="only {original_instruction}")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        OpenAIThinker("http://127.0.0.1:1/v1", "m", contract="editthinker", prompt_template=str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------------------------------
# OpenAIThinker transport: retries, timeouts, keys


def test_5xx_429_and_malformed_bodies_are_retried(image):
    with ScriptedChatServer(_by_role({"think": "paint it"})) as chat:
        chat.script(Reply.error(503), Reply.error(429), Reply.malformed(), Reply.error(500))
        policy = RetryPolicy(attempts=5, backoff=0.01, max_backoff=0.02, jitter=0.0)
        with OpenAIThinker(chat.base_url, "m", retry=policy) as thinker:
            assert thinker.think([image], ["x"]) == ["paint it"]
    assert chat.by_status == {503: 1, 429: 1, 200: 2, 500: 1} and chat.served == 1


def test_a_timeout_is_retried_then_answered(image):
    with ScriptedChatServer(_by_role({"think": "paint it"})) as chat:
        chat.script(Reply(delay=2.0))
        with OpenAIThinker(chat.base_url, "m", retry=FAST, timeout=0.3) as thinker:
            assert thinker.think([image], ["x"]) == ["paint it"]
    assert chat.requests == 2


def test_a_service_that_keeps_failing_is_a_service_error_naming_the_url(image):
    with ScriptedChatServer() as chat:
        chat.script(*[Reply.error(503)] * 3)
        url = chat.base_url
        with OpenAIThinker(url, "m", retry=FAST) as thinker, pytest.raises(ServiceError) as err:
            thinker.reflect([image], [image], ["x"], [None])
    assert url in str(err.value) and "503" in str(err.value) and chat.requests == 3


def test_base_url_and_key_come_from_the_environment(image, monkeypatch):
    with ScriptedChatServer(_by_role({"think": "paint it"}), api_key="sk-env") as chat:
        monkeypatch.setenv("OPENAI_BASE_URL", chat.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        with OpenAIThinker(model="m", retry=FAST) as thinker:
            assert thinker.think([image], ["x"]) == ["paint it"]
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        with OpenAIThinker(model="m", retry=FAST) as thinker, pytest.raises(ServiceError, match="401"):
            thinker.think([image], ["x"])
    assert chat.by_status[401] == 1  # a refused key is not retried
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        OpenAIThinker(model="m")


def test_a_batch_of_reflections_runs_concurrently(image):
    replies = {"describe": "a blue square", "score": "score: 9\nreason: ok", "decide": "<#Think> ok <#Success>"}

    def slow(req):
        time.sleep(0.1)
        return _by_role(replies)(req)

    with ScriptedChatServer(slow) as chat, OpenAIThinker(chat.base_url, "m", retry=FAST, concurrency=4) as thinker:
        verdicts = thinker.reflect([image] * 4, [image] * 4, ["x"] * 4, [None] * 4)
    assert [v.decision for v in verdicts] == ["success"] * 4 and chat.max_in_flight == 4


# ---------------------------------------------------------------------------------------------------
# The loop is the same code for HTTP editor + HTTP thinker


def test_the_loop_runs_with_an_http_editor_and_an_editthinker_critic(two_servers, image):
    answers = iter([_et("plan", 0, 10, "turn the square blue"),  # think
                    _et("still red", 3, 9, "turn the square deep blue"),  # round 1: try again from the source
                    _et("good", 9, 9, "turn the square deep blue")])  # round 2: repeats: success
    with ScriptedChatServer(lambda req: next(answers)) as chat, \
            OpenAIThinker(chat.base_url, "m", contract="editthinker", retry=FAST) as thinker, \
            HttpEditor(two_servers[0].url, retry=FAST) as editor:
        [trace] = edit_with_reasoning(editor, thinker, [image], ["make it look like the sea"], rounds=3,
                                      num_inference_steps=STEPS)
    assert trace.stopped == "success" and trace.best == 1
    assert [(r.instruction, r.edited_from) for r in trace.rounds] == [("turn the square blue", "source"),
                                                                     ("turn the square deep blue", "source")]


@pytest.mark.parametrize("contract,reply", [("reasonedit", "  "), ("editthinker", "I would make it blue.")])
def test_a_think_reply_that_gives_nothing_falls_back_to_the_instruction(image, contract, reply):
    with ScriptedChatServer(lambda req: reply) as chat, \
            OpenAIThinker(chat.base_url, "m", contract=contract, retry=FAST) as thinker:
        assert thinker.think([image], ["make it look like the sea"]) == ["make it look like the sea"]
        assert thinker.parse_errors == 1
