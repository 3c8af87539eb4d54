"""Process group setup and the data-parallel wrapping of the stage module (DDP or FSDP2)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group torchrun or deepspeed set up in the environment (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank; `[value]` without a process group."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on `value`'s own device (nccl reduces only CUDA tensors: CPU ones go over and back)."""
    if dist.is_initialized():
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else value.device
        reduced = value.to(on, copy=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(value.device)
    return value


def resolve_parallel(parallel: str, world: World) -> str:
    if parallel == "auto":
        return "ddp" if world.world_size > 1 else "none"
    if parallel == "none" and world.world_size > 1:
        raise ValueError(f"train.parallel: 'none' on {world.world_size} ranks; use ddp, fsdp or deepspeed")
    return parallel


def fsdp_policies(mixed_precision: str, cpu_offload: bool, world: World) -> dict:
    """FSDP2's keyword arguments for `train.fsdp_mixed_precision` and `train.cpu_offload`: bf16 parameters for the
    forward and backward with gradients reduced in float32 ("auto": on CUDA only), and the sharded parameters,
    gradients and optimizer state kept in host memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict = {}
    if mixed_precision == "bf16" or (mixed_precision == "auto" and world.device.type == "cuda"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def wrap(module: torch.nn.Module, parallel: str, world: World, mixed_precision: str = "none",
         cpu_offload: bool = False, unsharded: Iterable[torch.nn.Parameter] = ()) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` on each transformer block, then the root, with `fsdp_policies`); 'none'
    returns it as is. `unsharded`: parameters FSDP2 leaves whole on every rank, those of a part that runs outside
    the wrapped forward (the VAE, which encodes latents in preprocessing)."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.local_rank] if world.device.type == "cuda" else None
        # a stage-3 micro-batch may hold no generator sample, so some parameters can go unused
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        policies = fsdp_policies(mixed_precision, cpu_offload, world)
        for sub in module.modules():
            if type(sub).__name__ in ("GeneratorBlock", "Qwen2_5_VLDecoderLayer"):
                fully_shard(sub, **policies)
        ignored = set(unsharded)
        fully_shard(module, **policies, **({"ignored_params": ignored} if ignored else {}))
        return module
    return module


__all__ = ["World", "all_reduce_sum", "barrier", "fsdp_policies", "init_world", "resolve_parallel", "wrap"]
