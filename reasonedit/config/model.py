"""Model settings: the reasoner, the generator and the VAE (the `model` section of a config).

`configs/model/tiny.yaml` builds random models that run on a CPU in seconds;
`configs/model/qwen-image-edit.yaml` names the real sizes and loads weights from a local folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

SOURCES = ("tiny", "diffusers")
VAE_KINDS = ("patch", "qwen_image")
DTYPES = ("float32", "bfloat16", "float16")
RUN_DTYPES = ("auto", *DTYPES)  # what a model runs in at inference; auto: bfloat16 on CUDA, as saved elsewhere
ATTENTION_BACKENDS = ("auto", "flex", "sdpa", "flash")  # as reasonedit.models.attention.BACKENDS
# the diffusers pipeline classes this code reads, and the image policy each implies (`images.policy: auto`)
PIPELINE_POLICIES = {"QwenImageEditPipeline": "qwen-image-edit", "QwenImageEditPlusPipeline": "qwen-image-edit-plus"}
IMAGE_POLICIES = ("auto", "native", *PIPELINE_POLICIES.values())


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # the language model's attention projections only; the vision tower is never adapted
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ReasonerConfig:
    """Qwen2.5-VL. For source=tiny the sizes below build it; otherwise they must match the weights."""

    path: Optional[str] = None  # a local Hugging Face folder; overrides model.path/text_encoder
    vocab_size: int = 1024  # tiny: the byte-level BPE vocabulary learned; real weights: their embedding rows (planning)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    # source=tiny: the image processor's pixel bounds (saved in reasoner/preprocessor_config.json); the defaults
    # are Qwen2.5-VL's released ones. A small world raises min_pixels so each grid cell is one merged 28-px LM
    # token: 64-px renders of a 4x4 grid need 112 x 112 = 12544 (4x4 tokens)
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 16384
    # source=tiny: the std of the random initial weights. Qwen's 0.02 suits its 3584-wide layers; a 64-wide
    # tiny reasoner learns to read single image tokens many times faster from about 1 / sqrt(hidden_size)
    initializer_range: float = 0.02
    # source=tiny: the language model's 3-axis RoPE, saved in its config. Qwen2.5-VL's base 1e6 with its split of
    # the head's frequencies (t 1/4, h 3/8, w 3/8, each axis taking the next slower ones) turns a 32-dim head by
    # about 1e-4 rad from one image column to the next; a tiny reasoner that must tell cells apart needs a low
    # base and enough frequencies on h and w. None: Qwen's proportions of head_dim / 2
    rope_theta: float = 1_000_000.0
    mrope_section: Optional[tuple[int, int, int]] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class GeneratorConfig:
    """The MMDiT, with the names and meaning of diffusers' QwenImageTransformer2DModel config."""

    path: Optional[str] = None  # a diffusers transformer folder; overrides model.path/transformer
    patch_size: int = 2
    in_channels: int = 768  # latent channels * patch_size**2: latents enter as 2x2 patches
    out_channels: int = 192  # latent channels
    num_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    joint_attention_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    # diffusers' flag (Qwen-Image-Edit-2511): clean source tokens are modulated with t = 0, in training and sampling
    zero_cond_t: bool = False
    # ours, for generators trained from scratch; the defaults are diffusers' behaviour (real weights keep them)
    rope_theta: float = 10000.0  # RoPE base
    rope_scale: float = 1.0  # RoPE positions are multiplied by this: > 1 separates neighbouring tokens more
    qk_norm_init: float = 1.0  # initial gain of the q/k RMSNorms (the initial attention logit scale)
    # > 0: image queries and keys start with a shared bias along the height/width RoPE dims, so each image token
    # attends to its own (h, w) in every image from the first step (the route a copy needs); 0: diffusers' init
    qk_position_init: float = 0.0


@dataclass
class VAEConfig:
    """The latent codec. qwen_image with model.source=tiny and no path builds a random AutoencoderKLQwenImage of
    the sizes below (the `vae` step of `reasonedit run` trains it on world renders); with a path it loads one."""

    kind: str = "patch"  # patch: parameter-free codec for the shapes world; qwen_image: the real VAE
    path: Optional[str] = None
    patch_size: int = 8  # patch codec: pixels per latent side (3 * 8 * 8 = 192 latent channels)
    latent_channels: int = 192  # qwen_image: diffusers' z_dim (16 in Qwen-Image)
    # qwen_image built for source=tiny, with diffusers' AutoencoderKLQwenImage names; one spatial 2x per entry of
    # temperal_downsample (3 entries: 8x, as Qwen-Image), and len(dim_mult) == len(temperal_downsample) + 1
    base_dim: int = 8  # 668k parameters: the smallest measured to read the demo world back (issue 11)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    temperal_downsample: tuple[bool, ...] = (False, True, True)


