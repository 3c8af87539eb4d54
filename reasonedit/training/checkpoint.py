"""Training checkpoints: written to a hidden staging folder and renamed, so none is ever half-written.

    checkpoints/step_00000012/
        model.pt       trainable parameters only, full (unsharded) tensors by name (frozen ones come
                       from the stage's starting model)
        optimizer.pt   the optimizer state, full, keyed by parameter name (not under DeepSpeed)
        deepspeed/     DeepSpeed only: its own files (fp32 master partitions, optimizer moments,
                       scheduler), written by `engine.save_checkpoint` into the staging folder
        trainer.pt     step, scheduler, skipped-step counters, loss history
        rank<r>.pt     per rank: the batch stream (loader + packer + packed-but-unused batches), the
                       EMA (this rank's local tensors) and every RNG state (python, numpy, torch, cuda)
The last `keep_last` are kept. `latest(root)` is the highest complete step folder. Hidden beside them:
`.step_N.partial` (a checkpoint being written) and `.step_N.deleting` (one being removed); a kill can leave
either, `clear_interrupted(root)` removes them.

Every file holds tensors and plain data only (`plain`), read back with `torch.load(weights_only=True)`, so
loading a checkpoint runs no code from it.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .distributed import World, barrier
from .plain import from_plain, to_plain
from .zero import full_trainable_state as full_trainable_state_zero
from .zero import is_engine
from .zero import load as load_zero
from .zero import save as save_zero

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
HIDDEN_STEP_DIR = re.compile(r"^\.step_\d{8}\.(partial|deleting)$")  # `_staging`, `_remove`


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely; the message names the file and what to do."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sharded(module: torch.nn.Module) -> bool:
    """FSDP2 parameters are DTensors: their optimizer state is gathered by name, not saved per rank."""
    return any(hasattr(p, "to_local") for p in module.parameters())


def latest(root: Path) -> Path | None:
    steps = sorted(p for p in root.glob("step_*") if STEP_DIR.match(p.name) and p.is_dir()) if root.is_dir() else []
    return steps[-1] if steps else None


def clear_interrupted(root: Path) -> list[str]:
    """Remove the hidden folders a kill mid-save or mid-delete left in `root`; one line per folder, for the log."""
    done = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if HIDDEN_STEP_DIR.match(path.name) and path.is_symlink():  # never ours: removed, not followed
            path.unlink()
            done.append(f"removed the symbolic link {path} (a checkpoint's hidden name; none of ours is a link)")
        elif HIDDEN_STEP_DIR.match(path.name) and path.is_dir():
            shutil.rmtree(path)
            done.append(f"removed {path}, left by an interrupted checkpoint save")
    return done


def write_state(state: Any, path: Path) -> None:
    """Save `state` as plain data; through a Python file, so that a full disk or a failed write is an OSError
    naming `path` (torch's own file writer says only `basic_ios::clear` or `unexpected pos`)."""
    plain = to_plain(state, path.name)
    try:
        with open(path, "wb") as f:
            torch.save(plain, f)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def read_state(path: Path) -> Any:
    """What `write_state` saved, loaded with weights_only=True: tensors and plain data, no code run."""
    try:
        return from_plain(torch.load(path, weights_only=True))
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds objects other than tensors and plain data, so it is not loaded "
                              f"(weights_only=True); it was written by an older reasonedit: resume with that version "
                              f"or start the stage afresh (move {path.parent.parent} aside)") from None
    except (RuntimeError, EOFError) as e:  # not a torch file, or one written on a device this machine lacks
        raise CheckpointError(f"{path}: cannot be loaded: {e}") from None


def _staging(root: Path, step: int) -> Path:
    return root / f".step_{step:08d}.partial"


def _remove(path: Path) -> None:
    """Rename a step folder to a hidden name first, then delete it: a kill mid-delete must not leave a
    visible `step_N` with some of its files gone (it would be taken for a complete checkpoint)."""
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def full_trainable_state(module: torch.nn.Module, trainable: set[str]) -> dict[str, torch.Tensor]:
    """The trainable parameters, full (unsharded) and on the CPU, by name; every rank joins the gather."""
    if is_engine(module):
        return full_trainable_state_zero(module, trainable)
    model_sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    kept = {k: v for k, v in model_sd.items() if k in trainable}
    if model_sd and len(kept) != len(trainable):  # FSDP2 with cpu_offload: only rank 0 receives the tensors
        raise KeyError(f"checkpoint: {len(trainable) - len(kept)} trainable parameters are not in the model's "
                       f"state dict, e.g. {sorted(trainable - set(kept))[:2]}")
    return kept


