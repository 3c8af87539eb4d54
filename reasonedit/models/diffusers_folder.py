"""A local diffusers Qwen-Image-Edit folder, read and checked before any weight is loaded.

A folder written by diffusers' `save_pretrained` (what the hub's Qwen-Image-Edit, -2509 and -2511 repositories
hold) has `model_index.json`, whose `_class_name` names the pipeline, and one sub-folder per part:

    text_encoder/  Qwen2.5-VL (transformers)        tokenizer/  its tokenizer      processor/  (optional)
    transformer/   QwenImageTransformer2DModel       vae/        AutoencoderKLQwenImage
    scheduler/     FlowMatchEulerDiscreteScheduler (scheduler_config.json: the sigma schedule)

`model.reasoner.path` replaces text_encoder + tokenizer with a transformers Qwen2.5-VL folder (config, weights
and tokenizer in one place, as Qwen2.5-VL-7B-Instruct ships); `model.generator.path` replaces transformer.
`read_folder` finds every part and `folder_config` derives the model's sizes and schedule from the parts'
config files; each error names the folder, the part and what was expected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from reasonedit.config.model import DTYPES, PIPELINE_POLICIES as PIPELINES, ModelConfig

INDEX = "model_index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class ModelFolderError(ValueError):
    """A model folder that cannot be used: names the folder, the part and what was expected."""


class MissingPartError(ModelFolderError, FileNotFoundError):
    """A part (a folder or a file) the model folder should have and has not."""


@dataclass(frozen=True)
class DiffusersFolder:
    """Where each part of a Qwen-Image-Edit model is, after the overrides."""

    path: Path
    pipeline: str  # model_index.json's _class_name
    text_encoder: Path
    tokenizer: Path
    transformer: Path
    vae: Path
    scheduler: Optional[Path]  # None: diffusers' default schedule

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _read_json(path: Path, part: str, folder: Path) -> dict:
    if not path.is_file():
        raise MissingPartError(f"{folder}: part {part} has no {path.name} ({path})")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return doc


def _part(folder: Path, name: str, *, needs: str = "config.json") -> Path:
    path = folder / name
    if not path.is_dir():
        raise MissingPartError(f"{folder}: part {name} is missing (expected the folder {path})")
    if needs and not (path / needs).is_file():
        raise MissingPartError(f"{folder}: part {name} has no {needs} ({path / needs})")
    return path


def _tokenizer_dir(path: Path, part: str, folder: Path) -> Path:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFolderError(f"{folder}: part {part!r} holds no tokenizer (none of {list(TOKENIZER_FILES)} in "
                               f"{path})")
    return path


def _override(key: str, value: str | Path, part: str, expected: str) -> Path:
    """A folder given in place of one of the diffusers folder's parts, with its config.json."""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ModelFolderError(f"{key}: {path} is not a folder (expected {expected})")
    _read_json(path / "config.json", part, path)
    return path


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_folder(path: str | Path, reasoner_path: str | Path | None = None,
                generator_path: str | Path | None = None) -> DiffusersFolder:
    """Every part of the folder at `path` (with the overrides), checked to exist; ModelFolderError otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"model.path: {folder} is not a folder (expected a diffusers Qwen-Image-Edit folder)")
    if not (folder / INDEX).is_file():
        raise MissingPartError(f"{folder}: no {INDEX}, so not a diffusers pipeline folder (expected one written by "
                               "diffusers' save_pretrained, such as Qwen-Image-Edit from the hub)")
    index = _read_json(folder / INDEX, "model_index", folder)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise ModelFolderError(f"{folder / INDEX}: pipeline class {pipeline!r} is not one this code reads; "
                               f"expected one of {sorted(PIPELINES)}")
    if reasoner_path is not None:
        reasoner = _override("model.reasoner.path", reasoner_path, "reasoner",
                             "a transformers Qwen2.5-VL folder: config.json, weights and tokenizer")
        text_encoder, tokenizer = reasoner, _tokenizer_dir(reasoner, "reasoner", reasoner)
    else:
        text_encoder = _part(folder, "text_encoder")
        tokenizer = _tokenizer_dir(_part(folder, "tokenizer", needs=""), "tokenizer", folder)
    transformer = (_override("model.generator.path", generator_path, "generator",
                             "a diffusers QwenImageTransformer2DModel folder")
                   if generator_path is not None else _part(folder, "transformer"))
    vae = _part(folder, "vae")
    scheduler = folder / "scheduler"
    scheduler = scheduler if (scheduler / "scheduler_config.json").is_file() else None
    return DiffusersFolder(folder, pipeline, text_encoder, tokenizer, transformer, vae, scheduler)


def _text_settings(config: dict) -> dict:
    """Qwen2.5-VL's language-model settings: under text_config (transformers 5) or at the top (4.x files)."""
    text = config.get("text_config") or {}
    return {k: text.get(k, config.get(k)) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "intermediate_size", "vocab_size")}


