"""The generator: a packed MMDiT with the parameters and the output of diffusers' Qwen-Image transformer.

Parameter names, shapes and config fields are those of `diffusers.QwenImageTransformer2DModel`, so real
Qwen-Image(-Edit) weights load one to one, and on one sample the output equals the diffusers module's.
Unlike that module it runs *packed*: several samples of different image sizes, text lengths and numbers
of source images share ONE row (batch dimension 1). Per sample the row holds

    [ text tokens | noisy target latent tokens | clean source latent tokens ... ]

and every sample is one attention document (full attention inside it, none across samples). The two
streams keep their own weights: each block gathers the text tokens and the image tokens of all samples,
runs that stream's norms, modulation and MLP on them in one call, and scatters them back into packed
order for the joint attention. Modulation comes from a small table of timestep embeddings, two rows per
sample (the noisy target's timestep, and the clean sources' one), gathered per token.

Read top to bottom: the input records and `pack_generator_samples`, the RoPE and timestep conditioning,
`JointAttention`, `GeneratorBlock`, then the model. Its weights load from diffusers folders in
`generator_weights.py`, beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm

from reasonedit.models.attention import PackedAttention, Span, TokenLayout

log = logging.getLogger(__name__)

ROPE_THETA = 10000
TIMESTEP_CHANNELS = 256
# ours, not diffusers': for generators trained from scratch (defaults = diffusers' behaviour)
FROM_SCRATCH_FIELDS = ("rope_theta", "rope_scale", "qk_norm_init", "qk_position_init")


# ----------------------------------------------------------------------------------------------------
# Input records and packing
# ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class GeneratorSample:
    """One training or sampling example for the generator.

    text_states: (T, joint_attention_dim) condition states; with `text_mask` (T,) bool, only the True
        tokens are kept and each keeps its index for RoPE (as diffusers does with a padding mask).
    target: (C, h, w) noisy latents, or (F, C, h, w) for several target frames (layered decomposition;
        every target frame takes `timestep`, where diffusers' zero_cond_t would zero all but the first).
    sources: clean (C, h_i, w_i) condition latents, each its own RoPE frame after the target.
    timestep: the noisy target's sigma in [0, 1] (the pipelines pass t / 1000).
    additional_t_cond: 0 or 1, for models with `use_additional_t_cond` (Qwen-Image-Layered passes 0).
    """

    text_states: torch.Tensor
    target: torch.Tensor
    sources: Sequence[torch.Tensor] = ()
    timestep: float | torch.Tensor = 1.0
    text_mask: torch.Tensor | None = None
    additional_t_cond: int | None = None


@dataclass(eq=False)
class PackedGeneratorBatch:
    """Samples packed into one row: per sample [text | target | sources], with the maps between streams.

    Packed-row tensors have length L = N_txt + N_img. `packed_order` takes cat([text, image]) to packed
    order; `text_slots` / `image_slots` take packed order back to each stream.
    """

    text_states: torch.Tensor  # (N_txt, joint_attention_dim): real text tokens of every sample
    image_tokens: torch.Tensor  # (N_img, C * p * p): per sample its target then its sources, patchified
    timesteps: torch.Tensor  # (B,) float32: the noisy target's timestep per sample
    source_timesteps: torch.Tensor  # (B,) float32: the timestep the clean sources are modulated with
    additional_t_cond: torch.Tensor | None  # (B,) long, or None
    text_sample: torch.Tensor  # (N_txt,) long: sample of each text token
    image_sample: torch.Tensor  # (N_img,) long: sample of each image token
    image_is_source: torch.Tensor  # (N_img,) bool: token of a clean source image
    packed_order: torch.Tensor  # (L,) long: index into cat([text, image]) for each packed position
    text_slots: torch.Tensor  # (N_txt,) long: packed position of each text token
    image_slots: torch.Tensor  # (N_img,) long: packed position of each image token
    positions: torch.Tensor  # (L, 3) long: RoPE (frame, height, width) position of each packed token
    layout: TokenLayout  # one document with one full span per sample
    target_shapes: list[tuple[int, ...]]  # per sample the target's latent shape, (C, h, w) or (F, C, h, w)
    target_ranges: list[tuple[int, int]]  # per sample [start, end) of its target tokens in image_tokens
    img_shapes: list[list[tuple[int, int, int]]]  # per sample, diffusers' img_shapes entry
    text_lengths: list[int]  # per sample, real text tokens
    patch_size: int = 2
    layer3d_rope: bool = False

    @property
    def num_samples(self) -> int:
        return len(self.target_shapes)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def target_index(self) -> torch.Tensor:
        """(N_target,) indices of the noisy target tokens in image_tokens: where the loss goes."""
        return torch.cat([torch.arange(a, b) for a, b in self.target_ranges]).to(self.image_tokens.device)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PackedGeneratorBatch":
        """The batch on `device`; `dtype` casts the text states and image tokens only."""
        moved = {}
        for name in ("text_states", "image_tokens"):
            moved[name] = getattr(self, name).to(device=device, dtype=dtype)
        for name in ("timesteps", "source_timesteps", "text_sample", "image_sample", "image_is_source",
                     "packed_order", "text_slots", "image_slots", "positions"):
            moved[name] = getattr(self, name).to(device)
        if self.additional_t_cond is not None:
            moved["additional_t_cond"] = self.additional_t_cond.to(device)
        moved["layout"] = TokenLayout(self.layout.doc.to(device), self.layout.span.to(device),
                                      self.layout.full.to(device))
        return replace(self, **moved)


def patchify(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """(C, h, w) or (F, C, h, w) latents -> (F * h/p * w/p, C * p * p) tokens, as the pipelines pack them."""
    frames = latents if latents.dim() == 4 else latents[None]
    f, c, h, w = frames.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch_size={p}")
    x = frames.reshape(f, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (F, h/p, w/p, C, p, p)
    return x.reshape(f * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, shape: Sequence[int], patch_size: int = 2) -> torch.Tensor:
    """Inverse of `patchify`: (F * h/p * w/p, C * p * p) tokens -> latents of `shape` ((C, h, w) or (F, C, h, w))."""
    f, (c, h, w) = (shape[0] if len(shape) == 4 else 1), shape[-3:]
    p = patch_size
    x = tokens.reshape(f, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (F, C, h/p, p, w/p, p)
    x = x.reshape(f, c, h, w)
    return x if len(shape) == 4 else x[0]


def _image_positions(frame: int, height: int, width: int) -> torch.Tensor:
    """(height * width, 3) RoPE positions of one image: centred rows and columns (Qwen's scale_rope)."""
    rows = torch.arange(height) - (height - height // 2)
    cols = torch.arange(width) - (width - width // 2)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.full((grid.shape[0], 1), frame), grid], dim=1)


def pack_generator_samples(
    samples: Sequence[GeneratorSample],
    patch_size: int = 2,
    *,
    sources_at_t0: bool = False,
    layer3d_rope: bool = False,
) -> PackedGeneratorBatch:
    """Pack samples into one row, [text | target | sources] each, with RoPE positions and the attention layout.

    sources_at_t0: modulate the clean source tokens with t = 0 (what a `zero_cond_t` model always does;
        this lets a model without the flag be trained or run that way too).
    layer3d_rope: positions as `use_layer3d_rope` models place them (the last image takes frame -1).
    """
    if not samples:
        raise ValueError("pack_generator_samples needs at least one sample")
    text, images, text_sample, image_sample, image_is_source = [], [], [], [], []
    order, positions, spans = [], [], []
    timesteps, additional = [], []
    target_shapes, target_ranges, img_shapes, text_lengths = [], [], [], []
    n_txt_total = sum(int(s.text_mask.sum()) if s.text_mask is not None else s.text_states.shape[0]
                      for s in samples)
    n_txt = n_img = 0
    for i, s in enumerate(samples):
        if s.text_states.dim() != 2:
            raise ValueError(f"sample {i}: text_states must be (T, D), got {tuple(s.text_states.shape)}")
        if s.target.dim() not in (3, 4):
            raise ValueError(f"sample {i}: target must be (C, h, w) or (F, C, h, w), got {tuple(s.target.shape)}")
        channels = s.target.shape[-3]
        for j, src in enumerate(s.sources):
            if src.dim() != 3 or src.shape[0] != channels:
                raise ValueError(f"sample {i}: source {j} must be ({channels}, h, w), got {tuple(src.shape)}")

        # text: drop padding, keep each token's index for RoPE
        kept = torch.arange(s.text_states.shape[0])
        if s.text_mask is not None:
            if s.text_mask.shape != (s.text_states.shape[0],):
                raise ValueError(f"sample {i}: text_mask must be ({s.text_states.shape[0]},), "
                                 f"got {tuple(s.text_mask.shape)}")
            kept = kept[s.text_mask.bool().cpu()]
        text.append(s.text_states[kept.to(s.text_states.device)])

        # images: target frames, then sources; one diffusers img_shapes entry each
        frames = list(s.target) if s.target.dim() == 4 else [s.target]
        pictures = frames + list(s.sources)
        shapes = [(1, x.shape[-2] // patch_size, x.shape[-1] // patch_size) for x in pictures]
        tokens = [patchify(x, patch_size) for x in pictures]
        n_target = sum(t.shape[0] for t in tokens[:len(frames)])
        images.extend(tokens)

        # RoPE: image k is frame k (layer3d: the last image is frame -1); text starts past the images
        image_pos = []
        for k, (_, h, w) in enumerate(shapes):
            frame = -1 if layer3d_rope and k == len(shapes) - 1 else k
            image_pos.append(_image_positions(frame, h, w))
        text_start = max(max(h // 2, w // 2) for _, h, w in shapes)
        if layer3d_rope:
            text_start = max(text_start, len(shapes) - 1)
        text_pos = (text_start + kept)[:, None].expand(-1, 3)

        n_t, n_i = len(kept), sum(t.shape[0] for t in tokens)
        positions += [text_pos, *image_pos]
        order += [torch.arange(n_txt, n_txt + n_t), n_txt_total + torch.arange(n_img, n_img + n_i)]
        text_sample.append(torch.full((n_t,), i))
        image_sample.append(torch.full((n_i,), i))
        image_is_source.append(torch.arange(n_i) >= n_target)
        spans.append(Span(doc=i, length=n_t + n_i, full=True))
        timesteps.append(float(s.timestep))
        additional.append(s.additional_t_cond)
        target_shapes.append(tuple(s.target.shape))
        target_ranges.append((n_img, n_img + n_target))
        img_shapes.append(shapes)
        text_lengths.append(n_t)
        n_txt += n_t
        n_img += n_i

    if any(a is None for a in additional) and not all(a is None for a in additional):
        raise ValueError("additional_t_cond is set on some samples and not on others; set it on all or none")
    packed_order = torch.cat(order)
    slots = torch.empty_like(packed_order)
    slots[packed_order] = torch.arange(len(packed_order))
    t = torch.tensor(timesteps, dtype=torch.float32)
    return PackedGeneratorBatch(
        text_states=torch.cat(text),
        image_tokens=torch.cat(images),
        timesteps=t,
        source_timesteps=torch.zeros_like(t) if sources_at_t0 else t.clone(),
        additional_t_cond=None if additional[0] is None else torch.tensor(additional, dtype=torch.long),
        text_sample=torch.cat(text_sample),
        image_sample=torch.cat(image_sample),
        image_is_source=torch.cat(image_is_source),
        packed_order=packed_order,
        text_slots=slots[:n_txt],
        image_slots=slots[n_txt:],
        positions=torch.cat(positions).long(),
        layout=TokenLayout.from_spans(spans),
        target_shapes=target_shapes,
        target_ranges=target_ranges,
        img_shapes=img_shapes,
        text_lengths=text_lengths,
        patch_size=patch_size,
        layer3d_rope=layer3d_rope,
    )


def target_predictions(batch: PackedGeneratorBatch, output: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the prediction for its noisy target only, as latents of the target's shape."""
    out_channels = output.shape[-1] // batch.patch_size ** 2
    return [unpatchify(output[a:b], (*shape[:-3], out_channels, *shape[-2:]), batch.patch_size)
            for (a, b), shape in zip(batch.target_ranges, batch.target_shapes)]


# ----------------------------------------------------------------------------------------------------
# Positions and timesteps
# ----------------------------------------------------------------------------------------------------

class RotaryPositions(nn.Module):
    """Qwen-Image's 3-axis RoPE: cos and sin per token from integer (frame, height, width) positions.

    Computed from the positions directly rather than from diffusers' 4096-row table; the angles are the
    same float32 products, and positions past 4096 just work. No parameters or buffers.
    """

    def __init__(self, axes_dim: Sequence[int], theta: float = ROPE_THETA, scale: float = 1.0):
        super().__init__()
        self.axes_dim = list(axes_dim)
        self.theta = theta
        self.scale = scale  # positions are multiplied by it: > 1 separates neighbouring tokens more

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = []
        for axis, dim in enumerate(self.axes_dim):
            inv_freq = 1.0 / torch.pow(self.theta, torch.arange(0, dim, 2, device=positions.device,
                                                                dtype=torch.float32).div(dim))
            pos = positions[:, axis, None].float()
            if self.scale != 1.0:
                pos = pos * self.scale
            angles.append(pos * inv_freq)  # (L, dim/2)
        angles = torch.cat(angles, dim=-1)  # (L, head_dim/2)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent pairs of x (L, H, D) by the per-token angles, in float32 like diffusers."""
    cos, sin = (r[:, None, :] for r in rope)  # (L, 1, D/2)
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (L, H, D/2) each
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class TimestepConditioning(nn.Module):
    """Timestep (and optional extra class) -> conditioning vector; named as diffusers' time_text_embed."""

    def __init__(self, dim: int, use_additional_t_cond: bool = False):
        super().__init__()
        self.time_proj = Timesteps(num_channels=TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0,
                                   scale=1000)
        self.timestep_embedder = TimestepEmbedding(in_channels=TIMESTEP_CHANNELS, time_embed_dim=dim)
        self.use_additional_t_cond = use_additional_t_cond
        if use_additional_t_cond:
            self.addition_t_embedding = nn.Embedding(2, dim)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype,
                additional_t_cond: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.timestep_embedder(self.time_proj(timesteps).to(dtype))  # (K, D)
        if self.use_additional_t_cond:
            cond = cond + self.addition_t_embedding(additional_t_cond).to(dtype)
        return cond


class OutputNorm(nn.Module):
    """LayerNorm with per-token scale and shift from the conditioning (diffusers' AdaLayerNormContinuous)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(cond).to(x.dtype))[rows].chunk(2, dim=-1)  # (N, D) each
        return self.norm(x) * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class JointContext:
    """What every block needs besides the activations: built once per forward, shared by all layers."""

    image_rows: torch.Tensor  # (N_img,) row of the conditioning table for each image token
    text_rows: torch.Tensor  # (N_txt,) row for each text token (its sample's noisy timestep)
    packed_order: torch.Tensor  # (L,)
    text_slots: torch.Tensor  # (N_txt,)
    image_slots: torch.Tensor  # (N_img,)
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L, head_dim/2) each
    attention: PackedAttention = field(repr=False)


class JointAttention(nn.Module):
    """Both streams' q, k, v in their own projections, then one attention over the packed row."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps=eps), RMSNorm(head_dim, eps=eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps=eps), RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, ctx: JointContext) -> tuple[torch.Tensor, torch.Tensor]:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, self.head_dim))  # (N, H, Dh)

        def packed(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, i])[ctx.packed_order]  # (L, H, Dh) in packed order

        q = packed(self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img))))
        k = packed(self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img))))
        v = packed(heads(self.add_v_proj(txt)), heads(self.to_v(img)))
        q, k = apply_rotary(q, ctx.rope), apply_rotary(k, ctx.rope)

        out = ctx.attention(*(x.transpose(0, 1)[None] for x in (q, k, v)))  # (1, H, L, Dh)
        out = out[0].transpose(0, 1).flatten(1).to(q.dtype)  # (L, H * Dh)
        img_out = self.to_out[1](self.to_out[0](out[ctx.image_slots]))  # (N_img, D)
        txt_out = self.to_add_out(out[ctx.text_slots])  # (N_txt, D)
        return img_out, txt_out


class GeneratorBlock(nn.Module):
    """A double-stream block: per-stream modulation, norms and MLPs around one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = JointAttention(dim, heads, head_dim, eps=eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, img: torch.Tensor, txt: torch.Tensor, cond: torch.Tensor,
                ctx: JointContext) -> tuple[torch.Tensor, torch.Tensor]:
        # modulation on the small table, then gathered per token: (N, D) each
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = \
            self.img_mod(cond)[ctx.image_rows].chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = \
            self.txt_mod(cond)[ctx.text_rows].chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(self.img_norm1(img) * (1 + img_scale1) + img_shift1,
                                       self.txt_norm1(txt) * (1 + txt_scale1) + txt_shift1, ctx)
        img = img + img_gate1 * img_attn
        txt = txt + txt_gate1 * txt_attn

        img = img + img_gate2 * self.img_mlp(self.img_norm2(img) * (1 + img_scale2) + img_shift2)
        txt = txt + txt_gate2 * self.txt_mlp(self.txt_norm2(txt) * (1 + txt_scale2) + txt_shift2)
        if img.dtype == torch.float16:  # as diffusers: keep fp16 activations finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

def init_position_attention(model: "PackedQwenImageTransformer", magnitude: float) -> None:
    """Give every image query and key of every head one shared bias along the height and width RoPE dims,
    `magnitude` per component (the rest of the projection starts as usual, about 0.6 per component).

    q.k of two tokens then starts as a sum of cos(angle * offset) over those dims: largest where the height
    and width offsets are 0, so from the first step each image token attends to the tokens at its own
    (h, w): itself, and the same place in each source image (the frame dims carry no bias). That is the
    route a copy needs; a random tiny generator otherwise spends most of a CPU budget finding it. The text
    stream's projections are left alone. An initialisation only: the weights carry it, and training is free
    to move it.
    """
    cfg = model.config
    frame_dims = cfg.axes_dims_rope[0]
    with torch.no_grad():
        for block in model.transformer_blocks:
            attn = block.attn
            shared = torch.zeros(cfg.num_attention_heads, cfg.attention_head_dim)
            # random signs, the same for q and k: each pair of dims adds 2 * magnitude^2 * cos(angle * offset)
            signs = torch.randint(0, 2, (cfg.num_attention_heads, (cfg.attention_head_dim - frame_dims) // 2, 2))
            shared[:, frame_dims:] = (signs.float() * 2 - 1).flatten(1) * magnitude
            for proj in (attn.to_q, attn.to_k):
                proj.bias.copy_(shared.flatten().to(proj.bias))


def own_place_attention(model: "PackedQwenImageTransformer", size: int = 8, text_tokens: int = 8,
                        seed: int = 0) -> float:
    """The mean share of its image attention (first block) that each target token of one random edit sample
    (a `size` x `size` latent target and source, `text_tokens` text states) puts on the tokens at its own
    (h, w): itself and the same place in the source. What `qk_position_init` sets at the start."""
    c, rng = model.config, torch.Generator().manual_seed(seed)
    sample = GeneratorSample(text_states=torch.randn(text_tokens, c.joint_attention_dim, generator=rng),
                             target=torch.randn(c.out_channels, size, size, generator=rng),
                             sources=[torch.randn(c.out_channels, size, size, generator=rng)], timestep=0.5)
    batch, attn, seen = model.pack([sample], sources_at_t0=True), model.transformer_blocks[0].attn, {}
    hook = attn.register_forward_hook(lambda mod, args, out: seen.update(img=args[0]))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        hook.remove()
    shape = (c.num_attention_heads, c.attention_head_dim)
    with torch.no_grad():
        rope = model.pos_embed(batch.positions[text_tokens:])  # the row: text, the target's tokens, the source's
        q = apply_rotary(attn.norm_q(attn.to_q(seen["img"]).unflatten(-1, shape)), rope)
        k = apply_rotary(attn.norm_k(attn.to_k(seen["img"]).unflatten(-1, shape)), rope)
        weights = (torch.einsum("ihd,jhd->hij", q, k) / c.attention_head_dim ** 0.5).softmax(-1)
    hw = batch.positions[text_tokens:, 1:]
    own = (hw[:, None] == hw[None]).all(-1).float()
    targets = (size // c.patch_size) ** 2
    return float((weights * own).sum(-1)[:, :targets].mean())


class PackedQwenImageTransformer(ModelMixin, ConfigMixin):
    """The generator MMDiT: diffusers' QwenImageTransformer2DModel, run over packed rows.

    Config fields, parameter names and shapes are diffusers'; `guidance_embeds` has no weights there
    either and is kept for the config only. With `zero_cond_t` the clean source tokens are modulated
    with t = 0 (and the text stream and output norm with the target's t), exactly as diffusers does.
    Three fields are ours, for models trained from scratch, and their defaults are diffusers' behaviour:
    `rope_theta` and `rope_scale` (RoPE base and a position multiplier: small grids need angles that tell
    neighbouring tokens apart), `qk_norm_init` (the initial q/k RMSNorm gain, i.e. attention sharpness) and
    `qk_position_init` (a locality prior for copying: see `init_position_attention`).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["GeneratorBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        rope_theta: float = ROPE_THETA,
        rope_scale: float = 1.0,
        qk_norm_init: float = 1.0,
        qk_position_init: float = 0.0,
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim or any(d % 2 for d in axes_dims_rope):
            raise ValueError(f"axes_dims_rope={list(axes_dims_rope)} must be even and sum to "
                             f"attention_head_dim={attention_head_dim}")
        if guidance_embeds:
            log.info("guidance_embeds=True has no weights or effect in this architecture (as in diffusers)")
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        # runtime choices, not part of the weights' config
        self.attention_backend = "auto"
        self.compile_flex = True
        self.gradient_checkpointing = False

        self.pos_embed = RotaryPositions(axes_dims_rope, theta=rope_theta, scale=rope_scale)
        self.time_text_embed = TimestepConditioning(self.inner_dim, use_additional_t_cond)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [GeneratorBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)])
        self.norm_out = OutputNorm(self.inner_dim)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        if qk_norm_init != 1.0:  # the q/k RMSNorm gains set the initial attention logit scale
            with torch.no_grad():
                for block in self.transformer_blocks:
                    attn = block.attn
                    for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k):
                        norm.weight.fill_(qk_norm_init)
        if qk_position_init:
            init_position_attention(self, qk_position_init)

    def pack(self, samples: Sequence[GeneratorSample], *, sources_at_t0: bool = False) -> PackedGeneratorBatch:
        """`pack_generator_samples` with this model's patch size and RoPE kind."""
        return pack_generator_samples(samples, self.config.patch_size, sources_at_t0=sources_at_t0,
                                      layer3d_rope=self.config.use_layer3d_rope)

    def forward(self, batch: PackedGeneratorBatch, attention_backend: str | None = None) -> torch.Tensor:
        """(N_img, patch_size**2 * out_channels) velocity prediction for every image token of the batch.

        attention_backend: "auto" | "sdpa" | "flex" | "flash"; default `self.attention_backend`.
        """
        self._check_batch(batch)
        cfg, n = self.config, batch.num_samples

        # the two streams in: image patches and text states to the model width
        img = self.img_in(batch.image_tokens.to(self.dtype))  # (N_img, D)
        txt = self.txt_in(self.txt_norm(batch.text_states.to(self.dtype)))  # (N_txt, D)

        # conditioning table: row s = sample s's noisy timestep, row n + s = its clean sources'
        source_t = torch.zeros_like(batch.source_timesteps) if cfg.zero_cond_t else batch.source_timesteps
        timesteps = torch.cat([batch.timesteps, source_t]).to(img.dtype)  # (2n,)
        extra = batch.additional_t_cond.repeat(2) if cfg.use_additional_t_cond else None
        cond = self.time_text_embed(timesteps, img.dtype, extra)  # (2n, D)

        # one mask and one set of RoPE angles for every layer
        backend = attention_backend or self.attention_backend
        ctx = JointContext(
            image_rows=batch.image_sample + n * batch.image_is_source.long(),
            text_rows=batch.text_sample,
            packed_order=batch.packed_order,
            text_slots=batch.text_slots,
            image_slots=batch.image_slots,
            rope=self.pos_embed(batch.positions),
            attention=PackedAttention(batch.layout, backend=backend, compile_flex=self.compile_flex),
        )

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                img, txt = self._gradient_checkpointing_func(block, img, txt, cond, ctx)
            else:
                img, txt = block(img, txt, cond, ctx)  # (N_img, D), (N_txt, D)

        img = self.norm_out(img, cond, batch.image_sample)  # output norm from the noisy timestep
        return self.proj_out(img)  # (N_img, p * p * out_channels)

    def _check_batch(self, batch: PackedGeneratorBatch) -> None:
        cfg = self.config
        if batch.patch_size != cfg.patch_size:
            raise ValueError(f"batch packed with patch_size={batch.patch_size}, model has patch_size={cfg.patch_size}")
        if batch.layer3d_rope != cfg.use_layer3d_rope:
            raise ValueError(f"batch packed with layer3d_rope={batch.layer3d_rope}, model has "
                             f"use_layer3d_rope={cfg.use_layer3d_rope}: pack with model.pack(samples)")
        if batch.image_tokens.shape[-1] != cfg.in_channels:
            raise ValueError(f"image tokens have {batch.image_tokens.shape[-1]} channels, model in_channels="
                             f"{cfg.in_channels} (latent channels * patch_size**2)")
        if batch.text_states.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"text states have width {batch.text_states.shape[-1]}, model joint_attention_dim="
                             f"{cfg.joint_attention_dim}")
        if cfg.use_additional_t_cond and batch.additional_t_cond is None:
            raise ValueError("this model has use_additional_t_cond: set GeneratorSample.additional_t_cond (0 or 1)")


__all__ = [
    "FROM_SCRATCH_FIELDS", "GeneratorBlock", "GeneratorSample", "JointAttention", "PackedGeneratorBatch",
    "PackedQwenImageTransformer", "ROPE_THETA", "RotaryPositions", "TimestepConditioning", "apply_rotary",
    "init_position_attention", "own_place_attention",
    "pack_generator_samples", "patchify", "target_predictions", "unpatchify",
]