def save_checkpoint(root: Path, step: int, world: World, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainable: set[str], trainer_state: dict[str, Any], rank_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write the checkpoint of `step` into a hidden staging folder and rename it to `step_N` (every rank joins);
    a write that fails removes the staging folder and raises (an OSError names the file)."""
    final, staging = root / f"step_{step:08d}", _staging(root, step)
    deepspeed = is_engine(module)
    kept = full_trainable_state(module, trainable)
    optim_sd = None
    if not deepspeed:
        optim_sd = (get_optimizer_state_dict(module, optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                    if _sharded(module) else optimizer.state_dict())  # replicated: the plain, id-keyed state
    try:
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        if deepspeed:
            save_zero(module, staging)  # every rank writes its own partition files
        if world.is_main:
            write_state(kept, staging / "model.pt")
            if optim_sd is not None:
                write_state(optim_sd, staging / "optimizer.pt")
            write_state(trainer_state, staging / "trainer.pt")
        write_state({**rank_state, "rng": rng_state()}, staging / f"rank{world.rank}.pt")
    except BaseException:
        if world.is_main:  # nothing half-written stays behind, and its space is freed at once
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    if world.is_main:
        if final.exists():
            _remove(final)
        os.replace(staging, final)
        for old in sorted(p for p in root.glob("step_*") if STEP_DIR.match(p.name))[:-keep_last]:
            _remove(old)
        log.info("checkpoint: %s", final)
    barrier()
    return final


def load_checkpoint(path: Path, world: World, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model and optimizer in place; return (trainer state, this rank's state)."""
    deepspeed = is_engine(module)
    for name in ("model.pt", "trainer.pt", f"rank{world.rank}.pt") + (() if deepspeed else ("optimizer.pt",)):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: the checkpoint is incomplete or was written by "
                                    f"a run with another number of ranks")
    if deepspeed:
        load_zero(module, path)  # fp32 master weights, optimizer moments, schedule
        return _load_states(path, world)
    if (path / "deepspeed").is_dir():
        raise FileNotFoundError(f"{path}: written by a DeepSpeed run (no optimizer.pt); resume it with "
                                f"train.parallel=deepspeed")
    # the checkpoint holds the trainable parameters only (the frozen ones come from the stage's start model),
    # hence not strict; but a saved key the model does not have means a checkpoint of another model layout,
    # which must not resume with some weights silently left unrestored
    options = StateDictOptions(full_state_dict=True, strict=False)
    keys = set_model_state_dict(module, read_state(path / "model.pt"), options=options)
    if keys.unexpected_keys:
        raise KeyError(f"{path / 'model.pt'}: {len(keys.unexpected_keys)} saved parameters are not in the model, "
                       f"e.g. {sorted(keys.unexpected_keys)[:3]}: the checkpoint was written for another model "
                       f"layout; start the stage afresh (remove {path.parent}) or resume with the code that wrote it")
    optim_sd = read_state(path / "optimizer.pt")
    if _sharded(module):
        # a parameter that never got a gradient (the last block's text output) has no state
        set_optimizer_state_dict(module, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True,
                                                                                        strict=False))
    else:
        optimizer.load_state_dict(optim_sd)
    return _load_states(path, world)


def _load_states(path: Path, world: World) -> tuple[dict[str, Any], dict[str, Any]]:
    trainer_state = read_state(path / "trainer.pt")
    rank_state = read_state(path / f"rank{world.rank}.pt")
    set_rng_state(rank_state["rng"])
    return trainer_state, rank_state


__all__ = ["CheckpointError", "clear_interrupted", "full_trainable_state", "latest", "load_checkpoint", "read_state",
           "rng_state", "save_checkpoint", "set_rng_state", "write_state"]
