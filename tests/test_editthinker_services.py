"""EditThinker as a drop-in, both ways, on loopback: our `HttpEditor` with each preset against stand-ins that speak
EditThinker's editing services' request and reply models, and EditThinker's client's requests (its model configs,
its retry loop, its 128 workers) against our default `reasonedit serve`.

The stand-ins are our own code, written from the field names and defaults the services declare (github
appletea233/EditThinker at 803d1a7, inference/server/apis/{flux,qwen,omnigen2,longcat}_edit_api.py): pydantic
request models that, as pydantic does, drop fields they do not declare; we record what arrived to prove nothing
we send is dropped, and `enhance_prompt` defaults to true as it does there, so a request that leaves it out would
be a paid (or, without a DashScope key, endless) prompt rewrite.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import pytest
import requests
from fastapi import FastAPI
from pydantic import BaseModel, Field

from conftest import run_cli_here
from reasonedit.clients.http import RetryPolicy
from reasonedit.clients.images import decode_base64_image, png_base64
from reasonedit.inference.http_editor import HttpEditor
from reasonedit.inference.types import EditRequest
from reasonedit.serve import ServeConfig, ServerThread, create_app

FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, jitter=0.0)
SERVICE_SIZE = (48, 40)  # (H, W): the stand-ins answer at "their own resolution", not the source's


# -- EditThinker's services, as their request models declare them ---------------------------------------------
class FluxImageEditRequest(BaseModel):  # flux_edit_api.py:385
    image: Optional[str] = None
    prompt: str
    seed: Optional[int] = None
    guidance_scale: Optional[float] = Field(2.5, ge=0.0, le=7.5)
    num_inference_steps: Optional[int] = Field(28, ge=1, le=100)
    enhance_prompt: Optional[bool] = True


class ImageEditRequest(BaseModel):  # qwen_edit_api.py:378
    image: Optional[str] = None
    prompt: str
    negative_prompt: Optional[str] = " "
    seed: Optional[int] = None
    guidance_scale: Optional[float] = Field(4.0, ge=0.0, le=7.5)
    num_inference_steps: Optional[int] = Field(50, ge=1, le=100)
    enhance_prompt: Optional[bool] = True


class OmniGen2ImageEditRequest(BaseModel):  # omnigen2_edit_api.py:452
    image: Optional[str] = None
    prompt: str
    seed: Optional[int] = None
    text_guidance_scale: Optional[float] = Field(5.0, ge=0.0, le=10.0)
    image_guidance_scale: Optional[float] = Field(2.0, ge=0.0, le=10.0)
    num_inference_steps: Optional[int] = Field(50, ge=1, le=100)
    negative_prompt: Optional[str] = "(((deformed))), blurry, over saturation, bad anatomy"
    enhance_prompt: Optional[bool] = False


class LongCatImageEditRequest(BaseModel):  # longcat_edit_api.py:404
    image: Optional[str] = None
    prompt: str
    negative_prompt: Optional[str] = ""
    seed: Optional[int] = None
    guidance_scale: Optional[float] = Field(4.5, ge=0.0, le=10.0)
    num_inference_steps: Optional[int] = Field(50, ge=1, le=100)
    num_images_per_prompt: Optional[int] = Field(1, ge=1, le=4)


SERVICES = {"flux-kontext": FluxImageEditRequest, "qwen-image-edit": ImageEditRequest,
            "omnigen2": OmniGen2ImageEditRequest, "longcat": LongCatImageEditRequest}
COLOR = {"flux-kontext": 10, "qwen-image-edit": 60, "omnigen2": 110, "longcat": 160}


def _service(name: str, model: type, received: list) -> FastAPI:
    """One service: POST /edit validates the body with its request model and answers its reply model with a solid
    image at SERVICE_SIZE; GET /health as theirs."""
    app = FastAPI()

    @app.post("/edit")
    def edit(raw: dict):
        request = model.model_validate(raw)  # their servers: undeclared fields are dropped without a word
        received.append((set(raw), request))
        decode_base64_image(request.image)
        edited = np.full((*SERVICE_SIZE, 3), COLOR[name], np.uint8)
        return {"success": True, "task_id": "t", "original_image": request.image, "edited_image": png_base64(edited),
                "seed": request.seed, "original_prompt": request.prompt, "gpu_id": 0, "processing_time": 0.01,
                "enhanced_prompt": None}

    @app.get("/health")
    def health():
        return {"status": "ok", "gpu_manager_ready": True, "timestamp": time.time()}

    return app


@pytest.fixture(scope="module")
def services():
    """The four services on one loopback server, each under its own prefix: (base URL, {name: received})."""
    root, received = FastAPI(), {name: [] for name in SERVICES}
    for name, model in SERVICES.items():
        root.mount(f"/{name}", _service(name, model, received[name]))
    with ServerThread(root) as s:
        yield s.url, received


@pytest.fixture(scope="module")
def source():
    return np.random.default_rng(0).integers(0, 256, (30, 36, 3), dtype=np.uint8)


# what each preset sends: every key one the service declares (nothing dropped), enhance_prompt false where it has one
SENT = {"flux-kontext": {"image", "prompt", "seed", "guidance_scale", "num_inference_steps", "enhance_prompt"},
        "qwen-image-edit": {"image", "prompt", "seed", "guidance_scale", "num_inference_steps", "negative_prompt",
                            "enhance_prompt"},
        "omnigen2": {"image", "prompt", "seed", "text_guidance_scale", "num_inference_steps", "negative_prompt",
                     "enhance_prompt"},
        "longcat": {"image", "prompt", "seed", "guidance_scale", "num_inference_steps", "negative_prompt"}}


@pytest.mark.parametrize("name", list(SERVICES))
def test_each_preset_speaks_its_services_fields_with_its_defaults_and_returns_the_source_size(services, source, name):
    base, received = services
    received[name].clear()
    with HttpEditor(f"{base}/{name}", preset=name, retry=FAST) as editor:
        (edited,) = editor.edit([EditRequest(source, "make the sky red", seed=3, **editor.preset.defaults())])
    ((keys, request),) = received[name]
    assert keys == SENT[name] and keys <= set(SERVICES[name].model_fields)
    declared = SERVICES[name].model_fields
    guidance = "text_guidance_scale" if name == "omnigen2" else "guidance_scale"
    # the service's own defaults, now sent explicitly
    assert getattr(request, guidance) == declared[guidance].default
    assert request.num_inference_steps == declared["num_inference_steps"].default
    if "negative_prompt" in declared:
        assert request.negative_prompt == declared["negative_prompt"].default
    assert getattr(request, "enhance_prompt", False) is False  # flux and qwen default it to true
    assert request.seed == 3 and request.prompt == "make the sky red"
    assert edited.shape == source.shape and (edited == COLOR[name]).all()  # resized back from SERVICE_SIZE


def test_a_requests_own_settings_override_the_preset_and_resizing_can_be_turned_off(services, source):
    base, received = services
    received["omnigen2"].clear()
    with HttpEditor(f"{base}/omnigen2", preset="omnigen2", retry=FAST, resize_to_source=False,
                    extra={"image_guidance_scale": 1.5}) as editor:
        (edited,) = editor.edit([EditRequest(source, "x", num_inference_steps=7, guidance_scale=1.5,
                                             negative_prompt="blur")])
    ((_, request),) = received["omnigen2"]
    assert (request.num_inference_steps, request.text_guidance_scale, request.negative_prompt) == (7, 1.5, "blur")
    assert request.image_guidance_scale == 1.5 and edited.shape[:2] == SERVICE_SIZE
    with pytest.raises(ValueError, match="guidance_scale 9: the flux-kontext service takes 0-7.5"):
        HttpEditor(f"{base}/flux-kontext", preset="flux-kontext")._body(EditRequest(source, "x", guidance_scale=9))


def test_edit_and_eval_take_an_editor_preset_and_use_its_settings(services, source, tmp_path):
    from PIL import Image

    base, received = services
    Image.fromarray(source).save(tmp_path / "in.png")
    received["qwen-image-edit"].clear()
    proc = run_cli_here("edit", "--editor", f"{base}/qwen-image-edit", "--editor-preset", "qwen-image-edit",
                        "--image", tmp_path / "in.png", "--instruction", "make it blue", "--guidance", "5",
                        "--out", tmp_path / "trace")
    assert proc.returncode == 0, proc.stderr
    ((_, request),) = received["qwen-image-edit"]
    assert (request.num_inference_steps, request.guidance_scale, request.enhance_prompt) == (50, 5.0, False)
    assert np.asarray(Image.open(tmp_path / "trace" / "final.png")).shape == source.shape

    received["longcat"].clear()
    # --shard 0/2: generation only (no report), half of one sample per category
    proc = run_cli_here("eval", "--bench", "shapes", "--limit", "1", "--shard", "0/2", "--editor", f"{base}/longcat",
                        "--editor-preset", "longcat-image-edit", "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr
    assert received["longcat"] and all((r.num_inference_steps, r.guidance_scale, r.negative_prompt) == (50, 4.5, "")
                                       for _, r in received["longcat"])
    proc = run_cli_here("eval", "--bench", "shapes", "--limit", "1", "--editor", "shapes", "--editor-preset", "longcat",
                        "--out", tmp_path / "eval2")
    assert proc.returncode == 1 and "--editor-preset: only with --editor URL" in proc.stderr


# -- EditThinker's client against our server ------------------------------------------------------------------
# run_edit_thinker_inference.py get_model_config (lines 809-850): what its client sends with image and prompt
MODEL_CONFIGS = {
    "flux-kontext-dev": {"num_inference_step": 28, "guidance_scale": 2.5, "width": 1024, "height": 1024,
                         "enhance_prompt": False, "seed": 0},
    "qwen-image-edit": {"num_inference_step": 50, "guidance_scale": 5.0, "width": 1024, "height": 1024,
                        "enhance_prompt": False},
    "omnigen2-edit": {"num_inference_step": 50, "text_guidance_scale": 5.0, "image_guidance_scale": 1.5, "width": 1024,
                      "height": 1024, "negative_prompt": "", "enhance_prompt": False, "seed": 0},
    "longcat-image-edit": {"num_inference_step": 50, "guidance_scale": 4.5, "width": 1024, "height": 1024,
                           "enhance_prompt": False, "negative_prompt": "", "seed": 0},
}


def call_api_with_retry(endpoint: str, image: np.ndarray, prompt: str, model_config: dict, max_retries: int) -> tuple:
    """Their client's loop (call_api_with_retry, lines 899-940): POST, read success, on any failure try again at
    once (no backoff, Retry-After unread) up to max_retries times. (edited image, attempts)."""
    request_data = {"image": png_base64(image), "prompt": prompt, **model_config}
    for attempt in range(max_retries):
        try:
            result = requests.post(f"{endpoint}/edit", json=request_data, timeout=600).json()
            if result["success"]:
                return decode_base64_image(result["edited_image"]), attempt + 1
            raise Exception(result["error"])
        except Exception:
            if attempt == max_retries - 1:
                raise Exception(f"Failed to generate image after {max_retries} attempts") from None


class RecordingEditor:
    """Inverts the image; records each request. With `hold`, its first batch waits until `hold()` is true."""

    name = "recording"

    def __init__(self, hold=None):
        self.requests, self.hold, self.held = [], hold, False

    def edit(self, batch):
        if self.hold is not None and not self.held:
            deadline = time.monotonic() + 30
            while not self.hold(len(batch)) and time.monotonic() < deadline:
                time.sleep(0.005)
            self.held = True
        self.requests.extend(batch)
        return [255 - r.image for r in batch]


def test_editthinkers_client_requests_are_accepted_by_the_default_server(source):
    editor = RecordingEditor()
    with ServerThread(create_app(editor, ServeConfig())) as s:
        health = requests.get(s.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["accepts"] == ["reasonedit", "editthinker"]
        for name, config in MODEL_CONFIGS.items():
            edited, attempts = call_api_with_retry(s.url, source, f"edit for {name}", config, max_retries=3)
            assert attempts == 1 and np.array_equal(edited, 255 - source), name
        typo = requests.post(s.url + "/edit", json={"image": png_base64(source), "prompt": "x",
                                                    "num_inference_stpes": 5}, timeout=5)
    assert typo.status_code == 422 and "did you mean 'num_inference_steps'" in typo.json()["error"]
    got = {r.prompt.removeprefix("edit for "): (r.num_inference_steps, r.guidance_scale, r.negative_prompt, r.seed)
           for r in editor.requests}
    assert got == {"flux-kontext-dev": (28, 2.5, " ", 0), "qwen-image-edit": (50, 5.0, " ", 0),
                   "omnigen2-edit": (50, 5.0, "", 0), "longcat-image-edit": (50, 4.5, "", 0)}


def test_128_concurrent_workers_with_their_retry_loop_lose_nothing(source):
    workers = 128  # inference/scripts/run_edit_thinker_*.sh: NUM_WORKERS=128, MAX_RETRIES=100 (3 here)
    app = None

    def all_arrived(running: int) -> bool:  # every worker's request is in: running, or waiting in the queue
        return app.state.batcher.depth + running >= workers

    editor = RecordingEditor(hold=all_arrived)
    app = create_app(editor, ServeConfig())
    image = source[:16, :16]
    with ServerThread(app) as s, ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(call_api_with_retry, s.url, image, f"sample {i}", MODEL_CONFIGS["flux-kontext-dev"], 3)
                   for i in range(workers)]
        results = [f.result(timeout=60) for f in futures]
        status = requests.get(s.url + "/status", timeout=5).json()
    assert editor.held and all(np.array_equal(edited, 255 - image) for edited, _ in results)
    assert [attempts for _, attempts in results] == [1] * workers  # all 128 held at once, none refused
    assert status["rejected"] == 0 and status["served"] == workers and status["max_queue"] >= workers
    assert sorted(r.prompt for r in editor.requests) == sorted(f"sample {i}" for i in range(workers))
