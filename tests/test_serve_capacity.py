"""The edit service under load and at its deadlines: a request that times out is stopped (not left running),
loop requests and plain edits have separate capacity, validation counts against the deadline, slow clients
time out, /health reports overload, and SIGTERM drains within the grace period. Real uvicorn servers on
loopback; a real GeneratorEditor on a tiny model where the work has to be real."""

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import start_serve
from reasonedit.clients.images import png_base64
from reasonedit.config.model import ModelConfig
from reasonedit.inference import cancel
from reasonedit.inference.builtin import GeneratorEditor
from reasonedit.inference.types import EditRequest, Reflection
from reasonedit.models.model import ReasonEditModel
from reasonedit.serve import Limits, ServeConfig, ServerThread, create_app
from reasonedit.serve.batcher import EditBatcher
from reasonedit.testing.chat_server import Reply, ScriptedChatServer


@pytest.fixture(scope="module")
def model():
    return ReasonEditModel.tiny(ModelConfig(), ["make the red square blue"], seed=0).eval()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _body(image, **extra):
    return {"image": png_base64(image), "prompt": "make the red square blue", **extra}


class CountingEditor(GeneratorEditor):
    """The real generator, recording when each sampling step ends."""

    def __init__(self, model):
        self.steps: list[float] = []
        super().__init__(model, progress=lambda i, n: self.steps.append(time.monotonic()))


class Gate:
    """A thinker that holds each think call until the gate opens (a slow remote chat model)."""

    name = "gated-thinker"

    def __init__(self):
        self.open = threading.Event()
        self.calls = 0

    def think(self, sources, instructions):
        self.calls += 1
        self.open.wait(30)
        return list(instructions)

    def reflect(self, sources, edited, instructions, previous):
        return [Reflection("reflection", score=1.0, instruction=i + " again") for i in instructions]


class Reflecting:
    """A fast thinker that never says Success: a loop runs every round it is given."""

    name = "reflecting"

    def think(self, sources, instructions):
        return list(instructions)

    def reflect(self, sources, edited, instructions, previous):
        return [Reflection("reflection", score=1.0, instruction=i + " again") for i in instructions]


class Inverter:
    name = "inverter"

    def __init__(self):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def edit(self, requests):
        self.gate.wait(30)
        self.batches.append([r.prompt for r in requests])
        return [255 - r.image for r in requests]


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_timed_out_edit_stops_within_one_sampling_step(model, image):
    editor = CountingEditor(model)
    app = create_app(editor, ServeConfig(timeout=0.5, limits=Limits(max_side=256, max_pixels=128 * 128)))
    large = np.tile(image, (4, 4, 1))  # 128 px: 100 steps take 1-3 s on these cores: running at the deadline
    with ServerThread(app) as server:
        answer = httpx.post(server.url + "/edit", json=_body(large, num_inference_steps=100), timeout=30)
        answered = time.monotonic()
        assert answer.status_code == 504 and answer.json()["success"] is False
        _wait_for(lambda: app.state.batcher.in_flight == 0)
        time.sleep(0.3)  # a step lasts 10-30 ms here: a sampler left running would add 10-30 more meanwhile
        assert 0 < len(editor.steps) < 100
        assert sum(t > answered for t in editor.steps) <= 1  # at most the step that was running
        assert app.state.batcher.stats.stopped == 1
        status = httpx.get(server.url + "/status").json()
        assert status["timed_out"] == 1 and status["stopped"] == 1


def test_a_timed_out_loop_stops_and_frees_its_slot(model, image):
    editor = CountingEditor(model)
    app = create_app(editor, ServeConfig(timeout=0.5, max_loops=1, limits=Limits(max_side=256, max_pixels=128 * 128)),
                     thinker=Reflecting(), thinker_shares_model=False)
    with ServerThread(app) as server:
        large = np.tile(image, (4, 4, 1))  # 128 px: each round's 100 steps take 1-3 s on these cores
        body = _body(large, think=True, reflect=True, rounds=8, num_inference_steps=100)
        answer = httpx.post(server.url + "/edit", json=body, timeout=30)
        answered = time.monotonic()
        assert answer.status_code == 504
        _wait_for(lambda: httpx.get(server.url + "/status").json()["loops_running"] == 0, timeout=5)
        assert sum(t > answered for t in editor.steps) <= 1
        status = httpx.get(server.url + "/status").json()
        assert status["loops_stopped"] == 1 and status["stopped"] == 1
        assert not [t for t in threading.enumerate() if t.name == "edit-loop"]
        # the slot is free again: the next loop request runs (and finishes in time with two steps)
        again = httpx.post(server.url + "/edit", json=_body(image, think=True, reflect=False, num_inference_steps=2),
                           timeout=30)
        assert again.status_code == 200, again.text


