"""The edit service on loopback: a real uvicorn server in a thread around a real GeneratorEditor on a tiny model."""

import base64
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serving
from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker
from reasonedit.clients.images import decode_base64_image, png_base64
from reasonedit.inference.types import EditRequest
from reasonedit.models import prompts
from reasonedit.config.model import ModelConfig
from reasonedit.models.model import ReasonEditModel
from reasonedit.serve import Limits, ServeConfig, ServerThread, create_app

TEXTS = ["make the red square blue", "add a small circle", "<#Think> fine <#Success>", "score: 7\nreason: ok"]
STEPS = 2


@pytest.fixture(scope="module")
def model():
    return ReasonEditModel.tiny(ModelConfig(), TEXTS, seed=0).eval()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(GeneratorEditor(model), ServeConfig(max_batch=16, batch_wait_ms=20,
                                                         limits=Limits(max_side=256, max_pixels=128 * 128)),
                     model_name="tiny")
    with ServerThread(app) as s:
        yield s


def _body(image, **extra):
    return {"image": png_base64(image), "prompt": "make the red square blue", "num_inference_steps": STEPS, **extra}


def _status(url, **kw):
    return httpx.get(url + "/status", **kw).json()


class GatedEditor:
    """Edits only once `gate` is set: holds the worker so the queue fills or a request times out."""

    name = "gated"

    def __init__(self):
        self.gate = threading.Event()

    def edit(self, requests):
        self.gate.wait(10)
        return [r.image for r in requests]


class BoomEditor:
    """Refuses requests whose prompt says boom (a ValueError, as an editor says a request is bad)."""

    name = "boom"

    def edit(self, requests):
        if any("boom" in r.prompt for r in requests):
            raise ValueError("cannot edit boom")
        return [255 - r.image for r in requests]


def test_64_concurrent_requests_are_all_answered_in_batches(server, image, model):
    before = _status(server.url)
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda i: client.post(server.url + "/edit", json=_body(image, seed=i)), range(64)))
    assert [a.status_code for a in answers] == [200] * 64
    after = _status(server.url)
    assert after["served"] - before["served"] == 64
    assert 0 < after["batches"] - before["batches"] < 64 and after["max_batch_size"] > 1
    # each answer is that request's own edit, whatever it was batched with
    direct = GeneratorEditor(model).edit([EditRequest(image, "make the red square blue", seed=5,
                                                      num_inference_steps=STEPS)])[0]
    # equal to float rounding: a batch packs other samples beside it, which changes the order of sums in the
    # generator's attention, so a pixel may land one level off; another seed's answer differs everywhere
    mine = decode_base64_image(answers[5].json()["edited_image"]).astype(int)
    other = decode_base64_image(answers[6].json()["edited_image"]).astype(int)
    off = np.abs(mine - direct.astype(int))
    assert off.max() <= 2 and (off > 0).mean() < 0.01, (off.max(), (off > 0).mean())
    assert (np.abs(other - direct.astype(int)) > 2).mean() > 0.1


def _png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("change,status,field,words", [
    ({"image": "not base64 !!"}, 422, "image", "base64"),
    ({"image": base64.b64encode(b"plain text, not an image").decode()}, 422, "image", "not a readable image"),
    ({"image": base64.b64encode(_png_bytes(np.zeros((300, 8, 3), np.uint8))).decode()}, 422, "image", "side limit"),
    ({"image": base64.b64encode(_png_bytes(np.zeros((200, 200, 3), np.uint8))).decode()}, 422, "image", "pixels"),
    ({"promt": "typo"}, 422, "promt", "did you mean 'prompt'"),
    ({"num_inference_stpes": 2}, 422, "num_inference_stpes", "did you mean 'num_inference_steps'"),
    ({"enhance_promt": False}, 422, "enhance_promt", "did you mean 'enhance_prompt'"),  # EditThinker's, misspelt
    ({"num_inference_steps": None, "num_inference_step": 1000}, 422, "num_inference_step", "at most 100"),  # as sent
    ({"num_inference_steps": "two"}, 422, "num_inference_steps", "expected int"),
    ({"num_inference_steps": 1000}, 422, "num_inference_steps", "at most 100"),
    ({"guidance_scale": -1}, 422, "guidance_scale", "at least 0"),
    ({"seed": True}, 422, "seed", "expected int"),
    ({"prompt": "  "}, 422, "prompt", "empty"),
    ({"image": None}, 422, "image", "missing"),
    ({"reflect": True}, 422, "reflect", "no thinker"),
])
def test_a_malformed_request_is_4xx_naming_the_field(server, image, change, status, field, words):
    body = {k: v for k, v in {**_body(image), **change}.items() if v is not None}
    answer = httpx.post(server.url + "/edit", json=body)
    assert answer.status_code == status
    got = answer.json()
    assert got["success"] is False and got["field"] == field and words in got["error"], got


