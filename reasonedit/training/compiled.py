"""`train.compile`: each transformer block of the generator and of the reasoner's language model compiled on its
own (`torch.compile(dynamic=True)`: packed lengths change every step), fused AdamW. `auto` turns it on where it
pays and is tested: CUDA, outside DeepSpeed (its engine compiles by its own `compile` section).

Blocks are compiled in place (`nn.Module.compile`), so parameter names, state dicts and checkpoints are the
same as without it; the compile happens lazily, at a block's first call.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from reasonedit.models.model import ReasonEditModel

log = logging.getLogger("reasonedit.train")

SETTINGS = ("auto", "true", "false")


def compile_enabled(setting: str | bool, device: torch.device, parallel: str) -> bool:
    """Whether `train.compile` (auto | true | false) compiles here: auto is CUDA outside DeepSpeed."""
    value = str(setting).lower()
    if value not in SETTINGS:
        raise ValueError(f"train.compile: {setting!r}; choose from {list(SETTINGS)}")
    if value == "auto":
        return device.type == "cuda" and parallel != "deepspeed"
    return value == "true"


def fused_adamw(enabled: bool, params: list[torch.nn.Parameter]) -> bool:
    """AdamW's fused kernel: with the switch on, when every parameter lives on CUDA (not under CPU offload)."""
    return enabled and bool(params) and all(p.device.type == "cuda" for p in params)


def transformer_blocks(model: "ReasonEditModel") -> list[torch.nn.Module]:
    """The generator's blocks, then the reasoner's language-model decoder layers (the vision tower is left
    eager: its windowed attention has its own varying shapes)."""
    blocks: list[torch.nn.Module] = []
    if model.generator is not None:
        blocks += list(model.generator.transformer_blocks)
    if model.reasoner is not None:
        decoder = model.reasoner.model.get_decoder()
        blocks += list(getattr(decoder, "layers", []))
    return blocks


def compile_blocks(model: "ReasonEditModel", **options) -> int:
    """Compile each transformer block in place (dynamic shapes); returns how many."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(dynamic=True, **options)
    log.info("train.compile: %d transformer blocks compiled (dynamic shapes), fused AdamW", len(blocks))
    return len(blocks)


__all__ = ["SETTINGS", "compile_blocks", "compile_enabled", "fused_adamw", "transformer_blocks"]