def test_loops_beyond_their_slots_are_refused_while_plain_edits_pass_and_health_says_so(image):
    gate, editor = Gate(), Inverter()
    app = create_app(editor, ServeConfig(max_loops=2, max_loop_queue=1, timeout=60), thinker=gate,
                     thinker_shares_model=False)
    body = _body(image, think=True, reflect=False)
    with ServerThread(app) as server, httpx.Client(timeout=60) as client, ThreadPoolExecutor(4) as pool:
        assert client.get(server.url + "/health").json()["ready"] is True
        held = [pool.submit(client.post, server.url + "/edit", json=body) for _ in range(3)]
        _wait_for(lambda: gate.calls == 2 and client.get(server.url + "/status").json()["loops_waiting"] == 1)
        refused = client.post(server.url + "/edit", json=body)
        assert refused.status_code == 503 and "loop slot" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        health = client.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["overloaded"] == ["loop slots"]
        assert health.json()["ready"] is False
        # the plain lane is not the loops' to fill: an edit goes through while every loop slot is taken
        plain = client.post(server.url + "/edit", json=_body(image, prompt="plain"))
        assert plain.status_code == 200
        assert sum(t.name == "edit-loop" for t in threading.enumerate()) == 2  # threads bounded by the slots
        gate.open.set()
        assert [f.result().status_code for f in held] == [200] * 3
        assert client.get(server.url + "/health").status_code == 200


def test_a_full_plain_queue_makes_health_report_overload(image):
    editor = Inverter()
    editor.gate.clear()
    app = create_app(editor, ServeConfig(max_queue=2, max_batch=1, timeout=60))
    with ServerThread(app) as server, httpx.Client(timeout=60) as client, ThreadPoolExecutor(3) as pool:
        held = [pool.submit(client.post, server.url + "/edit", json=_body(image))]
        _wait_for(lambda: app.state.batcher.in_flight == 1)  # the worker holds the first at the gate
        held += [pool.submit(client.post, server.url + "/edit", json=_body(image)) for _ in range(2)]
        _wait_for(lambda: app.state.batcher.depth == 2)
        health = client.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["overloaded"] == ["edit queue"]
        editor.gate.set()
        assert [f.result().status_code for f in held] == [200] * 3
        assert client.get(server.url + "/health").json()["status"] == "ok"


def _request(prompt, lane_batcher, lane):
    return lane_batcher.submit(EditRequest(np.zeros((2, 2, 3), np.uint8), prompt), lane)


def test_plain_edits_go_before_waiting_loop_edits_and_loops_still_get_their_turn():
    editor = Inverter()
    editor.gate.clear()
    batcher = EditBatcher(editor, max_batch=1, batch_wait=0, edit_turns=2).start()
    try:
        first = _request("loop 0", batcher, "loop")
        _wait_for(lambda: batcher.in_flight == 1)  # the worker holds loop 0 at the gate
        tickets = [_request(f"loop {i}", batcher, "loop") for i in (1, 2)]
        tickets += [_request(f"edit {i}", batcher, "edit") for i in range(4)]
        editor.gate.set()
        for t in [first, *tickets]:
            t.future.result(10)
    finally:
        batcher.stop()
    order = [b[0] for b in editor.batches]
    # plain edits first, but after edit_turns=2 of them a waiting loop edit runs
    assert order == ["loop 0", "edit 0", "edit 1", "loop 1", "edit 2", "edit 3", "loop 2"]
    assert batcher.stats.loop_edits == 3


def test_an_abandoned_edit_is_dropped_before_it_runs_and_a_shared_batch_runs_on():
    editor = Inverter()
    editor.gate.clear()
    batcher = EditBatcher(editor, max_batch=4, batch_wait=0.2).start()
    try:
        holder = _request("holder", batcher, "edit")
        _wait_for(lambda: batcher.in_flight == 1)
        dropped, kept = _request("dropped", batcher, "edit"), _request("kept", batcher, "edit")
        dropped.abandon()
        editor.gate.set()
        assert kept.future.result(10) is not None and holder.future.result(10) is not None
    finally:
        batcher.stop()
    assert ["dropped" not in b for b in editor.batches] == [True] * len(editor.batches)
    assert batcher.stats.cancelled == 1


