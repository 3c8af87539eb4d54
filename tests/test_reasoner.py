"""The reasoner: processor, prompts and parsers, condition states, packed rows, LoRA, save/load, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from reasonedit.shapes.world import ShapesWorld
from reasonedit.shapes.synth import Synthesizer
from reasonedit.models import prompts
from reasonedit.models.attention import PackedAttention, Span, TokenLayout
from reasonedit.config.model import LoraConfig
from reasonedit.models.processor import ReasonerProcessor
from reasonedit.models.prompts import Decision, ThinkerReplyError, parse_decision, parse_score
from reasonedit.models.reasoner import (LORA_DIR, PACKED_KWARG, TEMPLATE_REPEATS, Reasoner, pack_reasoner_inputs,
                                        packed_attention_forward)
from reasonedit.models.tiny import init_tiny_reasoner
from reasonedit.models.tokenizer import DECISION_TOKENS, decision_token_ids

SEED = 0
PATCH_DIM = 3 * 2 * 14 * 14
CORPUS = [
    "make the red circle blue",
    "move the small green star to row 2, column 3",
    "<#Think> the square is too small <#Reflection> make the square large",
    "<#Think> the circle is now blue and nothing else changed <#Success>",
    "score: 7\nreason: the star moved to row 2 but to column 4",
]


def pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def edit_pair():
    return Synthesizer(ShapesWorld(), seed=SEED).edit_pair("train", 0)


@pytest.fixture(scope="module")
def reasoner(edit_pair) -> Reasoner:
    return Reasoner.tiny(CORPUS + [edit_pair.instruction], seed=SEED)


@pytest.fixture(scope="module")
def samples(edit_pair):
    """(images, instruction) per sample: different image sizes, image counts and text lengths."""
    return [
        (edit_pair.source, edit_pair.instruction),  # 224x224 shapes scene
        (pixels(56, 84, 1), "make the red circle blue"),
        ([pixels(84, 56, 2), pixels(56, 56, 3)], "move the small green star to row 2, column 3, then swap the two"),
        (pixels(112, 56, 4), "x"),
    ]


@torch.no_grad()
def alone_logits(reasoner: Reasoner, sample: dict) -> torch.Tensor:
    return reasoner.model(**sample, use_cache=False).logits[0]  # (T, vocab)


# -- processor ----------------------------------------------------------------------------------------


def test_processor_pixels_are_the_hf_image_processor_layout(reasoner):
    image = pixels(84, 112, 5)
    inputs = reasoner.processor.encode_one(prompts.describe_target(image, "make it blue"))
    reference = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)(images=[image], return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]  # 84x112 px in 14-px patches
    assert inputs["pixel_values"].shape == (48, PATCH_DIM)
    image_tokens = inputs["input_ids"] == reasoner.processor.image_token_id
    assert int(image_tokens.sum()) == 48 // 4  # one token per 2x2 merged patches
    assert torch.equal(inputs["mm_token_type_ids"].bool(), image_tokens)


def test_processor_batch_pads_left_and_keeps_images_in_order(reasoner):
    a = prompts.think(pixels(56, 56, 1), "short")
    b = prompts.think(pixels(56, 112, 2), "a much longer request than the first one")
    batch = reasoner.processor([a, b])
    one, two = reasoner.processor.encode_one(a), reasoner.processor.encode_one(b)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert torch.equal(batch["pixel_values"], torch.cat([one["pixel_values"], two["pixel_values"]]))
    pad = batch["input_ids"].shape[1] - one["input_ids"].shape[1]
    assert batch["attention_mask"][0, :pad].sum() == 0
    assert torch.equal(batch["input_ids"][0, pad:], one["input_ids"][0])
    assert torch.equal(batch["mm_token_type_ids"][1], two["mm_token_type_ids"][0])


def test_processor_save_load_round_trip(reasoner, tmp_path):
    reasoner.processor.save_pretrained(tmp_path)
    loaded = ReasonerProcessor.from_pretrained(tmp_path)
    messages = prompts.score(pixels(56, 84, 1), "a blue circle")
    for key, value in reasoner.processor.encode_one(messages).items():
        assert torch.equal(loaded.encode_one(messages)[key], value), key


# -- 3-axis RoPE --------------------------------------------------------------------------------------


def test_image_tokens_get_3axis_positions_through_the_processor(reasoner):
    inputs = reasoner.processor.encode_one(prompts.think(pixels(56, 84, 1), "make it blue"))
    seen = []
    hook = reasoner.model.model.language_model.rotary_emb.register_forward_hook(
        lambda module, args, output: seen.append(args[1]))
    try:
        with_types = alone_logits(reasoner, inputs)
    finally:
        hook.remove()
    t, h, w = seen[0][:, 0]  # the (3, 1, T) positions the model rotated by
    on_image = inputs["mm_token_type_ids"][0].bool()
    assert not torch.equal(h[on_image], w[on_image]) and not torch.equal(t[on_image], h[on_image])
    assert torch.equal(t[~on_image], h[~on_image]) and torch.equal(h[~on_image], w[~on_image])
    without_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert not torch.allclose(with_types, alone_logits(reasoner, without_types), atol=1e-4)


# -- the registered attention function ----------------------------------------------------------------


def test_registered_attention_is_stock_sdpa_when_not_packed(reasoner, edit_pair):
    stock, _ = init_tiny_reasoner(CORPUS + [edit_pair.instruction] + prompts.template_texts() * TEMPLATE_REPEATS,
                                  seed=SEED)
    assert stock.config._attn_implementation == "sdpa"
    inputs = reasoner.processor([prompts.think(pixels(56, 84, 1), "a"), prompts.think(pixels(56, 56, 2), "bb cc")])
    with torch.no_grad():
        assert torch.equal(reasoner.model(**inputs).logits, stock(**inputs).logits)


def test_attention_function_leaves_bidirectional_vision_attention_alone():
    vision_like = torch.nn.Module()
    vision_like.is_causal = False
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    packed = PackedAttention(TokenLayout.from_spans([Span(0, 2, False), Span(1, 3, False)]), "sdpa")
    expected, _ = sdpa_attention_forward(vision_like, q, k, v, None, is_causal=False)
    got, _ = packed_attention_forward(vision_like, q, k, v, None, is_causal=False, **{PACKED_KWARG: packed})
    assert torch.equal(got, expected)


# -- packed rows --------------------------------------------------------------------------------------


@torch.no_grad()
def test_packed_condition_states_equal_each_sample_alone(reasoner, samples):
    images, instructions = zip(*samples)
    alone = [reasoner.condition_states([i], [s])[0] for i, s in samples]
    packed = reasoner.condition_states(images, instructions, packed=True)
    # a different set of row mates, in a different order
    others = reasoner.condition_states([images[2], pixels(84, 84, 9), images[0]],
                                       [instructions[2], "turn every square into a circle", instructions[0]],
                                       packed=True)
    assert len({s.shape[0] for s in alone}) == len(alone)
    for got, want in zip(packed, alone):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(others[0], alone[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(others[2], alone[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_unpacked_padded_batch_equals_alone(reasoner, samples):
    images, instructions = zip(*samples)
    batched = reasoner.condition_states(images, instructions)
    for (image, instruction), got in zip(samples, batched):
        torch.testing.assert_close(got, reasoner.condition_states([image], [instruction])[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_packing_leaves_the_vision_tower_output_unchanged(reasoner, samples):
    outputs = []
    hook = reasoner.model.model.visual.register_forward_hook(
        lambda module, args, output: outputs.append(output.pooler_output))
    try:
        inputs = reasoner.condition_inputs(*zip(*samples))
        reasoner.packed_hidden_states(pack_reasoner_inputs(inputs, reasoner.model))
        for sample in inputs:
            reasoner.model(**sample, use_cache=False)
    finally:
        hook.remove()
    packed, alone = outputs[0], torch.cat(outputs[1:])
    # all images go through the tower in one call either way; only matmul batching may round differently
    torch.testing.assert_close(packed, alone, atol=1e-6, rtol=0)


@torch.no_grad()
def test_packed_logits_equal_each_sample_alone(reasoner, samples):
    text_only = reasoner.processor.encode_one([{"role": "user", "content": "make the red circle blue"}])
    inputs = reasoner.condition_inputs(*zip(*samples[:2])) + [text_only] + reasoner.condition_inputs(*zip(*samples[2:]))
    row = pack_reasoner_inputs(inputs, reasoner.model)
    assert row.position_ids.shape == (3, 1, sum(row.lengths))
    logits = row.split(reasoner.forward_packed(row).logits)
    for got, sample in zip(logits, inputs):
        torch.testing.assert_close(got, alone_logits(reasoner, sample), atol=1e-5, rtol=0)
    # the same row without the document mask: later samples see earlier ones, and their logits move
    unmasked = reasoner.model(input_ids=row.input_ids, position_ids=row.position_ids, pixel_values=row.pixel_values,
                              image_grid_thw=row.image_grid_thw, use_cache=False).logits
    assert not torch.allclose(row.split(unmasked)[1], logits[1], atol=1e-3)


def test_packed_loss_and_lora_gradients_equal_token_weighted_alone(edit_pair):
    reasoner = lora_reasoner(edit_pair).train()
    inputs = []
    for i, answer in enumerate(["<#Think> fine <#Success>", "score: 3\nreason: the star is still red"]):
        sample = reasoner.processor.encode_one(prompts.think(pixels(56, 56 + 28 * i, i), "q", answer=answer),
                                               add_generation_prompt=False)
        sample["labels"] = sample["input_ids"].clone()
        sample["labels"][:, : -len(reasoner.tokenizer.encode(answer)) - 2] = -100  # answer + <|im_end|>\n
        inputs.append(sample)

    def loss_and_grads(loss: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        reasoner.model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in reasoner.trainable_parameters()]

    packed = loss_and_grads(reasoner.forward_packed(pack_reasoner_inputs(inputs, reasoner.model)).loss)
    counts = [int((s["labels"][0, 1:] != -100).sum()) for s in inputs]
    alone = loss_and_grads(sum(reasoner.model(**s).loss * n for s, n in zip(inputs, counts)) / sum(counts))
    torch.testing.assert_close(packed[0], alone[0], atol=1e-5, rtol=0)
    for got, want in zip(packed[1], alone[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert any(g.abs().max() > 1e-3 for g in packed[1])


# -- condition prefix ---------------------------------------------------------------------------------


@torch.no_grad()
def test_condition_states_start_right_after_the_fixed_prefix(reasoner, edit_pair):
    prefix = reasoner.condition_prefix_length
    assert prefix == len(reasoner.tokenizer.encode(prompts.condition_prefix(), add_special_tokens=False))
    inputs = reasoner.processor.encode_one(prompts.condition(edit_pair.source, edit_pair.instruction))
    assert reasoner.tokenizer.decode(inputs["input_ids"][0, :prefix]) == prompts.condition_prefix()
    assert reasoner.tokenizer.decode(inputs["input_ids"][0, prefix]) == "<|vision_start|>"
    states = reasoner.condition_states([edit_pair.source], [edit_pair.instruction])[0]
    assert states.shape == (inputs["input_ids"].shape[1] - prefix, reasoner.hidden_size)
    full = reasoner.model.model(**inputs, use_cache=False).last_hidden_state[0]
    assert torch.equal(states, full[prefix:])


def test_multi_image_condition_labels_each_picture(reasoner):
    text = reasoner.processor.render(prompts.condition([pixels(56, 56, 1), pixels(56, 56, 2)], "swap them"))
    assert text.startswith(prompts.condition_prefix() + "Image 1: <|vision_start|><|image_pad|><|vision_end|>"
                           "Image 2: <|vision_start|>")
    one = reasoner.processor.render(prompts.condition([pixels(56, 56, 1)], "swap them"))
    assert one.startswith(prompts.condition_prefix() + "<|vision_start|>")  # one image is not numbered


def test_a_pipelines_prompt_is_read_from_the_installed_diffusers(reasoner):
    plus = prompts.pipeline_template("QwenImageEditPlusPipeline")
    edit = prompts.pipeline_template("QwenImageEditPipeline")
    assert plus.system == edit.system and plus.system != prompts.OWN_TEMPLATE.system
    # 2509 / 2511 number every picture, one included; the first Qwen-Image-Edit takes one bare image
    text = reasoner.processor.render(prompts.condition([pixels(56, 56, 1)], "x", plus))
    assert plus.label and plus.label_one and text.startswith(plus.prefix() + plus.label.format(1) + "<|vision_start|>")
    assert reasoner.processor.render(prompts.condition([pixels(56, 56, 1)], "x", edit)).startswith(
        edit.prefix() + "<|vision_start|>")
    with pytest.raises(prompts.TemplateError, match="FluxKontextPipelin"):
        prompts.pipeline_template("FluxKontextPipelin")


# -- decision tokens ----------------------------------------------------------------------------------


def test_add_decision_tokens_adds_them_and_grows_the_embeddings(monkeypatch):
    import reasonedit.models.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "add_decision_tokens", lambda tokenizer: 0)
    reasoner = Reasoner.tiny(CORPUS, seed=SEED)
    monkeypatch.undo()
    assert not set(DECISION_TOKENS) & set(reasoner.tokenizer.get_vocab())
    reasoner.model.resize_token_embeddings(len(reasoner.tokenizer))  # no spare rows: adding must grow
    before = reasoner.model.get_input_embeddings().weight.detach().clone()

    assert reasoner.add_decision_tokens() == len(DECISION_TOKENS)
    ids = decision_token_ids(reasoner.tokenizer)
    rows = reasoner.model.get_input_embeddings().num_embeddings
    assert rows >= len(reasoner.tokenizer) and rows % 64 == 0 and rows > before.shape[0]
    assert reasoner.model.lm_head.out_features == rows == reasoner.model.config.text_config.vocab_size
    assert torch.equal(reasoner.model.get_input_embeddings().weight[: before.shape[0]], before)
    assert torch.allclose(reasoner.model.get_input_embeddings().weight[ids[DECISION_TOKENS[0]]], before.mean(0))
    assert reasoner.add_decision_tokens() == 0
    answer = reasoner.generate(prompts.think(pixels(56, 56, 1), "go"), 2)  # runs with the new vocabulary
    assert isinstance(answer[0], str)


# -- LoRA and save/load -------------------------------------------------------------------------------


def lora_reasoner(edit_pair) -> Reasoner:
    reasoner = Reasoner.tiny(CORPUS + [edit_pair.instruction], seed=SEED)
    reasoner.add_lora(LoraConfig(rank=4, alpha=8))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, param in reasoner.model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter change the outputs
                param.normal_(std=0.1)
    return reasoner


def test_lora_goes_on_lm_attention_projections_only(edit_pair):
    reasoner = lora_reasoner(edit_pair)
    adapted = {name for name, module in reasoner.model.named_modules() if isinstance(module, LoraLayer)}
    layers = reasoner.model.config.text_config.num_hidden_layers
    assert adapted == {f"model.language_model.layers.{i}.self_attn.{p}"
                       for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert not any("visual" in name for name, _ in reasoner.model.named_modules() if "lora" in name)
    trainable = [name for name, p in reasoner.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with pytest.raises(ValueError, match="attention"):
        Reasoner.tiny(CORPUS, seed=SEED).add_lora(LoraConfig(targets=("q_proj", "qkv")))


@torch.no_grad()
def round_trip_outputs(reasoner: Reasoner, path, sample_images) -> tuple[torch.Tensor, torch.Tensor]:
    messages = prompts.describe_target(sample_images, "make the red circle blue")
    inputs = reasoner.processor.encode_one(messages)
    before = alone_logits(reasoner, inputs)
    reasoner.save_pretrained(path)
    loaded = Reasoner.from_pretrained(path)
    return before, alone_logits(loaded, loaded.processor.encode_one(messages))


def test_save_load_round_trip_without_lora_is_bitwise(reasoner, tmp_path):
    before, after = round_trip_outputs(reasoner, tmp_path / "r", pixels(56, 84, 1))
    assert torch.equal(before, after)
    assert not (tmp_path / "r" / LORA_DIR).exists()


def test_save_load_round_trip_with_lora_is_bitwise(edit_pair, tmp_path):
    reasoner = lora_reasoner(edit_pair)
    base = Reasoner.tiny(CORPUS + [edit_pair.instruction], seed=SEED)
    before, after = round_trip_outputs(reasoner, tmp_path / "r", pixels(56, 84, 1))
    assert torch.equal(before, after)
    assert (tmp_path / "r" / LORA_DIR / "adapter_config.json").is_file()
    # the base in HF format is the untouched base model; the adapter lives only in lora/
    plain, _ = init_tiny_reasoner(["x"], seed=SEED)
    reloaded = type(plain).from_pretrained(tmp_path / "r")
    for name, param in base.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], param), name
    assert not torch.equal(before, alone_logits(base, base.processor.encode_one(
        prompts.describe_target(pixels(56, 84, 1), "make the red circle blue"))))


# -- parsers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("<#Think> the circle is blue <#Success>", Decision("success", "the circle is blue")),
    ("  <#Think>too small<#Reflection> make the square large \n", Decision("reflection", "too small",
                                                                           "make the square large")),
    ("<#Think> the star vanished <#Failed>", Decision("failed", "the star vanished")),
    # EditThinker's refinement: the new instruction is for the source image
    ("<#Think> no sun <#Reflection> restart: add a low sun", Decision("reflection", "no sun", "add a low sun", True)),
])
def test_parse_decision_accepts_the_three_forms(text, expected):
    assert parse_decision(text) == expected
    assert parse_decision(prompts.format_decision(expected)) == expected


@pytest.mark.parametrize("text, why", [
    ("<#Think> looks right", "exactly one"),
    ("the circle is blue <#Success>", "starts with one"),
    ("<#Think> ok <#Success> <#Failed>", "exactly one"),
    ("<#Think> ok <#Reflection> fix it <#Reflection> again", "exactly one"),
    ("<#Think> ok <#Maybe>", "unknown tag"),
    ("<#Think> ok <#Reflection>  ", "new instruction"),
    ("<#Think> ok <#Success> and more", "after"),
    ("<#Think> a <#Think> b <#Success>", "starts with one"),
    ("garbage", "starts with one"),
])
def test_parse_decision_rejects_malformed_answers(text, why):
    with pytest.raises(ThinkerReplyError, match=why):
        parse_decision(text)


@pytest.mark.parametrize("text, expected", [
    ("score: 7\nreason: the star moved to column 4", (7, "the star moved to column 4")),
    ("Score: 0\nReason: nothing changed\nat all", (0, "nothing changed\nat all")),
    (" score:10 \n reason: exact ", (10, "exact")),
])
def test_parse_score_accepts_good_answers(text, expected):
    assert parse_score(text) == expected
    assert parse_score(prompts.format_score(*expected)) == expected


@pytest.mark.parametrize("text, why", [
    ("score: 11\nreason: great", "outside"),
    ("score: -1\nreason: bad", "outside"),
    ("score: 7.5\nreason: hm", "not an integer"),
    ("score: seven\nreason: hm", "not an integer"),
    ("score: 7", "not 'score"),
    ("score: 7\nreason:   ", "empty reason"),
    ("garbage", "not 'score"),
])
def test_parse_score_rejects_malformed_answers(text, why):
    with pytest.raises(ThinkerReplyError, match=why):
        parse_score(text)


# -- generation ---------------------------------------------------------------------------------------


def test_greedy_generation_is_deterministic_and_batch_independent(reasoner):
    a = prompts.think(pixels(56, 56, 1), "make it blue")
    b = prompts.decide(pixels(56, 84, 2), "move the star", "a star at row 2", 4, "wrong column")
    first = reasoner.generate([a, b], 8)
    assert first == reasoner.generate([a, b], 8)
    assert first == reasoner.generate(a, 8) + reasoner.generate(b, 8)


def test_sampled_generation_is_reproducible_with_a_seed(reasoner):
    messages = prompts.think(pixels(56, 56, 1), "make it blue")
    draw = [reasoner.generate(messages, 12, do_sample=True, temperature=1.5, top_p=0.95, seed=s) for s in (1, 1, 2)]
    assert draw[0] == draw[1]
    assert draw[0] != draw[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs a CUDA device")
@torch.no_grad()
def test_packed_flex_condition_states_equal_each_sample_alone_on_gpu(reasoner, samples):
    reasoner.to("cuda")
    try:
        images, instructions = zip(*samples)
        packed = reasoner.condition_states(images, instructions, packed=True, backend="flex")
        for (image, instruction), got in zip(samples, packed):
            want = reasoner.condition_states([image], [instruction])[0]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    finally:
        reasoner.to("cpu")


def test_answers_keep_decision_tags_and_drop_other_special_tokens(reasoner):
    tok = reasoner.tokenizer
    if "<#Failed>" not in tok.get_vocab():
        reasoner.add_decision_tokens()
    text = tok.encode("fix it", add_special_tokens=False)
    special = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|im_start|>")]
    ids = [tok.convert_tokens_to_ids("<#Think>"), *text, *special, tok.convert_tokens_to_ids("<#Failed>"),
           tok.eos_token_id, *text]
    (answer,) = reasoner.decode_answers(torch.tensor([ids]))
    assert answer == tok.decode([ids[0], *text, ids[-len(text) - 2]], skip_special_tokens=False)
    assert "<|image_pad|>" not in answer and "<#Think>" in answer and "<#Failed>" in answer