@dataclass
class ScheduleConfig:
    """The sampler's sigma schedule. The defaults are Qwen-Image's scheduler config; a diffusers folder's
    scheduler/scheduler_config.json sets them (use_dynamic_shifting, base/max shift and image sequence lengths,
    shift, shift_terminal)."""

    shift: str = "resolution"  # resolution: mu from the token count; fixed: mu = fixed_mu for every size
    fixed_mu: float = math.log(3.0)  # e^mu = 3: SD3-style shift 3
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_tokens: int = 256
    max_tokens: int = 8192
    shift_terminal: Optional[float] = 0.02  # Qwen-Image's scheduler ends its schedule at 0.02; None: no stretch

    def validate(self, name: str = "sampler") -> None:
        if self.shift not in ("resolution", "fixed"):
            raise ValueError(f"{name}.shift: {self.shift!r}; choose 'resolution' or 'fixed'")
        if self.shift_terminal is not None and not 0.0 < self.shift_terminal < 1.0:
            raise ValueError(f"{name}.shift_terminal: must be in (0, 1) or None, got {self.shift_terminal}")
        if self.max_tokens <= self.base_tokens:
            raise ValueError(f"{name}.max_tokens: must exceed base_tokens, got {self.base_tokens}..{self.max_tokens}")


@dataclass
class ImagesConfig:
    """How big the images are that the reasoner and the VAE see, and how big an edit is
    (`reasonedit.models.image_policy`); the same in preprocessing, training and inference.

    native: as given (rounded to the latent grid; training buckets them by `buckets.pixel_budget`), and an edit is
    returned at its source's size. qwen-image-edit: the source resized to about `area` pixels (aspect kept, sides
    multiples of 32) for both the reasoner and the VAE, and the edit made at that size, as diffusers'
    QwenImageEditPipeline does. qwen-image-edit-plus (2509 / 2511): each source at about `area` pixels for the VAE
    and `condition_area` for the reasoner, the edit at about `area` pixels in the last source's aspect, as
    QwenImageEditPlusPipeline does. auto: the policy of `model.pipeline`, native without one.
    """

    policy: str = "auto"
    area: Optional[int] = None  # qwen policies: pixels of the VAE images and of the edit; None: 1024 * 1024
    condition_area: Optional[int] = None  # qwen-image-edit-plus: pixels of the reasoner's images; None: 384 * 384

    def resolved(self, pipeline: Optional[str]) -> str:
        """The policy's name, `auto` resolved by the pipeline class."""
        if self.policy != "auto":
            return self.policy
        return PIPELINE_POLICIES.get(pipeline, "native") if pipeline else "native"


