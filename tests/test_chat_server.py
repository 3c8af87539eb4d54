import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from reasonedit.testing import Reply, ScriptedChatServer


def _png_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(base_url: str, text: str = "hi", images=(), timeout: float = 5.0, **extra) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": _png_url(a)}} for a in images] + [{"type": "text", "text": text}]
    body = {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
            **extra}
    return httpx.post(base_url + "/chat/completions", json=body, timeout=timeout)


def test_reply_is_respond_of_the_parsed_request_with_its_images():
    seen = []

    def respond(req):
        seen.append((req.system, req.text, req.temperature, req.model, req.images()))
        return f"{req.text.upper()} {len(req.image_urls)}"

    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    with ScriptedChatServer(respond) as server:
        res = _chat(server.base_url, "look", images=[image], temperature=0.3)
    assert res.status_code == 200
    assert res.json()["choices"][0]["message"] == {"role": "assistant", "content": "LOOK 1"}
    system, text, temperature, model, images = seen[0]
    assert (system, text, temperature, model) == ("be brief", "look", 0.3, "m")
    np.testing.assert_array_equal(images[0], image)
    assert server.served == 1 and server.requests == 1


def test_models_endpoint_lists_the_served_model():
    with ScriptedChatServer(model="judge-x") as server:
        res = httpx.get(server.base_url + "/models")
    assert res.status_code == 200 and [m["id"] for m in res.json()["data"]] == ["judge-x"]


def test_scripted_errors_and_malformed_bodies_come_first_then_respond():
    with ScriptedChatServer(lambda req: "fine") as server:
        server.script(Reply.error(429), Reply.error(503), Reply.malformed())
        answers = [_chat(server.base_url) for _ in range(4)]
    assert [a.status_code for a in answers] == [429, 503, 200, 200]
    assert "error" in answers[0].json()
    with pytest.raises(ValueError):
        answers[2].json()
    assert answers[3].json()["choices"][0]["message"]["content"] == "fine"
    assert server.by_status == {429: 1, 503: 1, 200: 2} and server.served == 1 and server.failed == 3


def test_a_scripted_delay_trips_the_client_timeout_and_the_server_keeps_serving():
    with ScriptedChatServer(lambda req: "late") as server:
        server.script(Reply(delay=2.0))
        started = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            _chat(server.base_url, timeout=0.3)
        assert time.perf_counter() - started < 1.5
        assert _chat(server.base_url).json()["choices"][0]["message"]["content"] == "late"


def test_api_key_is_enforced_when_set():
    with ScriptedChatServer(api_key="sk-test") as server:
        assert _chat(server.base_url).status_code == 401
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        res = httpx.post(server.base_url + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"})
    assert res.status_code == 200


def test_a_bad_request_is_400_naming_the_problem():
    with ScriptedChatServer() as server:
        res = httpx.post(server.base_url + "/chat/completions", json={"model": "m"})
    assert res.status_code == 400 and "messages" in res.json()["error"]["message"]


def test_a_respond_that_raises_is_a_500_saying_why():
    def respond(req):
        raise KeyError("oops")

    with ScriptedChatServer(respond) as server:
        res = _chat(server.base_url)
    assert res.status_code == 500 and "KeyError" in res.json()["error"]["message"]
