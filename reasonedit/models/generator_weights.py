"""Loading the generator's weights from a local diffusers folder, beside the model it loads into.

`load_diffusers_transformer` reads a diffusers-format transformer folder (config.json and safetensors,
sharded or not) into a `PackedQwenImageTransformer`, key for key with diffusers' `QwenImageTransformer2DModel`:
missing, unexpected and mis-shaped keys are listed; a config field that differs from a given model is named.
`diffusers_config` goes the other way: the config diffusers' module takes for one of ours. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from reasonedit.models.generator import FROM_SCRATCH_FIELDS, ROPE_THETA, PackedQwenImageTransformer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# in the released Qwen-Image config.json, but not an argument of diffusers' module: no weights, no effect
IGNORED_CONFIG_FIELDS = ("pooled_projection_dim",)


class StateDictMismatchError(ValueError):
    """Weights that do not fit the model: lists the missing and unexpected keys and the shape mismatches."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]], limit: int = 50):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def listed(title: str, items: list[str]) -> str:
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more

        lines = f"weights in {source} do not fit the generator"
        if missing:
            lines += listed("missing keys", missing)
        if unexpected:
            lines += listed("unexpected keys", unexpected)
        if mismatched:
            lines += listed("shape mismatches (key: file shape vs model shape)",
                            [f"{k}: {list(a)} vs {list(b)}" for k, a, b in mismatched])
        super().__init__(lines + "\n  check that the folder and the model config describe the same architecture")


class ConfigMismatchError(ValueError):
    """A config field of a weights folder that differs from the model it is loaded into."""

    def __init__(self, source: str, field_name: str, folder_value, model_value):
        self.field = field_name
        super().__init__(f"config field {field_name!r} in {source} is {folder_value!r} but the model has "
                         f"{model_value!r}; build the model from that config or load without passing a model")


def diffusers_config(config) -> dict:
    """The generator's config as diffusers' QwenImageTransformer2DModel takes it, our from-scratch fields dropped.
    A model whose RoPE differs from diffusers' has no diffusers equivalent (qk_norm_init is an init only: the
    weights carry it)."""
    rope_defaults = {"rope_theta": ROPE_THETA, "rope_scale": 1.0}
    changed = [k for k, default in rope_defaults.items() if config.get(k, default) != default]
    if changed:
        raise ValueError(f"generator config fields {changed} differ from diffusers' RoPE: no diffusers module "
                         "computes the same")
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in FROM_SCRATCH_FIELDS}


def _config_fields() -> list[str]:
    import inspect
    params = inspect.signature(PackedQwenImageTransformer.__init__).parameters
    return [p for p in params if p != "self"]


def _normalise(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if not single.exists() and not index.exists():
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        singles = sorted(folder.glob("*.safetensors"))
        if len(indexes) == 1:
            index = indexes[0]
        elif len(singles) == 1:
            single = singles[0]
        else:
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} "
                                    f"(found {[p.name for p in indexes + singles]}); point at a diffusers transformer folder")
    if single.exists():
        return load_file(str(single))
    weight_map = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.exists():
            raise FileNotFoundError(f"shard {shard} named in {index} is missing from {folder}")
        state.update(load_file(str(path)))
    return state


def load_diffusers_transformer(
    path_or_dir: str | os.PathLike,
    model: PackedQwenImageTransformer | None = None,
    strict: bool = True,
    torch_dtype: torch.dtype | None = None,
) -> PackedQwenImageTransformer:
    """Load a local diffusers-format transformer folder (config.json + safetensors, sharded or not).

    Without `model`, builds one from the folder's config (on the meta device, so weights are read once,
    in their stored dtype unless `torch_dtype` is given). With `model`, every config field must match.
    Missing or unexpected keys raise StateDictMismatchError listing them (with strict=False they are
    logged); shape mismatches always raise. Nothing is ever downloaded.
    """
    folder = Path(path_or_dir)
    if folder.is_file():
        folder = folder.parent
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: point at a diffusers transformer folder (config.json "
                                f"plus {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")
    folder_config = json.loads(config_path.read_text())
    known = _config_fields()
    unknown = [k for k in folder_config if not k.startswith("_") and k not in known + list(IGNORED_CONFIG_FIELDS)]
    if unknown:  # diffusers ignores them too; say so, since a newer architecture flag would land here
        log.warning("config field(s) %s in %s are unknown to the generator and ignored (as diffusers "
                    "ignores them); it knows %s", unknown, config_path, known)
    config = {k: v for k, v in folder_config.items() if k in known}

    if model is None:
        with torch.device("meta"):
            model = PackedQwenImageTransformer.from_config(config)
        on_meta = True
    else:
        for name in known:
            if name in config and _normalise(config[name]) != _normalise(model.config[name]):
                raise ConfigMismatchError(str(config_path), name, config[name], model.config[name])
        on_meta = False

    state = _read_weights(folder)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted((k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
                        if k in state and state[k].shape != v.shape)
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictMismatchError(str(folder), missing, unexpected, mismatched)
    if missing or unexpected:
        log.warning("loading %s non-strictly: %d missing keys %s, %d unexpected keys %s", folder, len(missing),
                    missing[:20], len(unexpected), unexpected[:20])
        if on_meta and missing:
            raise StateDictMismatchError(str(folder), missing, [], [])  # meta weights cannot stay unloaded
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) for k, v in state.items()}
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=on_meta)
    if torch_dtype is not None and not on_meta:
        model.to(torch_dtype)
    log.info("loaded generator weights from %s (%d tensors)", folder, len(state))
    return model


__all__ = ["ConfigMismatchError", "StateDictMismatchError", "diffusers_config", "load_diffusers_transformer"]
