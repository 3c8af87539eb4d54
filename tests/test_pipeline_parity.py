"""A whole edit against diffusers' own Qwen-Image-Edit pipelines, on tiny random weights in a folder written by
diffusers: the same resized sizes, prompt, condition states, source latents, schedule and final latents.

Two things are given to the reference so that both sides run the same model: the noise (as `latents=`, packed as
diffusers packs it; noise is an input, not what is compared) and the text encoder's `mm_token_type_ids`. diffusers
calls Qwen2.5-VL without them, and under transformers 5 the image tokens then get 1-D positions (diffusers issue
14194) where the released weights were trained with 3-axis ones; our reasoner always passes them. The tiny
tokenizer also splits the fixed system prefix into another number of tokens than the released one's 64, so the
reference drops as many as ours does (`prompt_template_encode_start_idx`).
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from conftest import make_diffusers_folder
from reasonedit.inference.sampler import initial_noise
from reasonedit.inference.types import EditRequest
from reasonedit.inference.builtin import GeneratorEditor
from reasonedit.models.model import ReasonEditModel
from reasonedit.models.processor import build_image_processor

TEXTS = ["make the red circle blue", "put the cup on the table"]
# Qwen-Image's own scheduler settings (resolution-dependent shift, terminal stretch)
QWEN_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
                  "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"}
STEPS = 2


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """transformers' Qwen2.5-VL processor without its video part, whose class needs torchvision (not installed
    here); images and text go through transformers' own code."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return argument


class WithTokenTypes(torch.nn.Module):
    """The reference text encoder, called as diffusers calls it, with `mm_token_type_ids` added (see the module
    docstring)."""

    def __init__(self, encoder, image_token_id: int):
        super().__init__()
        self.encoder, self.image_token_id = encoder, image_token_id

    @property
    def dtype(self):
        return self.encoder.dtype

    @property
    def device(self):
        return self.encoder.device

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, **kwargs):
        types = (input_ids == self.image_token_id).to(torch.int32)
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            image_grid_thw=image_grid_thw, mm_token_type_ids=types, **kwargs)


def picture(height, width, seed):
    """A smooth random RGB picture (what resizing treats like a photograph)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def reference(folder, pipeline: str, ours: ReasonEditModel):
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", local_files_only=True)
    vision = encoder.config.vision_config
    processor = ImageOnlyProcessor(image_processor=build_image_processor(patch_size=vision.patch_size,
                                                                         merge_size=vision.spatial_merge_size),
                                   tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)
    pipe = getattr(diffusers, pipeline).from_pretrained(folder, processor=processor, text_encoder=encoder.eval())
    pipe.text_encoder = WithTokenTypes(encoder, ours.reasoner.processor.image_token_id)
    pipe.prompt_template_encode_start_idx = ours.reasoner.condition_prefix_length
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("pipeline,sizes,guidance,zero_cond_t", [
    ("QwenImageEditPipeline", [(96, 128)], 1.0, False),
    ("QwenImageEditPlusPipeline", [(96, 128)], 4.0, False),  # true CFG
    ("QwenImageEditPlusPipeline", [(120, 80), (64, 96)], 1.0, True),  # 2511: zero_cond_t
], ids=["edit", "plus-one-image", "plus-two-images-2511"])
def test_a_whole_edit_matches_diffusers_pipeline(tmp_path, pipeline, sizes, guidance, zero_cond_t):
    folder, _, _ = make_diffusers_folder(tmp_path / "folder", TEXTS, pipeline=pipeline, scheduler=QWEN_SCHEDULER,
                                         zero_cond_t=zero_cond_t, vae_base_dim=4)  # 1024 px: the smallest VAE
    model = ReasonEditModel.from_pretrained(folder)
    assert model.config.pipeline == pipeline and model.config.generator.zero_cond_t == zero_cond_t
    editor = GeneratorEditor(model)
    images = [picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    request = EditRequest(image=images[0], extra_images=tuple(images[1:]), prompt="make the red circle blue",
                          seed=5, guidance_scale=guidance, negative_prompt=" ")
    with torch.no_grad():
        (ours,), (plan,) = editor.latents([request], STEPS)

    pipe = reference(folder, pipeline, model)
    module = __import__(pipe.__class__.__module__, fromlist=["calculate_dimensions"])
    last = sizes[-1] if "Plus" in pipeline else sizes[0]
    width, height = module.calculate_dimensions(1024 * 1024, last[1] / last[0])[:2]
    assert plan.output == (height, width) == plan.returned  # the edit's size, as the pipeline picks it
    channels, h, w = ours.shape
    assert (h * 8, w * 8) == plan.output
    noise = pipe._pack_latents(initial_noise(ours.shape, request.seed)[None], 1, channels, h, w)
    pil = [Image.fromarray(i) for i in images]
    seen = []  # the condition states diffusers hands its transformer
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"][0]),
                                               with_kwargs=True)
    with torch.no_grad():
        theirs = pipe(image=pil if "Plus" in pipeline else pil[0], prompt=request.prompt,
                      negative_prompt=" " if guidance > 1 else None, true_cfg_scale=guidance,
                      num_inference_steps=STEPS, latents=noise, output_type="latent").images
    condition, _, _ = editor.policy.prepare(images, editor.multiple)
    with torch.no_grad():
        states = model.encode_condition([condition], [request.prompt])[0]
    assert seen[0].shape == states.shape  # the same prompt: same tokens, same image grids
    assert (seen[0] - states).abs().max().item() < 1e-4
    mine = pipe._pack_latents(ours[None], 1, channels, h, w)
    assert theirs.shape == mine.shape
    err = (theirs - mine).abs().max().item()
    assert err < 1e-4, f"final latents differ by {err}"


def test_the_policy_sizes_sources_as_the_pipelines_do():
    """The sizes alone, for shapes the edit test does not draw: tall, wide, tiny and odd, against diffusers'
    own `calculate_dimensions` of both pipelines."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit, pipeline_qwenimage_edit_plus as plus

    from reasonedit.config.model import ImagesConfig
    from reasonedit.models.image_policy import policy_for
    one = policy_for(images=ImagesConfig(), pipeline="QwenImageEditPipeline")
    several = policy_for(images=ImagesConfig(), pipeline="QwenImageEditPlusPipeline")
    for sizes in ([(1, 1)], [(33, 1000)], [(1000, 33)], [(721, 1279)], [(480, 640), (1024, 256)]):
        (h, w), last = sizes[0], sizes[-1]
        if len(sizes) == 1:
            width, height, _ = edit.calculate_dimensions(1024 * 1024, w / h)
            plan = one.plan(sizes, grid=16)
            assert plan.vae == plan.condition == ((height, width),) and plan.output == (height, width)
        plan = several.plan(sizes, grid=16)
        assert plan.output == plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, last[1] / last[0])[::-1]
        for (sh, sw), vae, cond in zip(sizes, plan.vae, plan.condition):
            assert vae == plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, sw / sh)[::-1]
            assert cond == plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, sw / sh)[::-1]
    with pytest.raises(ValueError, match="at most 1"):
        one.plan([(64, 64), (64, 64)], grid=16)


