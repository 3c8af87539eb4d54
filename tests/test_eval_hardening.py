"""`reasonedit eval` against hostile or broken input: keys that would write outside --out, symlinks, source images
that are not images / truncated / decompression bombs, judge replies without end, and a judge that never answers."""

import io
import json
import re
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from reasonedit.eval.benchmark import BenchmarkDataError, BenchSample
from reasonedit.eval.benchmarks import get_benchmark
from reasonedit.eval.judge import Judge, JudgeRequest, JudgeSettings
from reasonedit.eval.paths import OutsidePathError, UnsafeNameError, inside
from reasonedit.eval.report import Stamp, write_reports
from reasonedit.eval.runner import GenerationSettings, generate, run_modes, score, write_image
from reasonedit.testing.chat_server import Reply, ScriptedChatServer
from tests.conftest import run_cli_here

GOOD_REPLY = '{"score": [7, 9], "reasoning": "ok"}'
FAST = dict(steps=1, guidance=1.0, batch_size=4)


def png(path, value=0, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def bomb_png(path, width=8000, height=8000):
    """A 70-byte PNG whose header claims width x height pixels (64 MP by default): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC, so the header reads as valid
    path.write_bytes(bytes(data))
    return path


def truncated_png(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def gedit(root, keys=("k0", "k1")):
    """A GEdit-Bench metadata.jsonl copy, one English sample per key (input image in<i>.png)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, key in enumerate(keys):
        png(root / f"in{i}.png", 40 * i)
        rows.append({"key": key, "task_type": "color_alter", "instruction": f"edit {i}", "instruction_language": "en",
                     "input_image": f"in{i}.png", "input_image_raw": f"in{i}.png", "Intersection_exist": True})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


class SourceEditor:
    """An editor that hands back each source unchanged: enough to exercise the write path."""

    name = "source"

    def edit(self, requests):
        return [r.image for r in requests]


# -- 1. keys and output paths -------------------------------------------------------------------------
def _gedit_key(root, key):
    return "gedit", gedit(root, keys=[key]), {}


def _imgedit_key(root, key):
    png(root / "a.png")
    (root / "basic_edit.json").write_text(json.dumps({key: {"id": "a.png", "prompt": "p", "edit_type": "adjust"}}))
    (root / "prompts.json").write_text(json.dumps({"adjust": "rate <edit_prompt>"}))
    return "imgedit", root, {}


def _kris_key(root, key):
    png(root / "biology/1.jpg")
    (root / "biology/annotation.json").write_text(json.dumps({key: {"ori_img": "1.jpg", "ins_en": "x"}}))
    return "kris", root, {"categories": ["biology"]}


def _rise_key(root, key):
    png(root / "t.png")
    (root / "data.json").write_text(json.dumps([{"index": key, "category": "temporal_reasoning", "instruction": "x",
                                                 "image": "t.png", "reference": "y"}]))
    return "rise", root, {}


@pytest.mark.parametrize("make, field, source", [(_gedit_key, "key", "metadata.jsonl:1"),
                                                 (_imgedit_key, "key", "basic_edit.json"),
                                                 (_kris_key, "image_id", "biology/annotation.json"),
                                                 (_rise_key, "index", "data.json: item 0")])
@pytest.mark.parametrize("key", ["../../escape", "/tmp/escape", "..", ""])
def test_a_key_that_is_not_one_plain_file_name_is_refused_naming_benchmark_key_and_file(tmp_path, make, field, source,
                                                                                         key):
    name, root, options = make(tmp_path / "data", key)
    with pytest.raises(BenchmarkDataError) as e:
        get_benchmark(name, **options).load(root)
    message = str(e.value)
    assert message.startswith(f"{name}: ") and f"{field} {key!r} cannot name an output file" in message
    assert str(tmp_path / "data" / source) in message


def test_generation_with_an_escaping_gedit_key_writes_nothing_outside_out(tmp_path):
    data = gedit(tmp_path / "deep/a/b/data", keys=["k0", "../../../../../escape"])
    with pytest.raises(BenchmarkDataError, match="'../../../../../escape' cannot name an output file"):
        bench = get_benchmark("gedit").load(data)
        generate(bench, SourceEditor(), None, tmp_path / "deep/a/b/out/images", "m", GenerationSettings(**FAST))
    assert not list(tmp_path.rglob("escape*"))


def test_an_output_path_through_a_symlink_out_of_the_folder_is_refused_before_writing(tmp_path):
    bench = get_benchmark("shapes", n=1).load(None)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "images/m").mkdir(parents=True)
    (tmp_path / "images/m/shapes").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsidePathError, match="outside the output folder"):
        generate(bench, SourceEditor(), None, tmp_path / "images", "m", GenerationSettings(**FAST))
    assert list(outside.iterdir()) == []


