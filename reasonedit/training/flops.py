"""Analytic model FLOPs of a training step, counting real (non-padding) tokens only.

Dense matmuls: a weight W (every nn.Linear, and the vision tower's patch Conv3d) applied to n tokens
costs 2 * W.numel() * n FLOPs forward. Backward costs twice that for a trained weight (input and
weight gradients: the familiar 6 * params * tokens), once for a frozen weight that gradients pass
through (input gradients only: 4 * params * tokens), and nothing where no gradient flows (2 *).
Which tokens a weight sees is fixed by where it sits: the reasoner's language model and LM head see
every row token, its vision tower every 14x14 patch (the merger's MLP one per 2x2 merged patch), the
generator's image-stream weights the image tokens, its text-stream weights the text tokens, and its
timestep / modulation weights two conditioning rows per sample.

Attention: QK^T and AV cost 4 * d_attn FLOPs per (query, key) pair the mask allows, per layer: L^2
for a full-attention document (a generator sample), L(L+1)/2 for a causal one (a reasoner sample),
and the sum over windows for the vision tower's windowed layers; forward + backward is three times
that (12 * layers * d_attn * pairs), forward alone once. Biases, norms, activations, RoPE, softmax
and the loss are left out (a few percent at most); padding never counts, whatever a kernel does with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

FORWARD, BACKWARD_INPUTS, BACKWARD_WEIGHTS = 2, 2, 2  # FLOPs per weight per token of each matmul pass


@dataclass(frozen=True)
class ReasonerDoc:
    """One sample in a reasoner forward: its row tokens and its images' (t, h, w) patch grids."""

    tokens: int
    grids: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class GeneratorDoc:
    """One sample in a generator forward: its text tokens and its image tokens (target + sources)."""

    text: int
    image: int


