"""The tiny Qwen2-style tokenizer and the tiny random Qwen2.5-VL reasoner built from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Tokenizer

from reasonedit.models.tiny import build_tiny_reasoner, init_tiny_reasoner, load_reasoner
from reasonedit.models.tokenizer import (
    DECISION_TOKENS,
    IMAGE_PAD_TOKEN,
    QWEN_CHAT_TOKENS,
    add_decision_tokens,
    build_tokenizer,
    decision_token_ids,
)

CORPUS = [
    "make the red circle blue",
    "move the small green star to row 2, column 3",
    "remove the yellow triangle in the top left corner",
    "turn every square into a circle",
    "make the largest shape twice as big",
    "swap the colours of the two circles",
    "<#Think> the square is too small <#Reflection> make the square large",
    "<#Think> the circle is now blue and nothing else changed <#Success>",
    "<#Think> the star vanished instead of moving <#Failed>",
    "Score: 7. Reason: the star moved to row 2 but to column 4, not column 3.",
]
SEED = 0
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch
IMAGE_GRID_THW = torch.tensor([[1, 4, 4]])  # one 56x56 image: 4x4 patches of 14 px
IMAGE_TOKENS = 16 // 4  # 16 patches, merged 2x2 into one token each


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def reasoner_dir(tmp_path_factory) -> Path:
    return build_tiny_reasoner(tmp_path_factory.mktemp("tiny") / "reasoner", CORPUS, seed=SEED)


@pytest.fixture(scope="module")
def loaded(reasoner_dir):
    return load_reasoner(reasoner_dir)


def image_prompt(tokenizer, text: str) -> dict[str, torch.Tensor]:
    """Model inputs for one 56x56 image and `text`, expanded as the Qwen2.5-VL processor does."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * IMAGE_TOKENS)
    input_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
    generator = torch.Generator().manual_seed(SEED)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(16, PATCH_DIM, generator=generator),
        "image_grid_thw": IMAGE_GRID_THW,
        "mm_token_type_ids": (input_ids == image_id).int(),  # 1 on image tokens, 0 on text
    }


@torch.no_grad()
def logits_of(model, **inputs) -> torch.Tensor:
    model.eval()
    model.model.rope_deltas = None  # cached by the previous forward; a fresh prompt must not reuse it
    return model(**inputs).logits


@pytest.mark.parametrize("token", QWEN_CHAT_TOKENS + DECISION_TOKENS)
def test_special_token_is_one_id_and_decodes_back(tokenizer, token):
    ids = tokenizer.encode(token, add_special_tokens=False)
    assert len(ids) == 1
    assert tokenizer.decode(ids) == token


@pytest.mark.parametrize(
    "text",
    [
        "make the red circle blue",
        "zebra quokka xylophone 12345 never seen in training",
        "Déplace l'étoile ★ vers le coin — 日本語の図形 🙂🔺",
        "  tabs\tand\nnewlines\r\n and   runs of spaces  ",
        "<#Think> inline decision tokens <#Reflection> survive",
    ],
)
def test_text_round_trips_through_encode_decode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_is_deterministic(tokenizer, tmp_path):
    build_tokenizer(CORPUS).save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_chat_template_renders_image_and_generation_prompt(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "make the red circle blue"}]}
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>make the red circle blue<|im_end|>\n" in (
        rendered
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_add_decision_tokens_adds_only_missing_ones(tokenizer):
    bare = Qwen2Tokenizer()  # stands in for a real Qwen tokenizer read from disk
    assert add_decision_tokens(bare) == len(DECISION_TOKENS)
    assert add_decision_tokens(bare) == 0
    assert sorted(decision_token_ids(bare)) == sorted(DECISION_TOKENS)
    assert add_decision_tokens(tokenizer) == 0


def test_decision_token_ids_names_a_token_that_is_not_single():
    with pytest.raises(ValueError, match="<#Think>"):
        decision_token_ids(Qwen2Tokenizer())


def test_loaded_tokenizer_matches_built_one(tokenizer, loaded):
    _, loaded_tokenizer = loaded
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    text = "<#Think> move the star 🙂 <#Success>"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.eos_token == "<|im_end|>" and loaded_tokenizer.pad_token == "<|endoftext|>"


