"""EditThinker-8B as the thinker, scripted on loopback: one conversation under our loop and under EditThinker's
client's (`loop="editthinker"`), its client's reading of replies our parse fails, and `--thinker-prompt FILE`
and `--loop` on edit, eval and serve."""

import json
import math
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli_here
from reasonedit.clients.http import RetryPolicy
from reasonedit.clients.images import png_base64
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.inference.openai_thinker import OpenAIThinker
from reasonedit.serve import ServeConfig, ServerThread, create_app
from reasonedit.testing import ScriptedChatServer

FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, jitter=0.0)
USER = "make it look like the sea"
# a prompt file in the shape of EditThinker's inference/prompt_template.txt: image markers, its two placeholders
PROMPT = ("<image><image>\nThe user asked: {original_instruction}\nUsed: {rewritten_prompt}\n"
          "Score the edit, then answer with a better prompt or the same one.\n")
SENT = PROMPT.strip().replace("<image>", "")  # what EditThinker's client sends of that file


def et(semantic, quality, answer, think="comparing the two images"):
    return (f"<think>{think}</think>\n<score>{json.dumps({'semantic': semantic, 'quality': quality})}</score>\n"
            f"<answer>{answer}</answer>")


# EditThinker-8B's side of one conversation, by the prompt that made the edit judged ("": its first turn)
CONVERSATION = {
    "": et(0, 10, "turn the square blue"),
    "turn the square blue": et(7, 9, "turn the square deep blue"),  # round 1: the best score, sqrt(63)
    "turn the square deep blue": et(4, 9, "paint the whole square deep blue"),  # round 2: 6
    "paint the whole square deep blue": et(5, 5, "paint the square navy"),  # round 3: 5 (only our loop asks)
}


def used(request) -> str:
    return re.search(r"Used: (.*)\n", request.text).group(1)


def sent(*previous: str) -> list[str]:
    return [SENT.replace("{original_instruction}", USER).replace("{rewritten_prompt}", p) for p in previous]


class StampEditor:
    """Every edit a flat image of its call number, so each round's image says which edit made it."""

    name = "stamp"

    def __init__(self):
        self.requests = []

    def edit(self, requests):
        self.requests += requests
        return [np.full_like(r.image, len(self.requests)) for r in requests]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt_template.txt"
    path.write_text(PROMPT, encoding="utf-8")
    return path


def test_one_conversation_under_our_loop_and_editthinkers(image):
    runs = {}
    with ScriptedChatServer(lambda req: CONVERSATION[used(req)]) as chat:
        for loop in ("reasonedit", "editthinker"):
            start, editor = chat.requests, StampEditor()
            with OpenAIThinker(chat.base_url, "EditThinker-8B", contract="editthinker", prompt_template=PROMPT,
                               loop=loop, retry=FAST) as thinker:
                [trace] = edit_with_reasoning(editor, thinker, [image], [USER], rounds=3, seed=5)  # loop: thinker's
            runs[loop] = trace, chat.requests - start
    (ours, our_calls), (theirs, their_calls) = runs["reasonedit"], runs["editthinker"]
    prompts = ["turn the square blue", "turn the square deep blue", "paint the whole square deep blue"]
    assert [r.instruction for r in ours.rounds] == [r.instruction for r in theirs.rounds] == prompts
    assert all(r.edited_from == "source" for r in ours.rounds + theirs.rounds)
    # ours: a critique after every edit (think + 3), seed + round - 1, the best-scored round
    assert our_calls == 4 and [r.seed for r in ours.rounds] == [5, 6, 7]
    assert ours.best == 0 and ours.rounds[0].score == pytest.approx(math.sqrt(63)) and ours.loop == "reasonedit"
    # EditThinker's client: no critique of the last edit (think + 2), one seed, the last round
    assert their_calls == 3 and [r.seed for r in theirs.rounds] == [5, 5, 5] and theirs.rounds[-1].reflection is None
    assert theirs.best == 2 and theirs.image[0, 0, 0] == 3 and theirs.stopped == "round_limit"
    assert theirs.to_dict()["loop"] == "editthinker" and theirs.to_dict()["best_round"] == 3


PREVIOUS = "turn the square blue"