@pytest.mark.parametrize("content,ctype,status,field", [
    (b"{not json", "application/json", 400, "body"),
    (b"[1, 2]", "application/json", 422, "body"),
    (b"image=x", "text/plain", 415, "content-type"),
])
def test_a_body_that_is_not_a_json_object_is_4xx_and_the_server_lives_on(server, image, content, ctype, status, field):
    answer = httpx.post(server.url + "/edit", content=content, headers={"content-type": ctype})
    assert answer.status_code == status and answer.json()["field"] == field
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(server.url + "/edit", json=_body(image)).status_code == 200


@pytest.mark.parametrize("route,file_field", [("/edit", "image"), ("/edit-upload", "image_file")])
def test_a_multipart_upload_is_edited_like_json(server, image, route, file_field):
    upload = httpx.post(server.url + route, files={file_field: ("in.png", _png_bytes(image), "image/png")},
                        data={"prompt": "make the red square blue", "num_inference_steps": str(STEPS), "seed": "3"})
    as_json = httpx.post(server.url + "/edit", json=_body(image, seed=3))
    assert upload.status_code == 200, upload.text
    assert upload.json()["edited_image"] == as_json.json()["edited_image"]


def test_a_multipart_field_of_the_wrong_type_is_named(server, image):
    answer = httpx.post(server.url + "/edit", files={"image": ("in.png", _png_bytes(image), "image/png")},
                        data={"prompt": "x", "seed": "soon"})
    assert answer.status_code == 422 and answer.json()["field"] == "seed"