def test_loaded_model_logits_equal_in_memory_logits_bitwise(loaded):
    model, tokenizer = init_tiny_reasoner(CORPUS, seed=SEED)
    loaded_model, _ = loaded
    inputs = image_prompt(tokenizer, "make the red circle blue")
    assert torch.equal(logits_of(loaded_model, **inputs), logits_of(model, **inputs))


def test_same_seed_gives_identical_weights(reasoner_dir, tmp_path):
    again = build_tiny_reasoner(tmp_path / "again", CORPUS, seed=SEED)
    assert (again / "model.safetensors").read_bytes() == (reasoner_dir / "model.safetensors").read_bytes()
    other, _ = init_tiny_reasoner(CORPUS, seed=SEED + 1)
    first, _ = init_tiny_reasoner(CORPUS, seed=SEED)
    assert not torch.equal(other.lm_head.weight, first.lm_head.weight)


def test_vocab_covers_every_token_id(loaded):
    model, tokenizer = loaded
    vocab_size = model.config.text_config.vocab_size
    assert max(tokenizer.get_vocab().values()) < vocab_size
    assert len(tokenizer) <= vocab_size
    assert model.get_input_embeddings().num_embeddings == vocab_size == model.lm_head.out_features
    config = model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id


def test_forward_with_one_image(loaded):
    model, tokenizer = loaded
    inputs = image_prompt(tokenizer, "make the red circle blue")
    assert int(inputs["mm_token_type_ids"].sum()) == IMAGE_TOKENS
    logits = logits_of(model, **inputs)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_rope_index_gives_image_tokens_3d_positions(loaded):
    model, tokenizer = loaded
    inputs = image_prompt(tokenizer, "make the red circle blue")
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    on_image = inputs["mm_token_type_ids"][0].bool()
    t, h, w = position_ids[:, 0, on_image]  # (3, IMAGE_TOKENS): a 2x2 grid of merged patches
    assert torch.equal(h - h[0], torch.tensor([0, 0, 1, 1]))
    assert torch.equal(w - w[0], torch.tensor([0, 1, 0, 1]))
    assert torch.equal(t, torch.full_like(t, int(t[0])))
    text = position_ids[:, 0, ~on_image]
    assert torch.equal(text[0], text[1]) and torch.equal(text[1], text[2])


def test_forward_uses_3d_positions_only_with_mm_token_type_ids(loaded):
    model, tokenizer = loaded
    inputs = image_prompt(tokenizer, "make the red circle blue")
    with_types = logits_of(model, **inputs)
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert torch.equal(with_types, logits_of(model, **inputs, position_ids=position_ids))
    # Without token types transformers 5 falls back to 1-D positions, silently.
    without_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert not torch.allclose(with_types, logits_of(model, **without_types))


def test_load_missing_path_raises_naming_it(tmp_path):
    missing = tmp_path / "no-such-reasoner"
    with pytest.raises(FileNotFoundError, match="no-such-reasoner"):
        load_reasoner(missing)


def test_load_directory_without_weights_raises_naming_the_file(reasoner_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_bytes((reasoner_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_reasoner(partial)


def test_build_refuses_existing_directory_and_leaves_no_staging(reasoner_dir):
    with pytest.raises(FileExistsError, match=re.escape(str(reasoner_dir))):
        build_tiny_reasoner(reasoner_dir, CORPUS)
    assert [p.name for p in reasoner_dir.parent.iterdir()] == [reasoner_dir.name]


def test_load_refuses_missing_and_unexpected_weights(tmp_path):
    """transformers would only warn and initialise the missing weights at random."""
    from safetensors.torch import load_file, save_file

    from reasonedit.models.tiny import WeightMismatchError, build_tiny_reasoner, load_reasoner
    path = build_tiny_reasoner(tmp_path / "r", ["make the red circle blue", "remove the star"], seed=0)
    weights = load_file(path / "model.safetensors")
    dropped = next(k for k in weights if "layers.0.self_attn.q_proj.weight" in k)
    weights.pop(dropped)
    weights["model.extra_head.weight"] = torch.zeros(2, 2)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError) as info:
        load_reasoner(path)
    assert "missing keys" in str(info.value) and "q_proj" in str(info.value)
    assert "unexpected keys" in str(info.value) and "extra_head" in str(info.value)