def test_a_check_outside_any_scope_never_raises_and_scopes_nest():
    cancel.check()
    outer = threading.Event()
    with cancel.cancel_scope(outer.is_set):
        with cancel.cancel_scope(lambda: False):
            cancel.check()
            outer.set()
            with pytest.raises(cancel.Cancelled, match="sampling"):
                cancel.check("sampling")
    cancel.check()


def test_validation_and_decoding_count_against_the_deadline(image, monkeypatch):
    import reasonedit.serve.app as app_module

    real = app_module.parse_edit

    def slow_parse(*args, **kwargs):  # a decode that takes longer than the whole request may
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "parse_edit", slow_parse)
    editor = Inverter()
    with ServerThread(create_app(editor, ServeConfig(timeout=0.3))) as server:
        answer = httpx.post(server.url + "/edit", json=_body(image), timeout=30)
    assert answer.status_code == 504 and answer.json()["success"] is False
    assert editor.batches == []  # never queued


def _connect(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def _read_all(sock):
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_a_body_that_trickles_in_is_408_and_the_connection_closed(image):
    with ServerThread(create_app(Inverter(), ServeConfig(read_timeout=0.4))) as server:
        sock = _connect(server)
        sock.sendall(b"POST /edit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"image\": \"")
        answer = _read_all(sock)  # the server answers and closes: recv returns b"" at the end
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b'"field":"body"' in answer
        assert httpx.get(server.url + "/status").json()["slow_bodies"] == 1


@pytest.mark.parametrize("sent", [b"", b"POST /edit HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "trickling-head"])
def test_a_connection_that_does_not_send_its_headers_in_time_is_408_and_closed(sent):
    with ServerThread(create_app(Inverter(), ServeConfig(header_timeout=0.4))) as server:
        sock = _connect(server)
        sock.sendall(sent)
        t0 = time.monotonic()
        answer = _read_all(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b'"field":"headers"' in answer
        assert time.monotonic() - t0 < 5
        # a request that does arrive in time is served as ever on a kept-alive connection
        with httpx.Client() as client:
            assert client.get(server.url + "/health").status_code == 200
            time.sleep(0.6)  # longer than the header timeout, shorter than the keep-alive wait
            assert client.get(server.url + "/health").status_code == 200


def _shapes_image():
    from reasonedit.shapes.synth import Synthesizer
    from reasonedit.shapes.world import ShapesWorld

    return Synthesizer(ShapesWorld(), seed=0).edit_pair("test", 0).source


def test_sigterm_drains_in_flight_requests_then_cancels_the_rest_and_exits_within_the_grace_period():
    def respond(req):
        # a think prompt carries the user's instruction: "slow" ones take longer than the grace period
        return Reply("Make the red circle blue.", delay=60.0) if "slow" in req.text else Reply("Make the red circle blue.", delay=0.5)

    image = _shapes_image()
    with ScriptedChatServer(respond) as chat:
        proc, url = start_serve("--editor", "shapes", "--no-auth", "--thinker", chat.url + "/v1",
                                "--thinker-model", "m", "--grace", "2")
        try:
            with ThreadPoolExecutor(2) as pool:
                def post(prompt):
                    try:
                        return httpx.post(url + "/edit", json=_body(image, prompt=prompt, think=True), timeout=60)
                    except httpx.TransportError as e:
                        return e
                quick, slow = pool.submit(post, "quick: make it blue"), pool.submit(post, "slow: make it blue")
                _wait_for(lambda: len(chat.log) == 2)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(2 + 10)
                took = time.monotonic() - t0
                drained, cut = quick.result(), slow.result()
            assert code == 0, proc.communicate()[1]
            assert 0.2 < took < 2 + 5  # the quick one was waited for; the slow one not past the grace
            assert drained.status_code == 200 and drained.json()["success"] is True
            assert isinstance(cut, httpx.TransportError) or cut.status_code >= 500
            with pytest.raises(httpx.TransportError):
                httpx.get(url + "/health", timeout=2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