def test_inside_resolves_dots_and_dangling_links_but_keeps_links_that_stay_inside(tmp_path):
    (tmp_path / "out/real").mkdir(parents=True)
    (tmp_path / "out/link").symlink_to(tmp_path / "out/real")
    (tmp_path / "out/dangling.png").symlink_to(tmp_path / "victim.png")  # a file not there yet, outside
    assert inside(tmp_path / "out", tmp_path / "out/link/x.png") == tmp_path / "out/link/x.png"
    for path in (tmp_path / "out/a/../../x.png", tmp_path / "out/dangling.png"):
        with pytest.raises(OutsidePathError):
            inside(tmp_path / "out", path)


def test_a_model_name_that_is_not_one_plain_name_is_refused(tmp_path):
    bench = get_benchmark("shapes", n=1).load(None)
    with pytest.raises(UnsafeNameError, match=r"model name \(--model-name\) '\.\./m' cannot name an output file"):
        generate(bench, SourceEditor(), None, tmp_path / "out/images", "../m", GenerationSettings(**FAST))
    assert not (tmp_path / "out/m").exists()


def test_a_sample_made_without_load_still_cannot_place_its_output_outside(tmp_path):
    bench = get_benchmark("imgedit")
    with pytest.raises(UnsafeNameError, match="'../../x.png'"):
        bench.output_path(tmp_path, BenchSample("../../x", "adjust", "p"), "m")


def test_a_source_file_named_outside_the_data_folder_is_refused(tmp_path):
    png(tmp_path / "secret.png")  # would be read and sent to a remote judge
    png(tmp_path / "data/biology/1.jpg")
    (tmp_path / "data/biology/annotation.json").write_text(
        json.dumps({"1": {"ori_img": "../../secret.png", "ins_en": "x"}}))
    with pytest.raises(BenchmarkDataError, match=r"sample 1: field 'ori_img' '\.\./\.\./secret.png' must be a path "
                                                 r"relative to .* without '\.\.'"):
        get_benchmark("kris", categories=["biology"]).load(tmp_path / "data")


def test_rise_indices_7_and_quoted_7_name_the_same_file_and_are_refused(tmp_path):
    png(tmp_path / "t.png")
    item = {"category": "temporal_reasoning", "instruction": "x", "image": "t.png", "reference": "y"}
    (tmp_path / "data.json").write_text(json.dumps([{**item, "index": 7}, {**item, "index": "7"}]))
    with pytest.raises(BenchmarkDataError, match="item 1: index '7' appears twice"):
        get_benchmark("rise").load(tmp_path)