@pytest.mark.parametrize("reply,decision,instruction,score,note", [
    ('<score>{"semantic": 3, "quality": 9}</score><answer>turn it deep blue</answer>',
     "reflection", "turn it deep blue", math.sqrt(27), "no <think>"),
    ("<think>x</think><score>semantic: 3, quality: 9</score><answer>turn it deep blue</answer>",
     "reflection", "turn it deep blue", None, "<score> is not JSON"),
    ('<think>x</think><score>{"semantic": 3, "quality": 9}</score><answer>turn it deep bl',  # cut off
     "success", None, math.sqrt(27), "no closed <answer>"),
    # the client reads the missing "semantic" as 0: not satisfied by 9s, and it carries on with the answer
    ('<think>x</think><score>{"semantics": 9, "quality": 9}</score><answer>turn it deep blue</answer>',
     "reflection", "turn it deep blue", None, 'no "semantic" key: read as 0'),
])
def test_editthinkers_client_carries_on_where_our_parse_fails(image, reply, decision, instruction, score, note):
    with ScriptedChatServer(lambda req: reply) as chat, \
            OpenAIThinker(chat.base_url, "m", contract="editthinker", retry=FAST) as strict, \
            OpenAIThinker(chat.base_url, "m", contract="editthinker", loop="editthinker", retry=FAST) as lenient:
        [ours] = strict.reflect([image], [image], [USER], [PREVIOUS])
        [theirs] = lenient.reflect([image], [image], [USER], [PREVIOUS])
    assert ours.decision == "failed" and ours.parse_error and strict.parse_errors == 1
    assert (theirs.decision, theirs.instruction, theirs.parse_error) == (decision, instruction, None)
    assert theirs.restart == (decision == "reflection") and lenient.parse_errors == 0
    assert theirs.score == (None if score is None else pytest.approx(score)) and note in theirs.reason


def test_a_loop_that_contradicts_the_thinkers_is_refused(image):
    with OpenAIThinker("http://127.0.0.1:9/v1", "m", contract="editthinker") as thinker, \
            pytest.raises(ValueError, match="loop='editthinker'"):
        edit_with_reasoning(StampEditor(), thinker, [image], [USER], loop="editthinker")


@pytest.fixture(scope="module")
def edit_service():
    with ServerThread(create_app(StampEditor(), ServeConfig())) as server:
        yield server.url


