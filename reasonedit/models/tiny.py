"""Tiny random Qwen2.5-VL reasoners built locally, and loading any reasoner back from a directory."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from reasonedit.models.tokenizer import (
    ENDOFTEXT_TOKEN,
    IMAGE_PAD_TOKEN,
    VIDEO_PAD_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
    build_tokenizer,
    single_token_id,
)
from reasonedit.publish import staged_folder

logger = logging.getLogger(__name__)

# Real Qwen2.5-VL pads its embedding table past the tokenizer; rounding keeps matmuls aligned too.
VOCAB_MULTIPLE = 64
# Qwen2.5-VL's vision geometry: 14-px patches, 2x2 merge, 2-frame temporal patches, 112-px windows.
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
WINDOW_SIZE = 112
ROPE_THETA = 1_000_000.0
MAX_POSITIONS = 32768
# Files without which a directory is not a loadable reasoner (weights are checked separately).
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")

def mrope_section_for(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (t, h, w) in Qwen's 1/4, 3/8, 3/8 proportions."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim={head_dim} must be even and at least 6 to split over 3 rope axes")
    half = head_dim // 2
    temporal = half // 4 or 1
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]

def tiny_reasoner_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    vision_heads: int = 2,
    vision_intermediate_size: int = 64,
    initializer_range: float = 0.02,
    rope_theta: float = ROPE_THETA,
    mrope_section: Sequence[int] | None = None,
) -> Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL config whose vocabulary and special ids fit `tokenizer`.

    `initializer_range` is the std of the random weights (Qwen's 0.02 suits its 3584-wide layers; a 64-wide
    tiny model learns to read single image tokens many times faster from about 1 / sqrt(width)).
    `rope_theta` and `mrope_section` are the language model's 3-axis RoPE base and its split of the
    head_dim / 2 rotary frequencies over (t, h, w); the defaults are Qwen2.5-VL's (1e6, Qwen's proportions)."""
    if not initializer_range > 0:
        raise ValueError(f"initializer_range={initializer_range} must be positive")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if vision_hidden_size % vision_heads:
        raise ValueError(f"vision_hidden_size={vision_hidden_size} is not divisible by vision_heads={vision_heads}")
    head_dim = hidden_size // num_heads
    if not rope_theta > 1:
        raise ValueError(f"rope_theta={rope_theta} must be greater than 1")
    if mrope_section is None:
        mrope_section = mrope_section_for(head_dim)
    elif len(mrope_section) != 3 or min(mrope_section) < 1 or sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section={list(mrope_section)} must be 3 positive counts summing to "
                         f"head_dim / 2 = {head_dim // 2}")
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    endoftext_id = single_token_id(tokenizer, ENDOFTEXT_TOKEN)
    # Qwen has no bos token; its configs name <|endoftext|> as bos, and so do we.
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else endoftext_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else endoftext_id
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; Qwen chat models use <|im_end|>")

    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": MAX_POSITIONS,
        "use_sliding_window": False,
        "max_window_layers": num_layers,
        # transformers 5 reads rope settings from rope_parameters; "default" is plain rope split into
        # mrope_section over the (t, h, w) position axes.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(rope_theta),
            "mrope_section": [int(n) for n in mrope_section],
        },
        "bos_token_id": bos_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_id,
        "initializer_range": initializer_range,
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size,
        "num_heads": vision_heads,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "out_hidden_size": hidden_size,
        "window_size": WINDOW_SIZE,
        # Like the released models: windowed blocks with full attention closing the stack; the
        # default indexes (7, 15, 23, 31) would name blocks a tiny tower does not have.
        "fullatt_block_indexes": [vision_depth - 1],
        "tokens_per_second": 2,
        "initializer_range": initializer_range,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=single_token_id(tokenizer, IMAGE_PAD_TOKEN),
        video_token_id=single_token_id(tokenizer, VIDEO_PAD_TOKEN),
        vision_start_token_id=single_token_id(tokenizer, VISION_START_TOKEN),
        vision_end_token_id=single_token_id(tokenizer, VISION_END_TOKEN),
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )

def init_tiny_reasoner(
    texts: Iterable[str], *, vocab_size: int = 1024, seed: int = 0, **config_kwargs: int
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """A tokenizer trained on `texts` and a tiny Qwen2.5-VL with weights drawn from `seed`, in memory."""
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    config = tiny_reasoner_config(tokenizer, **config_kwargs)
    # fork_rng keeps the caller's global RNG untouched by the seeded init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()  # as from_pretrained returns it
    return model, tokenizer

def build_tiny_reasoner(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    seed: int = 0,
    **config_kwargs: int,
) -> Path:
    """Build a tokenizer and a random tiny Qwen2.5-VL reasoner from `texts` and save both to `out_dir`.

    Written to a temporary sibling and renamed into place, so `out_dir` is either whole or absent.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"reasoner directory {out_dir} already exists; remove it or pick another out_dir")
    model, tokenizer = init_tiny_reasoner(texts, vocab_size=vocab_size, seed=seed, **config_kwargs)

    with staged_folder(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("saved tiny reasoner (%d parameters, vocab %d) to %s", n_params, len(tokenizer), out_dir)
    return out_dir

class WeightMismatchError(ValueError):
    """A checkpoint whose weights do not fit the model: lists the keys."""

def load_qwen_strict(path: str | os.PathLike, **model_kwargs: object) -> Qwen2_5_VLForConditionalGeneration:
    """`from_pretrained` that refuses missing, unexpected or mis-shaped weights instead of warning.

    transformers only logs such keys and initialises the missing ones at random; a reasoner that
    silently lost weights would train and evaluate as if nothing were wrong.
    """
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, local_files_only=True, output_loading_info=True, **model_kwargs)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind, ()) or ())
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise WeightMismatchError(f"weights in {path} do not fit the Qwen2.5-VL config there: " + "; ".join(problems))
    return model

def load_reasoner(
    path: str | os.PathLike, **model_kwargs: object
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load a Qwen2.5-VL reasoner and its tokenizer from a local directory (never the hub).

    `model_kwargs` go to `from_pretrained` (for example `dtype` or `attn_implementation`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"reasoner directory {path} does not exist")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise FileNotFoundError(f"reasoner directory {path} lacks {', '.join(missing)}")
    model = load_qwen_strict(path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.text_config.vocab_size}; resize the embeddings and save again"
        )
    return model, tokenizer