# -- 2. bad source images -----------------------------------------------------------------------------
def test_bad_source_images_fail_their_samples_only_and_the_report_names_them(tmp_path):
    data = gedit(tmp_path / "data", keys=["good", "text", "cut", "bomb"])
    (data / "in1.png").write_bytes(b"not an image at all")
    truncated_png(data / "in2.png")
    bomb_png(data / "in3.png")
    bench = get_benchmark("gedit").load(data)
    with ScriptedChatServer(lambda req: GOOD_REPLY) as server:
        with Judge(JudgeSettings(base_url=server.base_url, model="j"), cache=tmp_path / "c.jsonl") as judge:
            runs = run_modes(bench, SourceEditor(), None, ["base"], tmp_path / "out", "m",
                             GenerationSettings(**FAST), judge)
    run = runs["base"]
    assert run.generation.generated == 1 and sorted(run.generation.bad_sources) == ["bomb_en", "cut_en", "text_en"]
    by_key = {r.key: r for r in run.results}
    assert by_key["good_en"].status == "ok"
    assert {k: (r.status, r.failure) for k, r in by_key.items() if k != "good_en"} == {
        k: ("failed", "bad_source") for k in ("text_en", "cut_en", "bomb_en")}
    assert "not an image file" in by_key["text_en"].error and "truncated" in by_key["cut_en"].error
    assert "8000x8000 = 64,000,000 pixels, over the limit of 40,000,000" in by_key["bomb_en"].error
    paths = write_reports(tmp_path / "out", {"base": run.report}, Stamp(model="m"), {"base": run.results})
    assert "- 3 source image unreadable: text_en, cut_en, bomb_en" in paths["markdown"].read_text()
    assert json.loads(paths["results"].read_text())["modes"]["base"]["unscored"] == {"bad_source": 3}


def test_a_source_over_the_pixel_limit_is_a_failed_sample(tmp_path):
    bench = get_benchmark("gedit").load(gedit(tmp_path / "data", keys=["k0"]))
    bench.max_pixels = 100  # the fixture's 16 x 16 = 256 pixels
    stats = generate(bench, SourceEditor(), None, tmp_path / "images", "m", GenerationSettings(**FAST))
    assert stats.generated == 0 and "256 pixels, over the limit of 100" in stats.bad_sources["k0_en"]


def test_an_edited_image_that_is_a_bomb_is_failed_without_asking_the_judge(tmp_path):
    bench = get_benchmark("gedit").load(gedit(tmp_path / "data", keys=["k0", "k1"]))
    k0, k1 = bench.samples()
    write_image(bench.output_path(tmp_path / "images", k0, "m"), np.zeros((16, 16, 3), np.uint8))
    bomb_png(bench.output_path(tmp_path / "images", k1, "m"))
    with ScriptedChatServer(lambda req: GOOD_REPLY) as server:
        with Judge(JudgeSettings(base_url=server.base_url, model="j"), cache=tmp_path / "c.jsonl") as judge:
            results, _ = score(bench, tmp_path / "images", "m", judge)
        asked = server.requests
    assert [(r.status, r.failure) for r in results] == [("ok", None), ("failed", "bad_image")]
    assert "edited image unreadable" in results[1].error and asked == 2  # k0's two queries only


# -- 3. judge replies have a size bound ---------------------------------------------------------------
def test_a_reply_over_the_bound_is_a_failed_call_not_retried_nor_cached(tmp_path):
    with ScriptedChatServer(lambda req: "x" * 5000) as server:
        settings = JudgeSettings(base_url=server.base_url, model="j", max_reply_bytes=4096)
        with Judge(settings, cache=tmp_path / "c.jsonl") as judge:
            [reply] = judge.ask([JudgeRequest("q")])
        asked = server.requests
    assert not reply.ok and reply.error_kind == "reply_too_large" and "over the bound of 4,096 bytes" in reply.error
    assert asked == 1 and judge.stats.by_error == {"reply_too_large": 1} and len(judge.cache) == 0


class EndlessServer:
    """A loopback HTTP server answering one POST with a chunked body that never ends (up to `cap` bytes);
    `sent` counts what it got out before the client hung up."""

    def __init__(self, cap=128 << 20, chunk=64 << 10):
        self.cap, self.chunk, self.sent = cap, chunk, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (self.chunk, b" " * self.chunk)
            try:
                while self.sent < self.cap:
                    conn.sendall(piece)
                    self.sent += self.chunk
            except OSError:  # the client hung up: what we want
                pass

    def close(self):
        self.thread.join(10)
        self.sock.close()


