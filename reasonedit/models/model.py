"""ReasonEditModel: the Qwen2.5-VL reasoner, the packed MMDiT generator and the VAE as one object.

The reasoner's last-layer states over the condition prompt (system prefix dropped) are the
generator's text stream. `save_pretrained(dir)` writes one folder:

    dir/reasonedit.json   {"format": "reasonedit", "version": 1, "model": <ModelConfig>, "components": [...]}
    dir/reasoner/         Qwen2.5-VL in Hugging Face format, tokenizer, preprocessor_config.json
    dir/reasoner/lora/    the LoRA adapter in peft format, when there is one
    dir/generator/        the MMDiT in diffusers format (config.json, diffusion_pytorch_model.safetensors)
    dir/vae/              diffusers AutoencoderKLQwenImage, or patch_codec.json for the patch codec

`from_pretrained(dir, components=...)` loads any subset (stage 1 never loads the generator), and
`from_diffusers(dir)` loads a local diffusers Qwen-Image-Edit folder (text_encoder, tokenizer,
transformer, vae).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from reasonedit.publish import staged_folder

from reasonedit.config.model import ModelConfig
from .generator import GeneratorSample, PackedQwenImageTransformer
from .generator_weights import load_diffusers_transformer
from .image_policy import ImagePolicy, policy_for
from .prompts import template_for
from .reasoner import Reasoner
from .vae import PatchCodec, QwenImageVAE, encode_image, load_codec, to_uint8

log = logging.getLogger(__name__)

CONFIG_FILE = "reasonedit.json"
FORMAT_VERSION = 1
COMPONENTS = ("reasoner", "generator", "vae")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _config_dict(config: ModelConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))


def _config_from_dict(data: dict, where: str) -> ModelConfig:
    from omegaconf.errors import OmegaConfBaseException
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), data))
    except OmegaConfBaseException as e:
        raise ValueError(f"{where}: 'model': {str(e).splitlines()[0]} (key {getattr(e, 'full_key', '?')})") from None
    return cfg


def build_generator(config: ModelConfig, seed: int = 0) -> PackedQwenImageTransformer:
    """A random generator of the configured size."""
    g = config.generator
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PackedQwenImageTransformer(
            patch_size=g.patch_size, in_channels=g.in_channels, out_channels=g.out_channels,
            num_layers=g.num_layers, attention_head_dim=g.attention_head_dim,
            num_attention_heads=g.num_attention_heads, joint_attention_dim=g.joint_attention_dim,
            axes_dims_rope=tuple(g.axes_dims_rope), zero_cond_t=g.zero_cond_t, rope_theta=g.rope_theta,
            rope_scale=g.rope_scale, qk_norm_init=g.qk_norm_init,
            qk_position_init=g.qk_position_init)
    return model


def build_codec(config: ModelConfig, seed: int = 0) -> PatchCodec | QwenImageVAE:
    """The patch codec; a qwen_image VAE from model.vae.path; or, for source=tiny without a path, a random
    qwen_image VAE of the configured geometry (the `vae` step trains it)."""
    v = config.vae
    if v.kind == "patch":
        return PatchCodec(v.patch_size)
    if v.path is None:
        if config.source == "tiny":
            return QwenImageVAE.random(z_dim=v.latent_channels, base_dim=v.base_dim, dim_mult=tuple(v.dim_mult),
                                       num_res_blocks=v.num_res_blocks,
                                       temperal_downsample=tuple(v.temperal_downsample), seed=seed)
        raise ValueError("model.vae.path: the qwen_image VAE loads from a local folder; set model.vae.path=DIR")
    return QwenImageVAE.from_pretrained(v.path)


def _marks(part: torch.nn.Module) -> tuple:
    """Where each parameter's storage is and how often it was written in place: a part trained, loaded into,
    cast or moved since these were taken has other marks."""
    return tuple((p.data_ptr(), p._version) for p in part.parameters())


def _load_saved_part(path: Path, component: str, dtype: torch.dtype | None, lora_trainable: bool = False):
    """One part of a folder written by save_pretrained."""
    if component == "reasoner":
        return Reasoner.from_pretrained(path / "reasoner", dtype=dtype, lora_trainable=lora_trainable)
    if component == "generator":
        return PackedQwenImageTransformer.from_pretrained(path / "generator", local_files_only=True,
                                                          **({"torch_dtype": dtype} if dtype else {})).eval()
    return load_codec(path / "vae")


def _load_referenced_part(component: str, ref: dict, dtype: torch.dtype | None, lora_trainable: bool = False):
    """One part from the folder a reference names (see `ReasonEditModel.references`): a diffusers folder's part, or
    (`saved`) the part as another model folder saved it."""
    if "saved" in ref:
        return _load_saved_part(Path(ref["saved"]).parent, component, dtype, lora_trainable)
    if component == "reasoner":
        return _load_referenced_reasoner(ref, dtype)
    if component == "generator":
        return load_diffusers_transformer(ref["folder"], torch_dtype=dtype).eval()
    return QwenImageVAE.from_pretrained(ref["folder"], **({"torch_dtype": dtype} if dtype else {}))


def _load_referenced_reasoner(ref: dict, dtype: torch.dtype | None) -> Reasoner:
    """Qwen2.5-VL from a text encoder folder and a tokenizer folder (a diffusers folder's text_encoder and
    tokenizer, or one transformers folder), with the decision tokens added (deterministically: their rows
    start as the mean of the existing ones, so every load gives the same weights)."""
    from transformers import AutoTokenizer

    from .processor import ReasonerProcessor, build_image_processor
    from .tiny import load_qwen_strict
    text_encoder = load_qwen_strict(ref["model"], **({"dtype": dtype} if dtype is not None else {}))
    tokenizer = AutoTokenizer.from_pretrained(ref["tokenizer"], local_files_only=True)
    vision = text_encoder.config.vision_config
    image_processor = build_image_processor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                            temporal_patch_size=vision.temporal_patch_size)
    reasoner = Reasoner(text_encoder, ReasonerProcessor(tokenizer, image_processor))
    reasoner.add_decision_tokens()
    return reasoner


def diffusers_references(parts) -> dict[str, dict]:
    """Where each component's weights are in a read diffusers folder (`diffusers_folder.read_folder`)."""
    return {"reasoner": {"model": str(parts.text_encoder.resolve()), "tokenizer": str(parts.tokenizer.resolve())},
            "generator": {"folder": str(parts.transformer.resolve())},
            "vae": {"folder": str(parts.vae.resolve())}}


