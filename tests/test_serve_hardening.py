"""The edit service against hostile and careless clients: every bad input is a JSON 4xx naming the field,
bodies are cut off while they stream in, upstream failures are 502/503, and authentication cannot be
switched off by accident. A real uvicorn server in a thread around editors that need no model."""

import base64
import io
import json
import select
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from reasonedit.clients.http import Failure, ServiceError
from reasonedit.clients.images import png_base64
from reasonedit.serve import Limits, ServeConfig, ServerThread, create_app

MAX_BODY = 2 ** 20
UP = "http://up:8000"
UNREACHABLE = "the upstream is unreachable"
BROKEN = "the upstream answers 500"


class UpstreamEditor:
    """Inverts the image, as a remote editing service behind an HttpEditor would; two prompts make that
    service fail the way HttpEditor reports it (a ServiceError with each attempt's failure)."""

    name = "upstream"

    def edit(self, requests):
        for r in requests:
            if r.prompt == UNREACHABLE:
                raise ServiceError("edit failed after 2 attempt(s)", [Failure(UP, "ConnectError", "transport"),
                                                                     Failure(UP, "timed out", "timeout")])
            if r.prompt == BROKEN:
                raise ServiceError("edit failed after 1 attempt(s)", [Failure(UP, "HTTP 500", "http_500")])
        return [255 - r.image for r in requests]


class UpstreamThinker:
    """A remote chat model that is down with a 500, as an OpenAIThinker reports it."""

    name = "upstream-thinker"

    def think(self, sources, instructions):
        raise ServiceError("think failed after 1 attempt(s)", [Failure("http://chat:8001/v1", "HTTP 500", "http_500")])

    def reflect(self, sources, edited, instructions, previous):
        raise AssertionError("not reached")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(max_body_bytes=MAX_BODY, limits=Limits(max_side=65536, max_pixels=128 * 128))
    app = create_app(UpstreamEditor(), config, thinker=UpstreamThinker(), thinker_shares_model=False)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def guarded():
    with ServerThread(create_app(UpstreamEditor(), ServeConfig(token="s3cret"))) as s:
        yield s


def _body(image, **extra):
    return {"image": png_base64(image), "prompt": "invert it", **extra}


def _raw_json(image, **raw):
    """A JSON body with some values written as raw JSON text (NaN, escapes, deep nesting)."""
    text = json.dumps({k: v for k, v in _body(image).items() if k not in raw})[:-1]
    return (text + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}").encode()


def _post_raw(url, content, ctype="application/json"):
    return httpx.post(url + "/edit", content=content, headers={"content-type": ctype}, timeout=30)


def _refused(answer, status, field, words):
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    got = answer.json()
    assert got["success"] is False and got["field"] == field and words in got["error"], got