def test_the_token_is_enforced_on_edit_and_status_but_not_health(image):
    app = create_app(BoomEditor(), ServeConfig(token="s3cret"))
    with ServerThread(app) as s:
        assert httpx.post(s.url + "/edit", json=_body(image)).status_code == 401
        wrong = httpx.post(s.url + "/edit", json=_body(image), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["field"] == "authorization"
        assert httpx.get(s.url + "/status").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        ok = httpx.post(s.url + "/edit", json=_body(image), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        np.testing.assert_array_equal(decode_base64_image(ok.json()["edited_image"]), 255 - image)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_answers_503_and_the_queued_requests_still_succeed(image):
    editor = GatedEditor()
    app = create_app(editor, ServeConfig(max_queue=2, max_batch=1, batch_wait_ms=0))
    with ServerThread(app) as s, httpx.Client(timeout=30) as client, ThreadPoolExecutor(3) as pool:
        first = pool.submit(client.post, s.url + "/edit", json=_body(image))
        _wait_for(lambda: _status(s.url)["in_flight"] == 1)  # the worker holds it
        queued = [pool.submit(client.post, s.url + "/edit", json=_body(image)) for _ in range(2)]
        _wait_for(lambda: _status(s.url)["queue_depth"] == 2)
        refused = client.post(s.url + "/edit", json=_body(image))
        assert refused.status_code == 503 and "queue is full" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        editor.gate.set()
        assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        assert _status(s.url)["rejected"] == 1


def test_a_request_that_outlives_the_timeout_is_504(image):
    editor = GatedEditor()
    app = create_app(editor, ServeConfig(timeout=0.3))
    with ServerThread(app) as s:
        answer = httpx.post(s.url + "/edit", json=_body(image))
        editor.gate.set()
        assert answer.status_code == 504 and "timeout" in answer.json()["error"]
        assert _status(s.url)["timed_out"] == 1


def test_one_bad_request_does_not_fail_the_batch_it_rode_in(image):
    app = create_app(BoomEditor(), ServeConfig(max_batch=8, batch_wait_ms=100))
    with ServerThread(app) as s, httpx.Client(timeout=30) as client, ThreadPoolExecutor(4) as pool:
        prompts = ["a", "boom", "b", "c"]
        answers = list(pool.map(lambda p: client.post(s.url + "/edit", json={**_body(image), "prompt": p}), prompts))
        assert [a.status_code for a in answers] == [200, 422, 200, 200]
        assert "cannot edit boom" in answers[1].json()["error"]
        assert _status(s.url)["failed"] == 1


# EditThinker's client (inference/run_edit_thinker_inference.py, get_model_config("flux-kontext-dev") and
# call_api_with_retry) posts {"image", "prompt", **model_config} to /edit and reads success / edited_image.
def _editthinker_request(image):
    return {"image": png_base64(image), "prompt": "make the red square blue", "num_inference_step": 28,
            "guidance_scale": 2.5, "width": 1024, "height": 1024, "enhance_prompt": False, "seed": 0}


def test_editthinkers_request_is_refused_in_strict_mode_and_health_says_so(model, image):
    with ServerThread(create_app(GeneratorEditor(model), ServeConfig(compat="strict"))) as s:
        answer = httpx.post(s.url + "/edit", json=_editthinker_request(image))
        health = httpx.get(s.url + "/health").json()
    got = answer.json()
    assert answer.status_code == 422 and got["field"] == "num_inference_step"
    assert "did you mean 'num_inference_steps'" in got["error"] and "--compat editthinker" in got["error"]
    assert health["accepts"] == ["reasonedit"]


def test_editthinkers_request_works_by_default_and_each_ignored_field_is_logged_once(model, image, caplog):
    app = create_app(GeneratorEditor(model), ServeConfig())
    with caplog.at_level(logging.INFO, logger="reasonedit.serve.schema"), ServerThread(app) as s:
        answers = [httpx.post(s.url + "/edit", json=_editthinker_request(image), timeout=60) for _ in range(2)]
        plain = httpx.post(s.url + "/edit", json={**_body(image), "num_inference_steps": 28, "guidance_scale": 2.5},
                           timeout=60)
    result = answers[0].json()
    assert answers[0].status_code == 200 and result["success"] is True
    assert result["num_inference_steps"] == 28 and result["renamed_fields"] == {"num_inference_step": "num_inference_steps"}
    assert sorted(result["ignored_fields"]) == ["enhance_prompt", "height", "width"]
    # the mapped step count has its meaning: the same image as the same request in our own words
    assert result["edited_image"] == plain.json()["edited_image"] == answers[1].json()["edited_image"]
    messages = [r.getMessage() for r in caplog.records]
    for name in ("enhance_prompt", "width", "height", "num_inference_step"):
        assert sum(f"'{name}'" in m for m in messages) == 1, messages


def test_the_full_loop_runs_behind_the_same_route_and_returns_its_trace(model, image):
    replies = {"think": "make the square blue", "describe": "a blue square", "score": "score: 3\nreason: still red",
               "decide": "<#Think> not blue yet <#Reflection> paint the square blue"}

    def generate(batch):
        return [replies[prompts.role_of(conv)] for conv in batch]

    app = create_app(GeneratorEditor(model), ServeConfig(), thinker=ReasonerThinker(model, generate=generate))
    with ServerThread(app) as s:
        answer = httpx.post(s.url + "/edit", json=_body(image, think=True, reflect=True, rounds=2), timeout=60)
        status = _status(s.url)
    assert answer.status_code == 200, answer.text
    trace = answer.json()["trace"]
    assert trace["thought"] == "make the square blue" and trace["stopped"] == "round_limit"
    assert [r["instruction"] for r in trace["rounds"]] == ["make the square blue", "paint the square blue"]
    assert [r["decision"] for r in trace["rounds"]] == ["reflection", "reflection"]
    assert status["loops"] == 1 and status["served"] == 2  # the loop's edits went through the queue
    assert decode_base64_image(answer.json()["edited_image"]).shape == image.shape


@pytest.fixture(scope="module")
def saved_model(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("serve") / "model")


def test_reasonedit_serve_serves_a_saved_model(model, saved_model, image):
    with serving("--model", saved_model, "--token", "t", "--max-batch", "4") as url:
        answer = httpx.post(url + "/edit", json=_body(image), headers={"Authorization": "Bearer t"}, timeout=60)
        assert answer.status_code == 200
        direct = GeneratorEditor(model).edit([EditRequest(image, "make the red square blue", num_inference_steps=STEPS)])
        np.testing.assert_array_equal(decode_base64_image(answer.json()["edited_image"]), direct[0])


def test_reasonedit_serve_without_a_model_folder_is_a_clear_error(tmp_path, capsys):
    from reasonedit import cli
    assert cli.main(["serve", "--model", str(tmp_path / "nothing")]) == 1
    assert "not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--max-queue", "0"), ("--timeout", "0"), ("--max-side", "0")])
def test_reasonedit_serve_with_a_bad_setting_names_it(saved_model, capsys, flag, value):
    from reasonedit import cli
    assert cli.main(["serve", "--model", str(saved_model), flag, value]) == 1
    assert flag in capsys.readouterr().err


def test_a_broken_multipart_body_is_400_in_the_services_error_format(server):
    answer = httpx.post(server.url + "/edit", content=b"--xyz\r\nnot a part",
                        headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert answer.status_code == 400 and answer.json()["field"] == "body", answer.text