@dataclass
class FlopCount:
    """FLOPs by part (e.g. "reasoner.matmul", "generator.attention")."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def __add__(self, other: "FlopCount") -> "FlopCount":
        merged = dict(self.parts)
        for k, v in other.parts.items():
            merged[k] = merged.get(k, 0.0) + v
        return FlopCount(merged)


def matmul_multiplier(trained: bool, gradients_flow: bool) -> int:
    """FLOPs per weight per token: 6 trained, 4 frozen with gradients passing through, 2 forward only."""
    if trained:
        return FORWARD + BACKWARD_INPUTS + BACKWARD_WEIGHTS
    return FORWARD + BACKWARD_INPUTS if gradients_flow else FORWARD


def attention_multiplier(gradients_flow: bool) -> int:
    """Attention FLOPs per allowed pair per attention width: 4 forward, 12 forward + backward."""
    return 12 if gradients_flow else 4


def matmul_weights(module: torch.nn.Module) -> Iterable[tuple[str, int, bool]]:
    """(module name, weight elements, trained) of every dense matmul weight (Linear, Conv)."""
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            yield name, m.weight.numel(), m.weight.requires_grad


# -- the reasoner (transformers Qwen2.5-VL) --------------------------------------------------------

def _vision_pairs(grid: tuple[int, int, int], window: int, merge: int) -> tuple[int, int]:
    """(pairs in a full-attention layer, pairs in a windowed layer) for one image's (t, h, w) patch grid.

    Full layers attend within each frame; windowed layers within windows of `window` merged patches a side.
    """
    t, h, w = grid
    full = t * (h * w) ** 2
    mh, mw = h // merge, w // merge
    windowed = 0
    for a in range(0, mh, window):
        for b in range(0, mw, window):
            n = min(window, mh - a) * min(window, mw - b) * merge * merge
            windowed += n * n
    return full, t * windowed


def reasoner_flops(model: torch.nn.Module, docs: Sequence[ReasonerDoc], *, gradients: bool,
                   lm_head: bool = True) -> FlopCount:
    """FLOPs of one Qwen2.5-VL forward (+ backward when `gradients`) over `docs`.

    gradients: the loss reaches trainable weights in the language model (stage 1 and 3), so gradients
        pass back through all of it. The vision tower gets a backward only if it has trainable weights.
    lm_head: whether logits are computed (not for stage 2's condition states).
    """
    text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
    tokens = sum(d.tokens for d in docs)
    patches = sum(t * h * w for d in docs for t, h, w in d.grids)
    merge = vision_cfg.spatial_merge_size
    vision_trains = any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.visual."))
    matmul = {"reasoner.matmul": 0.0, "reasoner.vision": 0.0}
    for name, numel, trained in matmul_weights(model):
        if name.startswith("model.visual.merger.mlp"):
            n, part, flow = patches // (merge * merge), "reasoner.vision", vision_trains
        elif name.startswith("model.visual."):
            n, part, flow = patches, "reasoner.vision", vision_trains
        elif name.startswith("model.language_model."):
            n, part, flow = tokens, "reasoner.matmul", gradients
        elif name == "lm_head":
            if not lm_head:
                continue
            n, part, flow = tokens, "reasoner.matmul", gradients
        else:
            raise ValueError(f"reasoner_flops: no token count known for the weights of {name!r}")
        matmul[part] += matmul_multiplier(trained and flow, flow) * numel * n
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    lm_pairs = sum(d.tokens * (d.tokens + 1) // 2 for d in docs)
    attention = (attention_multiplier(gradients) * text_cfg.num_hidden_layers * text_cfg.num_attention_heads
                 * head_dim * lm_pairs)
    window = vision_cfg.window_size // vision_cfg.patch_size // merge
    full_layers = len(vision_cfg.fullatt_block_indexes)
    vision_pairs = 0
    for d in docs:
        for grid in d.grids:
            full, windowed = _vision_pairs(tuple(int(x) for x in grid), window, merge)
            vision_pairs += full_layers * full + (vision_cfg.depth - full_layers) * windowed
    vision_attention = attention_multiplier(vision_trains) * vision_cfg.hidden_size * vision_pairs
    return FlopCount({**matmul, "reasoner.attention": float(attention), "reasoner.vision_attention":
                      float(vision_attention)})


# -- the generator (packed QwenImage MMDiT) ------------------------------------------------------

_IMAGE_STREAM = ("img_in", "proj_out", ".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out", ".img_mlp.")
_TEXT_STREAM = ("txt_in", ".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj", ".attn.to_add_out",
                ".txt_mlp.")
_CONDITIONING = ("time_text_embed.", ".img_mod.", ".txt_mod.", "norm_out.")


def generator_flops(model: torch.nn.Module, docs: Sequence[GeneratorDoc], *, gradients: bool) -> FlopCount:
    """FLOPs of one generator forward (+ backward when `gradients`) over `docs`, one full document each."""
    image, text, rows = sum(d.image for d in docs), sum(d.text for d in docs), 2 * len(docs)
    matmul = 0.0
    for name, numel, trained in matmul_weights(model):
        dotted = "." + name + "."
        if any(("." + k.strip(".") + ".") in dotted for k in _IMAGE_STREAM):
            n = image
        elif any(("." + k.strip(".") + ".") in dotted for k in _TEXT_STREAM):
            n = text
        elif any(("." + k.strip(".") + ".") in dotted for k in _CONDITIONING):
            n = rows
        else:
            raise ValueError(f"generator_flops: no token count known for the weights of {name!r}")
        matmul += matmul_multiplier(trained and gradients, gradients) * numel * n
    cfg = model.config
    pairs = sum((d.text + d.image) ** 2 for d in docs)
    attention = (attention_multiplier(gradients) * cfg.num_layers * cfg.num_attention_heads
                 * cfg.attention_head_dim * pairs)
    return FlopCount({"generator.matmul": float(matmul), "generator.attention": float(attention)})


# -- peak throughput -------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), TFLOP/s. Matched in order,
# so the more specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (the "H100 80GB HBM3" name)
    ("H200", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name, or None when it is not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    if seconds <= 0 or peak_tflops <= 0:
        raise ValueError(f"mfu: need positive seconds and peak, got {seconds}, {peak_tflops}")
    return flops / seconds / (peak_tflops * 1e12)


__all__ = ["BF16_PEAK_TFLOPS", "FlopCount", "GeneratorDoc", "ReasonerDoc", "attention_multiplier",
           "bf16_peak_tflops", "generator_flops", "matmul_multiplier", "matmul_weights", "mfu", "reasoner_flops"]
