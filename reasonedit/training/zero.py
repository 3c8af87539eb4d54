"""DeepSpeed ZeRO-2 / ZeRO-3 for the trainer: the JSON filled from our config, the engine, and its checkpoints.

The experiment config stays the one source of truth for the numbers a run depends on: the stage's lr,
betas, weight decay, clipping, accumulation and (per device) precision are written into the JSON before
`deepspeed.initialize`; the JSON keeps what only DeepSpeed knows (ZeRO stage, buckets, offload). DeepSpeed's own
monitors and a flops-profile file are refused: they write where the JSON says, outside the stage folder.
Our loop owns the accumulation boundary (`managed_gradient_accumulation: false`): every micro-batch's
`engine.backward` accumulates, one `engine.step()` per optimiser step, and the loss is already
normalised by the global token count, so backward never rescales it by the accumulation steps.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch

from reasonedit.config import PACKAGE_CONFIGS, ConfigError, StageConfig, TrainConfig

from .distributed import World
from .schedule import stage_scheduler

log = logging.getLogger(__name__)
LAUNCH_JSONS = PACKAGE_CONFIGS / "deepspeed"  # shipped with the package; launch/deepspeed/ in a checkout
TAG = "deepspeed"  # the sub-folder of a checkpoint that holds DeepSpeed's own files
DEEPSPEED_MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")  # refused: they write outside the stage folder


def json_path(tc: TrainConfig) -> Path:
    """train.deepspeed_config, else the packaged zero{train.zero_stage}.json. A relative path is tried from
    the working directory, then from the source checkout's root; `launch/deepspeed/NAME` also names the
    packaged JSON, so the documented paths work from an installed package too."""
    if not tc.deepspeed_config:
        return LAUNCH_JSONS / f"zero{tc.zero_stage}.json"
    path = Path(tc.deepspeed_config)
    if not path.is_absolute() and not path.is_file():
        candidates = [PACKAGE_CONFIGS.parent.parent / path]
        if path.parent == Path("launch", "deepspeed"):
            candidates.append(LAUNCH_JSONS / path.name)
        path = next((c for c in candidates if c.is_file()), path)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: {tc.deepspeed_config}: no such file")
    return path.absolute()


def _fill(ds: dict, key: str, ours: Any, source: str, path: Path) -> None:
    """Write our value; a different concrete value in the JSON is overruled, and said so."""
    *parents, leaf = key.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    theirs = node.get(leaf, "auto")
    if theirs != "auto" and theirs != ours and not (isinstance(theirs, list) and list(ours) == theirs):
        log.warning("%s: %s is %r; %s=%r is used (set it to \"auto\" to silence this)", path, key, theirs, source, ours)
    node[leaf] = ours


def deepspeed_config(path: Path, tc: TrainConfig, sc: StageConfig, stage_name: str, world: World) -> dict:
    """The JSON at `path` with every value our config owns filled in (see the module docstring)."""
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config: {path}: the top level must be an object")
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", tc.zero_stage) not in (2, 3):
        raise ConfigError(f"train.deepspeed_config: {path}: zero_optimization.stage must be 2 or 3, "
                          f"got {zero.get('stage')!r}")
    zero.setdefault("stage", tc.zero_stage)
    for key in DEEPSPEED_MONITORS:  # they write to their own output_path (default: the working directory)
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f"train.deepspeed_config: {path}: {key}.enabled: DeepSpeed's own monitors write "
                              "outside the stage folder; set it to false and use train.tensorboard / train.wandb, "
                              "which write under it")
    if isinstance(ds.get("flops_profiler"), dict) and ds["flops_profiler"].get("output_file"):
        raise ConfigError(f"train.deepspeed_config: {path}: flops_profiler.output_file: a file outside the stage "
                          "folder; remove it (the profile is then logged)")
    if "scheduler" in ds:
        raise ConfigError(f"train.deepspeed_config: {path}: remove \"scheduler\"; the stage's warmup + cosine "
                          f"schedule ({stage_name}.warmup_steps, {stage_name}.min_lr_ratio) is used")
    # a batch is one packed row of tokens: the row's token budget is the batch size
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = sc.grad_accum
    ds["train_batch_size"] = sc.grad_accum * world.world_size
    ds["managed_gradient_accumulation"] = False
    _fill(ds, "gradient_clipping", float(tc.grad_clip), "train.grad_clip", path)
    on_gpu = world.device.type == "cuda"
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto" or not on_gpu:
        bf16["enabled"] = on_gpu  # float32 on the CPU, as every other mode
    if not on_gpu:
        ds.pop("fp16", None)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"train.deepspeed_config: {path}: optimizer.type {opt.get('type')!r}; the stages train "
                          f"with AdamW (type \"AdamW\")")
    params = opt.setdefault("params", {})
    _fill(ds, "optimizer.params.lr", sc.lr, f"{stage_name}.lr", path)
    _fill(ds, "optimizer.params.betas", list(tc.betas), "train.betas", path)
    _fill(ds, "optimizer.params.weight_decay", tc.weight_decay, "train.weight_decay", path)
    params.setdefault("eps", 1e-8)  # torch.optim.AdamW's default, as the other modes use
    if not on_gpu:
        params["torch_adam"] = True  # else the first start compiles DeepSpeed's CPU Adam for minutes
    return ds


def _ensure_process_group(world: World) -> None:
    """DeepSpeed wants a process group even for one process; torchrun / deepspeed set it up for several."""
    import torch.distributed as dist

    # what deepspeed's own launcher would have set; it checks for them even when a group exists
    for key, value in (("LOCAL_RANK", world.local_rank), ("RANK", world.rank), ("WORLD_SIZE", world.world_size)):
        os.environ.setdefault(key, str(value))
    if world.device.type == "cpu":
        import deepspeed.ops
        # DeepSpeed's CPU shared-memory all-reduce is a C++ extension compiled on first use (minutes, and a
        # compiler on the machine); gloo does the same job here
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if dist.is_initialized():
        return
    if world.world_size == 1 and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free loopback port for a one-process group
            s.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", rank=world.rank,
                            world_size=world.world_size)


def keep_frozen_whole(model: torch.nn.Module) -> list[str]:
    """Hide the model's components that train nothing (stage 2's reasoner, the VAE) from ZeRO-3, which would
    partition them: they run data-dependently (the vision tower only for samples with images, the VAE in
    preprocessing, outside any forward) and a partitioned module entered on one rank but not the other
    deadlocks its gather. They stay whole on every rank, as plain attributes the model still answers to."""
    hidden = []
    for name, child in list(model.named_children()):
        if child is not None and not any(p.requires_grad for p in child.parameters()):
            del model._modules[name]
            model.__dict__[name] = child  # `model.reasoner` still works; parameters() no longer sees it
            hidden.append(name)
    return hidden


def initialize(module: torch.nn.Module, tc: TrainConfig, sc: StageConfig, stage_name: str, world: World):
    """A DeepSpeed engine over `module`'s trainable parameters, with AdamW and the stage's schedule."""
    import deepspeed

    path = json_path(tc)
    ds = deepspeed_config(path, tc, sc, stage_name, world)
    _ensure_process_group(world)
    if ds["zero_optimization"]["stage"] == 3:
        hidden = keep_frozen_whole(module.model)
        if hidden:
            log.info("deepspeed: ZeRO-3 partitions what trains; frozen %s stay whole on every rank", hidden)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=params, config=ds,
        lr_scheduler=lambda opt: stage_scheduler(opt, sc))
    log.info("deepspeed: ZeRO-%d from %s, %s, %d micro-batch(es) per rank per step", ds["zero_optimization"]["stage"],
             path, "bf16" if ds["bf16"]["enabled"] else "float32", sc.grad_accum)
    return engine


def is_engine(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "DeepSpeedEngine" or hasattr(module, "zero_optimization_stage")


def full_trainable_state(engine, names: set[str]) -> dict[str, torch.Tensor]:
    """The trainable parameters as full float32 tensors on the CPU, by the stage module's names: gathered
    from the ZeRO partitions (every rank must call; every rank gets them)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if name in names:
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise KeyError(f"deepspeed: trainable parameter {name} has no ZeRO partition")
            out[name] = full.detach().cpu().clone()
    return out


def save(engine, folder: Path) -> None:
    """DeepSpeed's own optimizer, scheduler and model-partition files into `folder`/deepspeed (collective)."""
    engine.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=True)


def load(engine, folder: Path) -> None:
    """Restore what `save` wrote: fp32 master weights, optimizer moments, scheduler (collective)."""
    if not (folder / TAG).is_dir():
        raise FileNotFoundError(f"{folder / TAG} is missing: this checkpoint was not written by a DeepSpeed run "
                                f"(train.parallel=deepspeed resumes only DeepSpeed checkpoints)")
    loaded, _ = engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise FileNotFoundError(f"{folder / TAG}: DeepSpeed could not load this checkpoint")


__all__ = ["deepspeed_config", "full_trainable_state", "initialize", "is_engine", "json_path", "load", "save"]