def _encoded(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


# -- fields and JSON bodies --------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [65, 1001, 100_000])
def test_json_nested_deeper_than_64_levels_is_400_naming_the_body(server, image, depth):
    answer = _post_raw(server.url, _raw_json(image, prompt="[" * depth + "]" * depth))
    _refused(answer, 400, "body", "nested deeper than 64")


def test_json_nested_64_levels_is_read_and_judged_by_its_fields(server, image):
    answer = _post_raw(server.url, _raw_json(image, prompt="[" * 63 + "]" * 63))
    _refused(answer, 422, "prompt", "expected str")


def test_a_body_of_more_json_values_than_a_request_can_hold_is_refused_before_parsing(server, image):
    answer = _post_raw(server.url, _raw_json(image, prompt="[" + "{}," * 100_000 + "{}]"))
    _refused(answer, 400, "body", "JSON values")


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_number_is_422_naming_the_field(server, image, raw):
    _refused(_post_raw(server.url, _raw_json(image, guidance_scale=raw)), 422, "guidance_scale", "finite")


# found by the fuzz (tests/test_serve_fuzz.py, kind "guidance_scale/huge-integer"): float() of an integer this
# long raised OverflowError, answered 500
@pytest.mark.parametrize("sign", ["", "-"])
def test_an_integer_past_the_float_range_as_guidance_scale_is_422_naming_it(server, image, sign):
    answer = _post_raw(server.url, _raw_json(image, guidance_scale=sign + "1" + "0" * 400))
    _refused(answer, 422, "guidance_scale", "finite")


# found by the fuzz (kinds "*/huge-integer"): an integer literal of over 4300 digits is valid JSON, but int()
# refuses it, and the body was answered 400 as "not valid JSON" instead of the field as out of range
@pytest.mark.parametrize("field", ["seed", "num_inference_steps", "rounds", "guidance_scale"])
def test_an_integer_too_long_for_python_to_read_is_422_naming_its_field(server, image, field):
    answer = _post_raw(server.url, _raw_json(image, **{field: "9" * 5000}))
    _refused(answer, 422, field, "finite")


def test_a_non_finite_number_in_a_form_is_422_naming_the_field(server, image):
    answer = httpx.post(server.url + "/edit", files={"image": ("in.png", _encoded(image, "PNG"), "image/png")},
                        data={"prompt": "invert it", "guidance_scale": "nan"})
    _refused(answer, 422, "guidance_scale", "finite")


@pytest.mark.parametrize("raw,field", [
    ({"prompt": '"make it \\ud800 blue"'}, "prompt"),
    ({"negative_prompt": '"blurry \\udfff"'}, "negative_prompt"),
    ({"\\ud83d": 1}, "\\ud83d"),  # a field's name
])
def test_an_unpaired_surrogate_in_any_text_is_422_naming_the_field(server, image, raw, field):
    answer = _post_raw(server.url, _raw_json(image, **raw))
    _refused(answer, 422, field, "unpaired surrogate")


def test_an_unpaired_surrogate_in_the_image_text_is_422_naming_the_image(server):
    _refused(_post_raw(server.url, b'{"image": "\\udbff", "prompt": "x"}'), 422, "image", "unpaired surrogate")


def test_a_surrogate_pair_is_a_character_and_is_accepted(server, image):
    answer = _post_raw(server.url, _raw_json(image, negative_prompt='"no \\ud83d\\ude00"'))
    assert answer.status_code == 200, answer.text


def test_a_field_given_twice_in_json_is_422_naming_it(server, image):
    answer = _post_raw(server.url, _raw_json(image, seed=1)[:-1] + b', "seed": 2}')
    _refused(answer, 422, "seed", "more than once")


def test_a_second_image_file_in_a_form_is_422_naming_it(server, image):
    files = [("image", ("a.png", _encoded(image, "PNG"), "image/png")),
             ("image_file", ("b.png", _encoded(255 - image, "PNG"), "image/png"))]
    _refused(httpx.post(server.url + "/edit", files=files, data={"prompt": "invert it"}), 422, "image_file", "second")


def test_a_negative_prompt_over_the_length_limit_is_422(server, image):
    answer = httpx.post(server.url + "/edit", json=_body(image, negative_prompt="blurry " * 1000))
    _refused(answer, 422, "negative_prompt", "the limit is 4000")


def test_more_fields_than_a_request_can_hold_are_422_naming_the_body(server, image):
    answer = httpx.post(server.url + "/edit", json=_body(image, **{f"x{i}": 0 for i in range(100)}))
    _refused(answer, 422, "body", "at most 64 fields")


def test_a_long_unknown_field_name_is_cut_short_in_the_answer(server, image):
    answer = httpx.post(server.url + "/edit", json=_body(image, **{"q" * 100_000: 1}))
    assert answer.status_code == 422 and len(answer.content) < 1000 and answer.json()["field"].startswith("qqq")


# -- images ------------------------------------------------------------------------------------------------
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


@pytest.fixture
def pillow_opens(monkeypatch):
    """Every image Pillow is asked to open while the test runs (the server runs in this process)."""
    opened, open_ = [], Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **kw: opened.append(fp) or open_(fp, *a, **kw))
    return opened


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "EPS", "PDF text"])
def test_an_image_format_other_than_png_jpeg_webp_is_refused_before_any_decoder_sees_it(server, image, fmt,
                                                                                       pillow_opens):
    raw = {"EPS": EPS, "PDF text": b"%PDF-1.4\n"}.get(fmt) or _encoded(image, fmt)
    answer = httpx.post(server.url + "/edit", json={**_body(image), "image": base64.b64encode(raw).decode()})
    _refused(answer, 422, "image", "PNG, JPEG or WebP")
    assert pillow_opens == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_decoded(server, image, fmt):
    upload = httpx.post(server.url + "/edit", files={"image": ("in", _encoded(image, fmt), "application/octet-stream")},
                        data={"prompt": "invert it"})
    assert upload.status_code == 200, upload.text