def save_reference(path: str | os.PathLike, parts, config: ModelConfig) -> Path:
    """A model folder that holds no weights, only where they are (a diffusers folder's parts): what a run that
    starts from real weights trains from, without copying tens of gigabytes. It loads like any model folder."""
    with staged_folder(path) as staging:
        meta = {"format": "reasonedit", "version": FORMAT_VERSION, "model": _config_dict(config),
                "components": list(COMPONENTS), "references": diffusers_references(parts)}
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


class ReasonEditModel(torch.nn.Module):
    """Reasoner + generator + VAE. Any of generator and VAE may be absent (stage 1 needs neither)."""

    def __init__(self, reasoner: Reasoner, generator: PackedQwenImageTransformer | None = None,
                 vae: PatchCodec | QwenImageVAE | None = None, config: ModelConfig | None = None):
        super().__init__()
        self.reasoner = reasoner  # a module: .to() / .parameters() reach it
        self.generator = generator
        self.vae = vae
        self.config = config or ModelConfig()
        reasoner.condition_template = template_for(self.config.pipeline)  # the prompt the weights were trained on
        # component -> the folders its weights are read from, while no training has changed them (a start model
        # from a diffusers folder; a component not loaded keeps its reference); save_pretrained writes these as
        # references instead of copying the weights
        self.references: dict[str, dict] = {}
        self._reference_marks: dict[str, tuple] = {}  # each referenced part's `_marks` when it was loaded
        if generator is not None:
            joint = generator.config.joint_attention_dim
            if joint != reasoner.hidden_size:
                raise ValueError(f"generator.joint_attention_dim={joint} does not match the reasoner's "
                                 f"hidden_size={reasoner.hidden_size}: the reasoner's states are the text stream")
            generator.attention_backend = self.config.attention_backend
        if generator is not None and vae is not None:
            latent = vae.latent_channels
            if generator.config.out_channels != latent:
                raise ValueError(f"generator.out_channels={generator.config.out_channels} does not match the "
                                 f"VAE's {latent} latent channels")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, config: ModelConfig, texts: Iterable[str], seed: int = 0,
             components: Sequence[str] = COMPONENTS) -> "ReasonEditModel":
        """Random models of the configured (tiny) sizes; the tokenizer is learned from `texts`."""
        config.validate()
        r = config.reasoner
        reasoner = Reasoner.tiny(texts, vocab_size=r.vocab_size, seed=seed, hidden_size=r.hidden_size,
                                 num_layers=r.num_layers, num_heads=r.num_heads, num_kv_heads=r.num_kv_heads,
                                 intermediate_size=r.intermediate_size, vision_depth=r.vision_depth,
                                 vision_hidden_size=r.vision_hidden_size, vision_heads=r.vision_heads,
                                 vision_intermediate_size=r.vision_intermediate_size,
                                 initializer_range=r.initializer_range, rope_theta=r.rope_theta,
                                 mrope_section=r.mrope_section, min_pixels=r.image_min_pixels,
                                 max_pixels=r.image_max_pixels)
        generator = build_generator(config, seed) if "generator" in components else None
        vae = build_codec(config, seed) if "vae" in components else None
        return cls(reasoner, generator, vae, config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, components: Sequence[str] = COMPONENTS,
                        dtype: torch.dtype | None = None, lora_trainable: bool = False) -> "ReasonEditModel":
        path = Path(path)
        meta_file = path / CONFIG_FILE
        if not meta_file.is_file():
            from .diffusers_folder import is_diffusers_folder
            if is_diffusers_folder(path):  # a diffusers Qwen-Image-Edit folder starts a run as it is
                return cls.from_diffusers(path, dtype, components=components)
            raise FileNotFoundError(f"{meta_file} not found: {path} is not a folder written by "
                                    "ReasonEditModel.save_pretrained (nor a diffusers folder with model_index.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != "reasonedit" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                             f"this code reads reasonedit version {FORMAT_VERSION}")
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
        config = _config_from_dict(meta.get("model", {}), str(meta_file))
        saved = meta.get("components", [])
        missing = [c for c in components if c != "reasoner" and c not in saved]
        if missing:
            raise FileNotFoundError(f"{path} was saved without {missing}; load components={saved}")
        wanted = ["reasoner"] + [c for c in components if c != "reasoner"]
        all_refs = meta.get("references", {})
        refs = {c: r for c, r in all_refs.items() if c in wanted}
        for c in wanted:
            if c not in refs and not (path / c).is_dir():
                raise FileNotFoundError(f"{path / c} is missing: the folder is incomplete")
        ref_dtype = dtype
        if refs:
            from .diffusers_folder import check_references, torch_dtype
            check_references(refs, meta_file)
            ref_dtype = dtype if dtype is not None else torch_dtype(config.dtype)

        def part(c: str):
            if c not in wanted:
                return None
            if c in refs:
                return _load_referenced_part(c, refs[c], dtype if "saved" in refs[c] else ref_dtype, lora_trainable)
            return _load_saved_part(path, c, dtype, lora_trainable)

        reasoner, generator, vae = part("reasoner"), part("generator"), part("vae")
        model = cls(reasoner, generator, vae, config)
        model.references = dict(all_refs)  # the parts not loaded keep theirs: saving writes them back
        model._mark_references()
        return model

    @classmethod
    def from_diffusers(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, *,
                       reasoner_path: str | os.PathLike | None = None,
                       generator_path: str | os.PathLike | None = None,
                       components: Sequence[str] = COMPONENTS) -> "ReasonEditModel":
        """Load a local diffusers Qwen-Image-Edit folder (text_encoder + tokenizer, transformer, vae; the
        scheduler's sigma schedule), with `reasoner_path` / `generator_path` in place of its parts. The model
        remembers where each part came from (`references`): saving it writes a reference for a part no training
        changed instead of a copy of its weights."""
        from .diffusers_folder import folder_config, read_folder

        parts = read_folder(path, reasoner_path, generator_path)
        name = {v: k for k, v in DTYPES.items()}.get(dtype) if dtype is not None else None
        return cls._from_references(folder_config(parts, dtype=name), diffusers_references(parts), dtype,
                                    load=("reasoner", *components))

    @classmethod
    def _from_references(cls, config: ModelConfig, refs: dict, dtype: torch.dtype | None,
                         load: Sequence[str] = COMPONENTS) -> "ReasonEditModel":
        """The parts of `load` named in `refs` ({component: where its weights are}), loaded from those folders;
        the model keeps every reference (a part not loaded is saved as its reference)."""
        parts = {c: _load_referenced_part(c, refs[c], dtype) if c in refs and c in load else None for c in COMPONENTS}
        model = cls(parts["reasoner"], parts["generator"], parts["vae"], config)
        model.references = dict(refs)
        model._mark_references()
        return model

    def _mark_references(self) -> None:
        self._reference_marks = {c: _marks(getattr(self, c)) for c in self.references if getattr(self, c) is not None}

    # -- save -----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the whole model folder; it appears under `path` only once complete. A part in `references`
        (loaded from a diffusers folder and not changed since) is written as a reference to that folder."""
        for c, marks in list(self._reference_marks.items()):  # a part written to since it was loaded is saved in full
            part = getattr(self, c)
            if part is not None and c in self.references and _marks(part) != marks:
                log.info("%s: changed since it was loaded from %s; saved in full", c, self.references[c])
                self.changed(c)
        refs = dict(self.references)  # loaded and unchanged, or not loaded at all (stage 1's generator and VAE)
        with staged_folder(path) as staging:
            components = []
            for name in COMPONENTS:
                part = getattr(self, name)
                if part is None and name not in refs:
                    continue
                components.append(name)
                if name not in refs:
                    part.save_pretrained(staging / name)
            meta = {"format": "reasonedit", "version": FORMAT_VERSION, "model": _config_dict(self.config),
                    "components": components}
            if refs:
                meta["references"] = refs
            (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return Path(path)

    def changed(self, component: str) -> None:
        """Say that `component`'s weights now differ from where they were loaded: it is saved in full. (A part
        written to in place, moved or cast is found by itself; this is for changes that leave no trace.)"""
        self.references.pop(component, None)
        self._reference_marks.pop(component, None)

    @property
    def image_policy(self) -> ImagePolicy:
        """How big the images are that the reasoner and the VAE see, and the edit (`model.images`)."""
        return policy_for(self.config)

    @property
    def grid(self) -> int:
        """Pixels per generator token side: the VAE's downsampling times the patch size."""
        self.require("generator")
        self.require("vae")
        return int(self.vae.downsample) * int(self.generator.config.patch_size)

    # -- the model's two jobs: condition states and latents ------------------------------------
    def encode_condition(self, images: Sequence, instructions: Sequence[str], packed: bool = True) -> list[torch.Tensor]:
        """The generator's text stream for each (source image(s), instruction): (T_i, hidden) tensors."""
        return self.reasoner.condition_states(images, instructions, packed=packed,
                                              backend=self.config.attention_backend)

    def encode_images(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """uint8 (H, W, 3) images -> one float32 (C, h, w) latent each on the VAE's device (sizes may differ)."""
        self.require("vae")
        return [encode_image(self.vae, np.asarray(image), to_cpu=False) for image in images]

    def decode_latents(self, latents: Sequence[torch.Tensor]) -> list[np.ndarray]:
        self.require("vae")
        return [to_uint8(self.vae.decode(z[None].to(self._vae_device()).float()))[0].cpu().numpy() for z in latents]

    def predict(self, samples: Sequence[GeneratorSample], sources_at_t0: bool = False) -> list[torch.Tensor]:
        """The generator's prediction (the flow velocity) for each sample's noisy target, packed in one row."""
        from .generator import target_predictions
        self.require("generator")
        batch = self.generator.pack(samples, sources_at_t0=sources_at_t0)
        device = next(self.generator.parameters()).device
        batch = batch.to(device)
        return target_predictions(batch, self.generator(batch))

    def require(self, component: str) -> None:
        """Fail with a clear message when the model was loaded without `component`."""
        if getattr(self, component) is None:
            raise ValueError(f"this ReasonEditModel was loaded without its {component}; "
                             f"load it with components including {component!r}")

    def _vae_device(self) -> torch.device:
        params = list(self.vae.parameters())
        return params[0].device if params else torch.device("cpu")


__all__ = ["COMPONENTS", "CONFIG_FILE", "ReasonEditModel", "build_codec", "build_generator", "diffusers_references",
           "save_reference"]