def test_training_sizes_a_record_as_the_edit_is_sized(tmp_path):
    """The policy is one rule: preprocessing gives the generator the sizes, the prompt and the reasoner's image
    grid that an edit of the same source is made with (here at a small area, `model.images.area`)."""
    from reasonedit.data.samples import EditPair, TextToImage
    from reasonedit.models.preprocess import Preprocessor

    folder, _, _ = make_diffusers_folder(tmp_path / "plus", TEXTS, pipeline="QwenImageEditPlusPipeline")
    model = ReasonEditModel.from_pretrained(folder)
    model.config.images.area, model.config.images.condition_area = 128 * 128, 64 * 64
    source, target = picture(90, 150, seed=1), picture(90, 150, seed=2)
    pre = Preprocessor.from_model(model)
    (segment,) = pre.generator_segments(EditPair("k", source, "make the red circle blue", target))
    editor = GeneratorEditor(model)
    condition, vae, plan = editor.policy.prepare([source], editor.multiple)
    assert [s.shape[:2] for s in segment.source_images] == list(plan.vae) and plan.vae != ((90, 150),)
    assert segment.target_image.shape[:2] == plan.output
    expected = model.reasoner.condition_inputs([condition], ["make the red circle blue"])[0]
    assert torch.equal(segment.condition["input_ids"], expected["input_ids"])  # the pipeline's prompt and grid
    assert torch.equal(segment.condition["image_grid_thw"], expected["image_grid_thw"])
    assert segment.prefix_tokens == model.reasoner.condition_prefix_length
    (caption,) = pre.generator_segments(TextToImage("t", "a cup", picture(60, 200, seed=3)))
    assert caption.target_image.shape[:2] == editor.policy.target_size(60, 200, editor.multiple)
    extra = picture(200, 100, seed=4)  # a second source: its own sizes, numbered in the prompt
    (two,) = pre.generator_segments(EditPair("k2", source, "put it here", target, extra_sources=[extra]))
    _, _, plan2 = editor.policy.prepare([source, extra], editor.multiple)
    assert [s.shape[:2] for s in two.source_images] == list(plan2.vae) and len(two.source_latents) == 2
    assert two.target_image.shape[:2] == plan2.output  # the last source's aspect, as the pipeline
    assert two.condition["image_grid_thw"].shape[0] == 2
    model.config.images.policy = "native"  # the training buckets, as before
    (native,) = Preprocessor.from_model(model).generator_segments(EditPair("k", source, "x", target))
    assert native.target_image.shape[:2] == pre.bucket(target).shape[:2]


def test_a_model_that_takes_one_source_refuses_several_naming_the_record(tmp_path):
    from reasonedit.data.samples import EditPair
    from reasonedit.models.preprocess import Preprocessor

    folder, _, _ = make_diffusers_folder(tmp_path / "edit", TEXTS)
    model = ReasonEditModel.from_pretrained(folder)
    model.config.images.area = 64 * 64
    two = EditPair("k", picture(64, 64, 1), "x", picture(64, 64, 2), extra_sources=[picture(64, 64, 3)])
    with pytest.raises(ValueError, match="^k/generate: 2 source images, but the qwen-image-edit image policy takes "
                                         "at most 1"):
        Preprocessor.from_model(model).generator_segments(two)
    request = EditRequest(image=two.source, extra_images=(two.extra_sources[0],), prompt="x")
    with pytest.raises(ValueError, match="^request 0: 2 source images"):
        GeneratorEditor(model).edit([request])