def test_an_endless_reply_is_read_only_up_to_the_bound(tmp_path):
    server = EndlessServer()
    try:
        settings = JudgeSettings(base_url=server.base_url, model="j", max_reply_bytes=64 << 10, retries=0)
        with Judge(settings, cache=tmp_path / "c.jsonl") as judge:
            [reply] = judge.ask([JudgeRequest("q")])
    finally:
        server.close()
    assert reply.error_kind == "reply_too_large" and "the rest was not read" in reply.error
    assert server.sent < 32 << 20  # the client stopped reading at 64 KiB; socket buffers hold the rest


def test_a_reply_over_the_bound_fails_its_sample_with_the_reason(tmp_path):
    bench = get_benchmark("gedit").load(gedit(tmp_path / "data", keys=["k0", "k1"]))
    for s in bench.samples():
        write_image(bench.output_path(tmp_path / "images", s, "m"), np.zeros((16, 16, 3), np.uint8))
    with ScriptedChatServer(lambda req: "x" * 9000 if "edit 1" in req.text else GOOD_REPLY) as server:
        settings = JudgeSettings(base_url=server.base_url, model="j", max_reply_bytes=8192)
        with Judge(settings, cache=tmp_path / "c.jsonl") as judge:
            results, stats = score(bench, tmp_path / "images", "m", judge)
    assert [(r.status, r.failure) for r in results] == [("ok", None), ("failed", "not_judged")]
    assert "semantic_consistency: judge gave no reply" in results[1].error and "max_reply_bytes" in results[1].error
    assert (stats.not_judged, stats.answered, stats.unanswered) == (1, 3, 1)


# -- 4. exit status and the count of samples not judged -----------------------------------------------
def _score_images(tmp_path, server, keys=("k0", "k1")):
    """`reasonedit eval --images` (in this process) on a GEdit copy whose every image is present."""
    data = gedit(tmp_path / "data", keys=keys)
    bench = get_benchmark("gedit").load(data)
    for s in bench.samples():
        write_image(bench.output_path(tmp_path / "images", s, "m"), np.zeros((16, 16, 3), np.uint8))
    return run_cli_here("eval", "--bench", "gedit", "--data", data, "--images", tmp_path / "images",
                        "--judge-url", server.base_url, "--judge-model", "j", "--judge-retries", "0",
                        "--out", tmp_path / "out")


def test_a_judge_that_never_answers_exits_1_and_the_report_counts_every_sample_not_judged(tmp_path):
    with ScriptedChatServer(lambda req: Reply.error(503)) as server:
        done = _score_images(tmp_path, server)
    assert done.returncode == 1 and "never answered: no reply to any of its 4 queries" in done.stderr
    assert "m: 2 of 2 samples not judged" in done.stderr
    assert "- 2 not judged (the judge gave no reply" in (tmp_path / "out/report.md").read_text()
    assert json.loads((tmp_path / "out/results.json").read_text())["modes"]["m"]["unscored"] == {"not_judged": 2}


def test_a_judge_that_answers_some_calls_exits_0_and_says_how_many_were_not_judged(tmp_path):
    with ScriptedChatServer(lambda req: Reply.error(503) if "edit 1" in req.text else GOOD_REPLY) as server:
        done = _score_images(tmp_path, server, keys=("k0", "k1", "k2"))
    assert done.returncode == 0, done.stderr
    assert "m: 1 of 3 samples not judged" in done.stderr
    assert "- 1 not judged (the judge gave no reply; a rerun asks again): k1_en" in \
        (tmp_path / "out/report.md").read_text()


def test_an_editor_that_never_answers_exits_1_naming_its_url(tmp_path, monkeypatch):
    from reasonedit.clients.http import RetryPolicy
    monkeypatch.setattr(RetryPolicy, "wait", lambda self, retry, retry_after=None: 0.0)  # no backoff sleeps
    with socket.create_server(("127.0.0.1", 0)) as sock:
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with ScriptedChatServer(lambda req: GOOD_REPLY) as judge:
        done = run_cli_here("eval", "--bench", "gedit", "--data", gedit(tmp_path / "data"), "--editor", dead,
                            "--judge-url", judge.base_url, "--judge-model", "j", "--out", tmp_path / "out")
    assert done.returncode == 1 and dead in done.stderr
