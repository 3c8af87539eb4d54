"""Qwen2-style tokenizers: a tiny one trained locally, and the decision tokens ReasonEdit adds."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

logger = logging.getLogger(__name__)

# The reflection decisions, one added special token each.
THINK_TOKEN = "<#Think>"
SUCCESS_TOKEN = "<#Success>"
REFLECTION_TOKEN = "<#Reflection>"
FAILED_TOKEN = "<#Failed>"
DECISION_TOKENS = (THINK_TOKEN, SUCCESS_TOKEN, REFLECTION_TOKEN, FAILED_TOKEN)

# Qwen2.5-VL chat special tokens, spelled as Qwen spells them, in Qwen's id order.
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
VISION_PAD_TOKEN = "<|vision_pad|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
VIDEO_PAD_TOKEN = "<|video_pad|>"
QWEN_CHAT_TOKENS = (
    ENDOFTEXT_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    VISION_PAD_TOKEN,
    IMAGE_PAD_TOKEN,
    VIDEO_PAD_TOKEN,
)

# Qwen2's pre-tokenizer split; Qwen2Tokenizer rebuilds its pipeline with it on every load, so training
# with anything else would give a tokenizer that changes behaviour after a save/load round trip.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2-VL / Qwen2.5-VL chat template (default system prompt included, as in the released models),
# so code written against the tiny tokenizer renders prompts exactly as it will with a real one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen2_backend() -> Tokenizer:
    """An untrained BPE with Qwen2's normaliser, pre-tokenizer and decoder."""
    backend = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on `texts` and wrap it as a Qwen2 tokenizer with chat and decision tokens.

    `vocab_size` bounds the learned vocabulary (the 256 byte symbols included); the special tokens
    come on top of it. Text is NFC-normalised, as Qwen2 does; any NFC text round-trips exactly.
    """
    corpus = list(texts)
    if not corpus:
        raise ValueError("build_tokenizer: `texts` is empty; give at least one training sentence")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet):
        raise ValueError(f"build_tokenizer: vocab_size={vocab_size} is below the {len(alphabet)} byte symbols")

    backend = _qwen2_backend()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        # Every byte in the base vocabulary, so text never seen in training still encodes.
        initial_alphabet=sorted(alphabet),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    # Lift vocab and merges out so the wrapper is built the same way from_pretrained rebuilds it.
    trained = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tokenizer = Qwen2Tokenizer(
        vocab=dict(trained["vocab"]),
        merges=merges,
        unk_token=None,
        bos_token=None,
        # eos is switched to <|im_end|> below: naming it here would give it the first added id.
        eos_token=ENDOFTEXT_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        model_max_length=32768,
    )
    # Chat tokens first, then decisions, so ids follow Qwen's order and decisions come last.
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(QWEN_CHAT_TOKENS)}, replace_extra_special_tokens=False
    )
    tokenizer.eos_token = IM_END_TOKEN
    add_decision_tokens(tokenizer)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    logger.info("built tokenizer: %d learned entries, %d total", len(trained["vocab"]), len(tokenizer))
    return tokenizer


def add_decision_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add whichever decision tokens `tokenizer` lacks, as special tokens; return how many were added."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in DECISION_TOKENS if token not in vocab]
    if not missing:
        return 0
    added = tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    logger.info("added decision tokens %s", missing)
    return added


def decision_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Map each decision token to its id; raise if one is absent or does not encode to a single id."""
    return {token: single_token_id(tokenizer, token) for token in DECISION_TOKENS}


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The one id `token` encodes to; raise ValueError naming the token if it is not a single token."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"token {token!r} encodes to {len(ids)} ids {ids}, not one; add it to the tokenizer first "
            "(add_decision_tokens for the decision tokens) and resize the model's embeddings"
        )
    return ids[0]