def test_edit_sends_the_prompt_file_as_editthinkers_client_does(edit_service, image, prompt_file, tmp_path):
    Image.fromarray(image).save(tmp_path / "in.png")
    with ScriptedChatServer(lambda req: CONVERSATION[used(req)]) as chat:
        proc = run_cli_here("edit", "--editor", edit_service, "--image", tmp_path / "in.png", "--instruction", USER,
                            "--think", "--reflect", "--rounds", "2", "--seed", "3", "--steps", "1",
                            "--thinker", chat.base_url, "--thinker-model", "EditThinker-8B",
                            "--thinker-contract", "editthinker", "--thinker-prompt", prompt_file,
                            "--loop", "editthinker", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert [r.text for r in chat.log] == sent("", "turn the square blue")  # think, then round 1's critique
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert trace["loop"] == "editthinker" and trace["best_round"] == 2 and "last round 2" in proc.stdout
    assert [r["seed"] for r in trace["rounds"]] == [3, 3]


@pytest.mark.parametrize("command,content,words", [
    ("edit", None, "no such file"),
    ("edit", b"  \n<image><image>\n", "no prompt text"),
    ("edit", b"Judge \xff{original_instruction} {rewritten_prompt}", "not UTF-8"),
    ("edit", b"Judge: {original_instruction}", "{rewritten_prompt}"),
    ("eval", b"Judge: {rewritten_prompt}", "{original_instruction}"),
    ("serve", b"", "no prompt text"),
])
def test_a_prompt_file_that_cannot_serve_is_one_error_line(command, content, words, tmp_path, monkeypatch):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    thinker = ["--thinker", "http://127.0.0.1:9/v1", "--thinker-model", "m", "--thinker-contract", "editthinker",
               "--thinker-prompt", path]
    args = {"edit": ["--image", tmp_path / "in.png", "--instruction", "x", "--editor", "http://127.0.0.1:9",
                     "--reflect", "--out", tmp_path / "out"],
            "eval": ["--bench", "shapes", "--editor", "shapes", "--modes", "think_reflect", "--out", tmp_path / "out"],
            "serve": ["--editor", "shapes", "--no-auth"]}[command]
    monkeypatch.delenv("REASONEDIT_SERVE_TOKEN", raising=False)
    monkeypatch.setattr("reasonedit.serve.runner.serve", lambda *a, **kw: 0)  # never a real server here
    proc = run_cli_here(command, *args, *thinker)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "--thinker-prompt" in lines[0] and str(path) in lines[0] and words in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_prompt_file_needs_editthinkers_contract(prompt_file, tmp_path):
    proc = run_cli_here("edit", "--image", tmp_path / "in.png", "--instruction", "x", "--editor", "http://127.0.0.1:9",
                        "--reflect", "--thinker", "http://127.0.0.1:9/v1", "--thinker-prompt", prompt_file,
                        "--out", tmp_path / "out")
    assert proc.returncode == 1 and "--thinker-contract editthinker" in proc.stderr


def test_eval_sends_the_prompt_file_and_records_the_loop(prompt_file, tmp_path):
    with ScriptedChatServer(lambda req: et(3, 9, used(req) + ", deeper")) as chat:
        proc = run_cli_here("eval", "--bench", "shapes", "--editor", "shapes", "--thinker", chat.base_url,
                            "--thinker-model", "EditThinker-8B", "--thinker-contract", "editthinker",
                            "--thinker-prompt", prompt_file, "--loop", "editthinker", "--modes", "think_reflect",
                            "--limit", "1", "--rounds", "2", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    samples = len(chat.log) // 2  # think and one critique each: none after the last edit
    assert samples >= 1 and len(chat.log) == 2 * samples
    assert chat.log[0].text.startswith(SENT.split("{original_instruction}")[0])
    traces = [json.loads(p.read_text()) for p in (tmp_path / "out" / "traces" / "think_reflect").rglob("*.json")]
    assert len(traces) == samples and all(t["loop"] == "editthinker" and len(t["rounds"]) == 2 for t in traces)
    stamps = list((tmp_path / "out" / "images" / "think_reflect").rglob(".reasonedit-generation.json"))
    assert [json.loads(p.read_text())["loop"] for p in stamps] == ["editthinker"]


def test_serve_runs_its_loop_requests_by_editthinkers_rules(prompt_file, image, monkeypatch):
    monkeypatch.delenv("REASONEDIT_SERVE_TOKEN", raising=False)
    served = []  # the app `reasonedit serve` would serve, served here on a free port instead
    monkeypatch.setattr("reasonedit.serve.runner.serve", lambda app, host, port, **kw: served.append(app) or 0)
    with ScriptedChatServer(lambda req: CONVERSATION[used(req)]) as chat:
        proc = run_cli_here("serve", "--editor", "shapes", "--no-auth", "world.image_size=48", "world.grid=4",
                            "--thinker", chat.base_url, "--thinker-model", "EditThinker-8B",
                            "--thinker-contract", "editthinker", "--thinker-prompt", prompt_file,
                            "--loop", "editthinker")
        assert proc.returncode == 0 and len(served) == 1, proc.stderr
        with ServerThread(served[0]) as server:
            answer = httpx.post(server.url + "/edit", json={"image": png_base64(image), "prompt": USER, "think": True,
                                                            "reflect": True, "rounds": 2, "seed": 4}, timeout=30)
    assert answer.status_code == 200, answer.text
    trace = answer.json()["trace"]
    assert trace["loop"] == "editthinker" and [r["seed"] for r in trace["rounds"]] == [4, 4]
    assert [r.text for r in chat.log] == sent("", "turn the square blue")


def test_a_served_built_in_reasoner_runs_loop_requests_by_the_rules_it_was_built_for(image):
    from reasonedit.inference.builtin import ReasonerThinker
    from reasonedit.models import prompts

    replies = {"think": "paint it blue", "describe": "a blue image", "score": "score: 3\nreason: still red",
               "decide": "<#Think> not yet <#Reflection> paint it deep blue"}
    asked = []

    def generate(batch):
        asked.extend(prompts.role_of(conv) for conv in batch)
        return [replies[prompts.role_of(conv)] for conv in batch]

    thinker = ReasonerThinker(generate=generate, loop="editthinker")  # behind the model lock: LockedThinker
    with ServerThread(create_app(StampEditor(), ServeConfig(), thinker=thinker)) as server:
        answer = httpx.post(server.url + "/edit", json={"image": png_base64(image), "prompt": USER, "think": True,
                                                        "reflect": True, "rounds": 2, "seed": 7}, timeout=30)
    trace = answer.json()["trace"]
    assert trace["loop"] == "editthinker" and [r["seed"] for r in trace["rounds"]] == [7, 7]
    assert [r["edited_from"] for r in trace["rounds"]] == ["source", "source"] and trace["best_round"] == 2
    assert asked == ["think", "describe", "score", "decide"]  # no critique of the last edit


def test_the_run_config_takes_the_loop_of_its_edit_and_eval_steps():
    from reasonedit.config import load_config

    _, cfg = load_config(None, ["edit.loop=editthinker"])
    assert (cfg.edit.loop, cfg.eval.loop) == ("editthinker", "reasonedit")
    with pytest.raises(ValueError, match="eval.loop"):
        load_config(None, ["eval.loop=theirs"])
