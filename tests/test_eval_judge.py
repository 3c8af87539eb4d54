"""The judge client end to end against the scripted chat server on loopback: replies, concurrency,
retries (timeouts, 429, 5xx, malformed bodies), the reply cache, and resume after SIGKILL."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from reasonedit.eval.judge import Judge, JudgeRequest, JudgeSettings, ReplyCache
from reasonedit.testing.chat_server import Reply, ScriptedChatServer
from tests.conftest import kill_when_seen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(value: int) -> np.ndarray:
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = value
    return img


def _judge(server, tmp_path, sleeps=None, **kwargs):
    settings = JudgeSettings(base_url=server.base_url, model=server.model, **{"timeout": 5.0, **kwargs})
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return Judge(settings, cache=tmp_path / "cache.jsonl", sleep=sleep)


def test_replies_come_back_in_order_with_images_as_data_urls(tmp_path):
    with ScriptedChatServer(lambda req: f"{req.text} saw {int(req.images()[0][0, 0, 0])}") as server:
        judge_id = f"{server.model}@{server.base_url}"
        with _judge(server, tmp_path, concurrency=4, temperature=0.25) as judge:
            replies = judge.ask([JudgeRequest(f"q{i}", [_image(i)]) for i in range(8)])
    assert [r.text for r in replies] == [f"q{i} saw {i}" for i in range(8)]
    assert all(r.judge == judge_id and r.temperature == 0.25 for r in replies)
    assert all(req.image_urls[0].startswith("data:image/png;base64,") for req in server.log)
    assert {req.temperature for req in server.log} == {0.25}


def test_concurrency_is_bounded(tmp_path):
    with ScriptedChatServer(lambda req: Reply("ok", delay=0.1)) as server:
        with _judge(server, tmp_path, concurrency=3) as judge:
            judge.ask([JudgeRequest(f"q{i}") for i in range(12)])
    assert server.max_in_flight == 3


def test_timeout_is_retried(tmp_path):
    with ScriptedChatServer(lambda req: "fine") as server:
        server.script(Reply(delay=2.0))
        with _judge(server, tmp_path, timeout=0.3) as judge:
            [reply] = judge.ask([JudgeRequest("q")])
    assert reply.text == "fine" and reply.attempts == 2
    assert judge.stats.retries == 1 and server.requests == 2


def test_429_and_5xx_are_retried_with_growing_backoff_and_retry_after(tmp_path):
    sleeps = []
    with ScriptedChatServer(lambda req: "fine") as server:
        server.script(Reply(body=Reply.error(429).body, status=429, headers={"Retry-After": "7"}),
                      Reply.error(500), Reply.error(503))
        with _judge(server, tmp_path, sleeps, backoff=1.0, max_backoff=60.0) as judge:
            [reply] = judge.ask([JudgeRequest("q")])
    assert reply.ok and reply.attempts == 4 and server.requests == 4
    # waits: max(1 + jitter, Retry-After 7), then 2 + jitter in [2, 4], then 4 + jitter in [4, 8]
    assert sleeps[0] >= 7 and 2 <= sleeps[1] <= 4 and 4 <= sleeps[2] <= 8


def test_gives_up_after_its_retries_and_the_failure_is_not_cached(tmp_path):
    with ScriptedChatServer(lambda req: "fine") as server:
        server.script(*[Reply.error(503)] * 3)
        with _judge(server, tmp_path, retries=2) as judge:
            [reply] = judge.ask([JudgeRequest("q")])
            assert not reply.ok and "HTTP 503" in reply.error and reply.text is None
            assert judge.stats.failures == 1 and judge.stats.by_error == {"http_503": 1}
            [again] = judge.ask([JudgeRequest("q")])  # the next run asks again rather than replaying a failure
    assert again.text == "fine" and not again.cached and server.requests == 4


def test_a_client_error_is_not_retried(tmp_path):
    with ScriptedChatServer(lambda req: "fine", api_key="right") as server:
        with _judge(server, tmp_path, api_key="wrong") as judge:
            [reply] = judge.ask([JudgeRequest("q")])
    assert "HTTP 401" in reply.error and "--judge-key" in reply.error and judge.stats.requests == 1


def test_a_malformed_body_is_retried(tmp_path):
    with ScriptedChatServer(lambda req: "fine") as server:
        server.script(Reply.malformed(), Reply.malformed(b'{"choices": []}'))
        with _judge(server, tmp_path) as judge:
            [reply] = judge.ask([JudgeRequest("q")])
    assert reply.text == "fine" and reply.attempts == 3


def test_cached_replies_are_not_asked_again_but_other_images_or_temperature_are(tmp_path):
    with ScriptedChatServer(lambda req: f"reply {len(server.log)}") as server:
        with _judge(server, tmp_path) as judge:
            first = judge.ask([JudgeRequest("q", [_image(1)])])[0]
            same = judge.ask([JudgeRequest("q", [_image(1)]), JudgeRequest("q", [_image(1)])])
            other_image = judge.ask([JudgeRequest("q", [_image(2)])])[0]
        with _judge(server, tmp_path, temperature=0.7) as warmer:  # a new process: the cache is reloaded from disk
            other_temperature = warmer.ask([JudgeRequest("q", [_image(1)])])[0]
            again = warmer.ask([JudgeRequest("q", [_image(2)])])[0]
    assert [s.text for s in same] == [first.text] * 2 and all(s.cached for s in same)
    assert not other_image.cached and not other_temperature.cached and again.cached is False
    assert server.requests == 4  # q/1 at 0.0, q/2 at 0.0, q/1 at 0.7, q/2 at 0.7


def test_an_unreadable_image_fails_its_own_request_only(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with ScriptedChatServer(lambda req: "fine") as server:
        with _judge(server, tmp_path) as judge:
            bad, good = judge.ask([JudgeRequest("q", [tmp_path / "broken.png"]), JudgeRequest("q", [_image(1)])])
    assert "broken.png is not an image file" in bad.error and good.text == "fine" and server.requests == 1


def test_a_torn_cache_line_is_skipped_and_later_lines_still_load(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = ReplyCache(path)
    cache.put("a", {"text": "A"})
    cache.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "b", "te')  # what a kill in the middle of a write would leave
    cache = ReplyCache(path)
    cache.put("c", {"text": "C"})
    cache.close()
    reloaded = ReplyCache(path)
    assert reloaded.torn_lines == 1 and reloaded.get("a")["text"] == "A" and reloaded.get("c")["text"] == "C"
    assert reloaded.get("b") is None


def test_settings_come_from_arguments_then_reasonedit_then_openai_environment():
    env = {"OPENAI_BASE_URL": "http://openai/v1", "OPENAI_API_KEY": "k1", "OPENAI_MODEL": "m1",
           "REASONEDIT_JUDGE_MODEL": "m2"}
    s = JudgeSettings.resolve(env=env)
    assert (s.base_url, s.model, s.api_key) == ("http://openai/v1", "m2", "k1")
    assert JudgeSettings.resolve(base_url="http://mine/v1", env=env).base_url == "http://mine/v1"
    with pytest.raises(ValueError, match="--judge-model"):
        JudgeSettings.resolve(base_url="http://x/v1", env={})


CHILD = """
import sys
from reasonedit.eval.judge import Judge, JudgeRequest, JudgeSettings
judge = Judge(JudgeSettings(base_url=sys.argv[1], model="scripted-chat", timeout=30, concurrency=1), cache=sys.argv[2])
replies = judge.ask([JudgeRequest(f"sample {i}") for i in range(int(sys.argv[3]))])
assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
print(sum(r.cached for r in replies), "cached")
"""


def test_a_run_killed_mid_way_resumes_without_judging_any_sample_twice(tmp_path):
    n, kill_at = 10, 6
    release, calls, lock = threading.Event(), [], threading.Lock()

    def respond(req):
        with lock:
            calls.append(req.text)
            blocked = len(calls) == kill_at + 1
        if blocked:  # this request is in flight when the kill lands: its reply never reaches the client
            release.wait(10)
        return f"verdict for {req.text}"

    cache = tmp_path / "cache.jsonl"
    with ScriptedChatServer(respond) as server:
        args = [sys.executable, "-c", CHILD, server.base_url, str(cache), str(n)]
        child = kill_when_seen(args, calls, kill_at + 1, timeout=30)
        release.set()
        assert len(calls) == kill_at + 1, child.stderr.read()
        resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split()[0] == str(kill_at)  # the replies received before the kill came from the cache
    in_flight = f"sample {kill_at}"
    assert sorted(calls) == sorted([f"sample {i}" for i in range(n)] + [in_flight])  # only the lost one twice
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == n and len({line["key"] for line in lines}) == n