def _chunk(kind, data):
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width, height):
    """A PNG whose header declares width x height, with no pixel data to speak of."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def _jpeg_header(image, width, height):
    raw = bytearray(_encoded(image, "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def _webp_header(image, width, height):
    raw = bytearray(_encoded(image, "WEBP"))  # lossy: a VP8 chunk, 14-bit sides
    assert raw[12:16] == b"VP8 "
    raw[26:30] = struct.pack("<HH", width, height)
    return bytes(raw)


@pytest.mark.parametrize("make", [
    lambda im: _png_header(15_000, 15_000),  # 225M pixels: past Pillow's own bomb limit
    lambda im: _jpeg_header(im, 20_000, 20_000),
    lambda im: _webp_header(im, 16_000, 16_000),
    lambda im: _png_header(200, 200),
], ids=["png-bomb", "jpeg-bomb", "webp-bomb", "png-over-limit"])
def test_an_image_whose_header_declares_too_many_pixels_is_refused_before_decoding(server, image, make, pillow_opens):
    answer = httpx.post(server.url + "/edit", json={**_body(image), "image": base64.b64encode(make(image)).decode()})
    _refused(answer, 422, "image", f"over the limit of {128 * 128}")
    assert pillow_opens == []


def test_a_jpeg_with_a_second_larger_frame_header_is_refused_before_decoding(server, image):
    raw = _encoded(image, "JPEG")
    sof = raw.index(b"\xff\xc0")
    length = struct.unpack(">H", raw[sof + 2:sof + 4])[0]
    second = bytearray(raw[sof:sof + 2 + length])
    second[5:9] = struct.pack(">HH", 9_000, 9_000)  # under Pillow's own limits, over the server's
    raw = raw[:sof + 2 + length] + bytes(second) + raw[sof + 2 + length:]
    answer = httpx.post(server.url + "/edit", json={**_body(image), "image": base64.b64encode(raw).decode()})
    _refused(answer, 422, "image", "its frame is 9000x9000")


def test_damaged_image_data_is_422_whatever_the_decoder_raises(server, image):
    raw = _encoded(image, "PNG")
    start = raw.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", raw[start:start + 4])
    data, half = raw[start + 8:start + 8 + length], length // 2
    # the pixel data goes on in a chunk whose type is garbage: Pillow raises SyntaxError there, not OSError
    broken = _chunk(b"IDAT", data[:half]) + _chunk(b"\x1b\xbf\x10\x12", data[half:])
    raw = raw[:start] + broken + raw[start + 12 + length:]
    answer = httpx.post(server.url + "/edit", json={**_body(image), "image": base64.b64encode(raw).decode()})
    _refused(answer, 422, "image", "damaged")


def test_an_image_whose_header_is_cut_short_is_422(server, image):
    cut_short = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    answer = httpx.post(server.url + "/edit", json={**_body(image), "image": cut_short})
    _refused(answer, 422, "image", "header")


# -- bodies ------------------------------------------------------------------------------------------------
MULTIPART_START = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
                   b"Content-Type: image/png\r\n\r\n")


def _stream_chunked(url, ctype, start=b"", chunk=64 * 1024, most=128 * MAX_BODY):
    """POST a chunked body of up to `most` bytes, stopping once the server answers; (bytes sent, answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /edit HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sent, piece = 0, b"A" * chunk
        try:
            while sent < most and not select.select([sock], [], [], 0)[0]:
                data = start + piece if sent == 0 else piece
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                sent += len(data)
            if sent >= most:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            if not part:
                break
            answer += part
    head, _, body = answer.partition(b"\r\n\r\n")
    return sent, head.decode(), json.loads(body)


@pytest.mark.parametrize("ctype,start", [("application/json", b'{"prompt": "'),
                                         ("multipart/form-data; boundary=xyz", MULTIPART_START)],
                         ids=["json", "multipart"])
def test_a_chunked_body_is_cut_off_at_the_limit_while_it_streams_in(server, ctype, start):
    sent, head, body = _stream_chunked(server.url, ctype, start)
    assert head.startswith("HTTP/1.1 413") and body["field"] == "body" and "limit" in body["error"], (head, body)
    assert sent < 32 * MAX_BODY  # answered when the limit was passed, not once the whole body was in
    assert httpx.get(server.url + "/health").status_code == 200


# found by the fuzz (kind "body/chunked-over-limit") against a server whose body read runs in an asyncio task:
# the task keeps the 413's traceback in a reference cycle until the cyclic GC runs, and with it every chunk of
# the refused body read so far; a serve process grew by hundreds of MiB over 2000 requests
def test_a_body_cut_off_at_the_limit_is_let_go_while_its_error_lives_on():
    import asyncio
    import gc

    from starlette.requests import Request

    from reasonedit.serve.body import limit_body
    from reasonedit.serve.schema import RequestError

    freed = []

    class Chunk(bytes):
        def __del__(self):
            freed.append(len(self))

    messages = [{"type": "http.request", "body": Chunk(b"x" * 100), "more_body": True} for _ in range(100)]

    async def receive():
        return messages.pop(0)

    async def read():
        try:
            await limit_body(Request({"type": "http", "headers": []}, receive), 9_950).body()
        except RequestError as e:
            return e  # kept, as a task keeps the exception it raised

    gc.disable()  # no cyclic GC: only what nothing refers to is freed
    try:
        error = asyncio.run(read())
        assert error.status == 413 and error.__traceback__ is not None
        assert len(freed) >= 98  # the frames still held are the reader's: one chunk in each at most
    finally:
        gc.enable()


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(server, image):
    answer = _post_raw(server.url, b"{" + b" " * MAX_BODY + b"}")
    _refused(answer, 413, "body", "limit")
    assert answer.headers["connection"] == "close"


# -- failures that are not the client's ----------------------------------------------------------------------
@pytest.mark.parametrize("prompt,status", [(UNREACHABLE, 503), (BROKEN, 502)])
def test_an_upstream_editor_failure_is_502_or_503(server, image, prompt, status):
    answer = httpx.post(server.url + "/edit", json=_body(image, prompt=prompt), timeout=30)
    _refused(answer, status, None, "upstream")


def test_an_upstream_thinker_failure_is_502(server, image):
    answer = httpx.post(server.url + "/edit", json=_body(image, think=True), timeout=30)
    _refused(answer, 502, None, "upstream")


def test_an_unexpected_crash_is_still_a_json_500(server, image, monkeypatch):
    from reasonedit.serve import app as app_module

    def crash(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(app_module, "parse_edit", crash)
    _refused(httpx.post(server.url + "/edit", json=_body(image)), 500, None, "KeyError")


@pytest.mark.parametrize("method,path,status,field", [("GET", "/nowhere", 404, "path"),
                                                      ("GET", "/edit", 405, "method"),
                                                      ("POST", "/edit/", 404, "path"),  # no empty 307 redirect
                                                      ("GET", "/health/", 404, "path")])
def test_an_unknown_route_or_method_answers_in_the_services_error_format(server, method, path, status, field):
    _refused(httpx.request(method, server.url + path), status, field, "")


@pytest.mark.parametrize("head", [b"Content-Length: twelve\r\n", b"Content-Length: " + b"9" * 30 + b"\r\n",
                                  b"Bad Header Without Colon\r\n"], ids=["not-a-number", "too-many-digits", "no-colon"])
def test_http_that_does_not_parse_is_a_json_400(server, head):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /edit HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request" and b"content-type: application/json" in rest
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["success"] is False and body["field"] == "http"


# -- authentication ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_the_api_docs_need_the_token_when_one_is_set(guarded, path):
    _refused(httpx.get(guarded.url + path), 401, "authorization", "Bearer")
    assert httpx.get(guarded.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_the_api_docs_are_open_on_a_server_without_a_token(server):
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/edit" in httpx.get(server.url + "/openapi.json").json()["paths"]


@pytest.mark.parametrize("token,words", [("", "empty"), ("two words", "visible ASCII"), ("jeton-é", "visible ASCII")])
def test_a_token_that_cannot_protect_anything_is_refused_by_the_config(token, words):
    with pytest.raises(ValueError, match=words):
        create_app(UpstreamEditor(), ServeConfig(token=token))


@pytest.fixture
def serve(monkeypatch, capsys):
    """`reasonedit serve --editor shapes ARGS` in this process with the server's start recorded, not run; returns
    (exit code, stderr, the served app or None)."""
    from reasonedit import cli
    from reasonedit.serve import runner

    monkeypatch.delenv("REASONEDIT_SERVE_TOKEN", raising=False)
    served = []

    def recorded(app, *args, **kw):
        served.append(app)
        return 0
    monkeypatch.setattr(runner, "serve", recorded)

    def run(*args):
        code = cli.main(["serve", "--editor", "shapes", *args])
        return code, capsys.readouterr().err, served[0] if served else None
    return run


def _serve_config(*args):
    from reasonedit import cli
    from reasonedit.serve.cli import serve_config
    return serve_config(cli.build_parser().parse_args(["serve", "--editor", "shapes", *args]))


@pytest.mark.parametrize("args,flag", [
    (["--token", ""], "--token"),
    ([], "--no-auth"),
    (["--token", "a", "--no-auth"], "--no-auth"),
    (["--token", "a", "--token-file", "t.txt"], "--token-file"),
    (["--token-file", "/nonexistent/token"], "--token-file"),
    (["--token", "has space"], "--token"),
])
def test_serving_without_a_usable_token_or_an_explicit_no_auth_is_a_one_line_error(serve, args, flag):
    code, err, app = serve(*args)
    assert code == 1 and app is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], err


def test_an_empty_token_variable_is_an_error_naming_it(serve, monkeypatch):
    monkeypatch.setenv("REASONEDIT_SERVE_TOKEN", "")
    code, err, app = serve()
    assert code == 1 and "REASONEDIT_SERVE_TOKEN" in err and app is None


def test_no_auth_while_the_token_variable_is_set_is_an_error(serve, monkeypatch):
    monkeypatch.setenv("REASONEDIT_SERVE_TOKEN", "s3cret")
    code, err, app = serve("--no-auth")
    assert code == 1 and "--no-auth" in err and "REASONEDIT_SERVE_TOKEN" in err and app is None


def test_an_empty_token_file_is_an_error_naming_it(serve, tmp_path):
    (tmp_path / "token").write_text("\n")
    code, err, _ = serve("--token-file", str(tmp_path / "token"))
    assert code == 1 and "--token-file" in err and "empty" in err


def test_the_token_comes_from_a_file_without_its_trailing_newline(tmp_path, monkeypatch):
    monkeypatch.delenv("REASONEDIT_SERVE_TOKEN", raising=False)
    (tmp_path / "token").write_text("s3cret-from-file\n")
    assert _serve_config("--token-file", str(tmp_path / "token")).token == "s3cret-from-file"


def test_the_token_comes_from_the_environment_and_a_flag_overrides_it(monkeypatch):
    monkeypatch.setenv("REASONEDIT_SERVE_TOKEN", "s3cret-from-env")
    assert _serve_config().token == "s3cret-from-env"
    assert _serve_config("--token", "flag").token == "flag"


def test_no_auth_needs_saying(monkeypatch):
    monkeypatch.delenv("REASONEDIT_SERVE_TOKEN", raising=False)
    assert _serve_config("--no-auth").token is None