def folder_config(parts: DiffusersFolder, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of the folder's parts, read from their config files (nothing is loaded), with the parts
    checked against each other: the generator reads the reasoner's states and the VAE's latents."""
    te = _read_json(parts.text_encoder / "config.json", "text_encoder", parts.path)
    tr = _read_json(parts.transformer / "config.json", "transformer", parts.path)
    va = _read_json(parts.vae / "config.json", "vae", parts.path)
    text, vision = _text_settings(te), te.get("vision_config") or {}
    missing = [k for k, v in text.items() if v is None and k != "vocab_size"]
    if missing:
        raise ModelFolderError(f"{parts.text_encoder / 'config.json'}: no {missing}; expected a Qwen2.5-VL config")
    cfg = ModelConfig(name=parts.path.name, source="diffusers", path=str(parts.path))
    if dtype is not None:
        cfg.dtype = dtype
    cfg.pipeline = parts.pipeline
    r = cfg.reasoner
    r.path = str(parts.text_encoder) if parts.text_encoder.parent != parts.path else None
    r.hidden_size, r.num_layers = text["hidden_size"], text["num_hidden_layers"]
    r.num_heads, r.num_kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    r.intermediate_size = text["intermediate_size"]
    for key, name in (("vision_depth", "depth"), ("vision_hidden_size", "hidden_size"), ("vision_heads", "num_heads"),
                      ("vision_intermediate_size", "intermediate_size")):
        if name in vision:
            setattr(r, key, vision[name])
    g = cfg.generator
    g.path = str(parts.transformer) if parts.transformer.parent != parts.path else None
    for key in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim"):
        if key not in tr:
            raise ModelFolderError(f"{parts.transformer / 'config.json'}: no {key!r}; expected a "
                                   "QwenImageTransformer2DModel config")
        setattr(g, key, tr[key])
    g.axes_dims_rope = tuple(tr.get("axes_dims_rope", g.axes_dims_rope))
    g.zero_cond_t = bool(tr.get("zero_cond_t", False))
    v = cfg.vae
    v.kind, v.path = "qwen_image", str(parts.vae)
    v.latent_channels = int(va.get("z_dim", v.latent_channels))
    if g.joint_attention_dim != r.hidden_size:
        raise ModelFolderError(
            f"{parts.transformer}: the generator reads {g.joint_attention_dim}-wide text states "
            f"(joint_attention_dim) but the reasoner at {parts.text_encoder} is {r.hidden_size} wide (hidden_size); "
            "the two parts do not belong together")
    if g.out_channels != v.latent_channels or g.in_channels != v.latent_channels * g.patch_size ** 2:
        raise ModelFolderError(
            f"{parts.transformer}: in_channels={g.in_channels}, out_channels={g.out_channels}, but the VAE at "
            f"{parts.vae} makes {v.latent_channels} latent channels (expected out_channels={v.latent_channels}, "
            f"in_channels={v.latent_channels * g.patch_size ** 2})")
    if parts.scheduler is not None:
        apply_scheduler(cfg, _read_json(parts.scheduler / "scheduler_config.json", "scheduler", parts.path),
                        parts.scheduler)
    cfg.validate()
    return cfg


# what a run's model section decides for a model loaded from a folder; everything else (sizes, schedule) comes
# from the folder's config files
RUN_SETTINGS = ("name", "dtype", "attention_backend", "images")
REASONER_RUN_SETTINGS = ("lora", "image_min_pixels", "image_max_pixels")
SIZES = {"reasoner": ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vision_depth",
                      "vision_hidden_size", "vision_heads", "vision_intermediate_size"),
         "generator": ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                       "num_attention_heads", "joint_attention_dim")}


def start_config(run: ModelConfig, folder: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """The folder's config with the run's own settings (dtype, attention backend, LoRA, pixel bounds), and the
    sizes where the run's model section (a preset such as qwen-image-edit) differs from the folder's weights."""
    import copy
    cfg = copy.deepcopy(folder)
    for key in RUN_SETTINGS:
        setattr(cfg, key, copy.deepcopy(getattr(run, key)))
    for key in REASONER_RUN_SETTINGS:
        setattr(cfg.reasoner, key, copy.deepcopy(getattr(run.reasoner, key)))
    differ = [f"model.{part}.{key}: {getattr(getattr(run, part), key)} in the config, "
              f"{getattr(getattr(folder, part), key)} in the folder"
              for part, keys in SIZES.items() for key in keys
              if getattr(getattr(run, part), key) != getattr(getattr(folder, part), key)]
    cfg.validate()
    return cfg, differ


def apply_scheduler(cfg: ModelConfig, sched: dict, where: Path) -> None:
    """The sigma schedule of a FlowMatchEulerDiscreteScheduler config: a resolution-dependent exponential shift
    (use_dynamic_shifting) or a fixed shift, and the terminal stretch."""
    s = cfg.schedule
    if sched.get("time_shift_type", "exponential") != "exponential":
        raise ModelFolderError(f"{where}: time_shift_type {sched.get('time_shift_type')!r}; the sampler implements "
                               "the exponential shift only")
    if sched.get("use_dynamic_shifting", False):
        s.shift = "resolution"
        s.base_shift = float(sched.get("base_shift", s.base_shift))
        s.max_shift = float(sched.get("max_shift", s.max_shift))
        s.base_tokens = int(sched.get("base_image_seq_len", s.base_tokens))
        s.max_tokens = int(sched.get("max_image_seq_len", s.max_tokens))
    else:
        shift = float(sched.get("shift", 1.0))
        if not shift > 0:
            raise ModelFolderError(f"{where}: shift must be positive, got {shift}")
        s.shift, s.fixed_mu = "fixed", math.log(shift)
    terminal = sched.get("shift_terminal")
    s.shift_terminal = float(terminal) if terminal else None


def check_references(refs: dict, where: Path) -> None:
    """Every folder a saved model refers to is still there: a moved or deleted diffusers folder is named."""
    for component, ref in refs.items():
        for key, folder in ref.items():
            if not Path(folder).is_dir():
                raise ModelFolderError(f"{where}: the {component}'s {key} is read from {folder}, which is gone; "
                                       "put the diffusers folder back or save the model again with its weights")


def torch_dtype(name: str):
    import torch
    if name not in DTYPES:
        raise ModelFolderError(f"model.dtype: {name!r}; choose from {list(DTYPES)}")
    return getattr(torch, name)


__all__ = ["DiffusersFolder", "INDEX", "MissingPartError", "ModelFolderError", "PIPELINES", "apply_scheduler", "check_references",
           "folder_config", "start_config",
           "is_diffusers_folder", "read_folder", "torch_dtype"]