@dataclass
class ModelConfig:
    name: str = "tiny"
    source: str = "tiny"  # tiny: build random models; diffusers: load a local Qwen-Image-Edit folder
    path: Optional[str] = None  # the local diffusers folder when source=diffusers
    dtype: str = "float32"
    attention_backend: str = "auto"  # auto: compiled flex on CUDA, SDPA on CPU; or flex | sdpa | flash
    # source=diffusers: the folder's pipeline class (model_index.json), which decides the prompt and image policy
    pipeline: Optional[str] = None
    images: ImagesConfig = field(default_factory=ImagesConfig)
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first field that is wrong."""
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"model.{key}: {why}")

        if self.source not in SOURCES:
            raise bad("source", f"{self.source!r} is not one of {list(SOURCES)}")
        if self.source == "diffusers" and not self.path:
            raise bad("path", "source=diffusers needs the local Qwen-Image-Edit folder: set model.path=DIR")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"{self.dtype!r} is not one of {list(DTYPES)}")
        self.schedule.validate("model.schedule")
        if self.pipeline is not None and self.pipeline not in PIPELINE_POLICIES:
            raise bad("pipeline", f"{self.pipeline!r} is not a pipeline class this code reads; it reads "
                      f"{', '.join(PIPELINE_POLICIES)}")
        im = self.images
        if im.policy not in IMAGE_POLICIES:
            raise bad("images.policy", f"{im.policy!r} is not one of {list(IMAGE_POLICIES)}")
        for key in ("area", "condition_area"):
            value = getattr(im, key)
            if value is not None and value < 32 * 32:
                raise bad(f"images.{key}", f"must be at least 32 * 32 = 1024 pixels (or null), got {value}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise bad("attention_backend", f"{self.attention_backend!r} is not one of {list(ATTENTION_BACKENDS)}")
        if self.vae.kind not in VAE_KINDS:
            raise bad("vae.kind", f"{self.vae.kind!r} is not one of {list(VAE_KINDS)}")
        r, g = self.reasoner, self.generator
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "vision_depth", "vision_hidden_size", "vision_heads", "vision_intermediate_size"):
            if getattr(r, key) <= 0:
                raise bad(f"reasoner.{key}", f"must be positive, got {getattr(r, key)}")
        if r.hidden_size % r.num_heads or r.num_heads % r.num_kv_heads:
            raise bad("reasoner.num_heads", f"hidden_size {r.hidden_size} must split into num_heads "
                      f"{r.num_heads}, which must be a multiple of num_kv_heads {r.num_kv_heads}")
        head = r.hidden_size // r.num_heads
        if head % 2 or head < 6:
            raise bad("reasoner.hidden_size", f"head size {head} must be even and at least 6 so the 3-axis "
                      "RoPE sections fit it")
        if not r.rope_theta > 1:
            raise bad("reasoner.rope_theta", f"must be greater than 1, got {r.rope_theta}")
        if r.mrope_section is not None and (min(r.mrope_section) < 1 or sum(r.mrope_section) != head // 2):
            raise bad("reasoner.mrope_section", f"{list(r.mrope_section)} must be 3 positive counts summing to "
                      f"head size / 2 = {head // 2}")
        if not r.initializer_range > 0:
            raise bad("reasoner.initializer_range", f"must be positive, got {r.initializer_range}")
        if not 0 < r.image_min_pixels <= r.image_max_pixels:
            raise bad("reasoner.image_min_pixels", f"need 0 < image_min_pixels <= image_max_pixels, got "
                      f"{r.image_min_pixels} and {r.image_max_pixels}")
        if r.vision_hidden_size % r.vision_heads:
            raise bad("reasoner.vision_heads", f"vision_hidden_size {r.vision_hidden_size} is not divisible "
                      f"by vision_heads {r.vision_heads}")
        if r.lora.rank <= 0 or not 0.0 <= r.lora.dropout < 1.0:
            raise bad("reasoner.lora", f"rank must be positive and dropout in [0, 1), got {r.lora}")
        if sum(g.axes_dims_rope) != g.attention_head_dim:
            raise bad("generator.axes_dims_rope", f"{list(g.axes_dims_rope)} must sum to "
                      f"attention_head_dim={g.attention_head_dim}")
        if g.joint_attention_dim != r.hidden_size:
            raise bad("generator.joint_attention_dim", f"{g.joint_attention_dim} must equal the reasoner's "
                      f"hidden_size={r.hidden_size}: the reasoner's states are the generator's text stream")
        v = self.vae
        if v.kind == "patch" and v.latent_channels != 3 * v.patch_size ** 2:
            raise bad("vae.latent_channels", f"the patch codec makes 3 * patch_size**2 = {3 * v.patch_size ** 2} "
                      f"channels, not {v.latent_channels}")
        if v.kind == "qwen_image":
            self._validate_qwen_image_vae(bad)
        if g.out_channels != v.latent_channels:
            raise bad("generator.out_channels", f"{g.out_channels} must equal vae.latent_channels={v.latent_channels}")
        if g.in_channels != v.latent_channels * g.patch_size ** 2:
            raise bad("generator.in_channels", f"{g.in_channels} must equal vae.latent_channels * "
                      f"generator.patch_size**2 = {v.latent_channels * g.patch_size ** 2}")
        for key in ("patch_size", "in_channels", "out_channels", "num_layers", "num_attention_heads", "rope_theta",
                    "rope_scale", "qk_norm_init"):
            if getattr(g, key) <= 0:
                raise bad(f"generator.{key}", f"must be positive, got {getattr(g, key)}")
        if g.qk_position_init < 0:
            raise bad("generator.qk_position_init", f"must be 0 (off) or positive, got {g.qk_position_init}")

    def _validate_qwen_image_vae(self, bad) -> None:
        v = self.vae
        for key in ("latent_channels", "base_dim", "num_res_blocks"):
            if getattr(v, key) < 1:
                raise bad(f"vae.{key}", f"must be at least 1, got {getattr(v, key)}")
        if self.source != "tiny" or v.path:
            return  # the sizes come with the weights
        if not v.dim_mult or any(m < 1 for m in v.dim_mult):
            raise bad("vae.dim_mult", f"must be positive multipliers, got {list(v.dim_mult)}")
        if len(v.temperal_downsample) != len(v.dim_mult) - 1:
            raise bad("vae.temperal_downsample", f"needs one entry per downsampling, len(vae.dim_mult) - 1 = "
                      f"{len(v.dim_mult) - 1}, got {list(v.temperal_downsample)}")
        if any(v.base_dim * m % 2 for m in v.dim_mult):
            raise bad("vae.base_dim", f"base_dim * each dim_mult must be even (the decoder's upsamplers halve the "
                      f"channels), got base_dim={v.base_dim}, dim_mult={list(v.dim_mult)}")


__all__ = ["ATTENTION_BACKENDS", "DTYPES", "IMAGE_POLICIES", "ImagesConfig", "PIPELINE_POLICIES", "RUN_DTYPES", "GeneratorConfig", "LoraConfig", "ModelConfig", "ReasonerConfig", "SOURCES", "ScheduleConfig", "VAEConfig",
           "VAE_KINDS"]
