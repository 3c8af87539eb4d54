"""What a checkpoint must agree on with the run that resumes it: the config values that change the run.

A checkpoint records them (`run_config`); a resume whose values differ stops with the keys, old and new,
unless `train.allow_config_change=true`. Values that only change how a run is watched or stored
(logging, checkpoint cadence, wandb, workers, the planned GPU count) are free to change.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from reasonedit.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)
# train.* keys that change what the run computes; the rest of train.* only changes how it is watched or saved
TRAIN_KEYS = ("weight_decay", "betas", "grad_clip", "ema_decay")
FREE_STAGE_KEYS = ("gpus", "reading_scenes")  # documentation; what the pretrain step measures after training


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}", v))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def run_config(cfg: ExperimentConfig, stage_name: str) -> dict[str, Any]:
    """The stage's run-defining values, by dotted key."""
    stage = {k: v for k, v in asdict(getattr(cfg, stage_name)).items() if k not in FREE_STAGE_KEYS}
    out = {"seed": cfg.seed}
    out.update(_flat(stage_name, stage))
    out.update(_flat("batches", asdict(cfg.batches)))
    out.update(_flat("flow_matching", asdict(cfg.flow_matching)))
    out.update({f"train.{k}": _flat("x", getattr(cfg.train, k))["x"] for k in TRAIN_KEYS})
    if cfg.train.data_streams:  # which records make which batch (0, the default, is what older checkpoints had)
        out["train.data_streams"] = cfg.train.data_streams
    return out


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], where: str, allow: bool) -> None:
    """Raise ConfigError naming every key whose value differs from the checkpoint's, unless `allow`."""
    if saved is None:  # written before checkpoints recorded their config
        log.warning("%s records no config; resuming without checking it", where)
        return
    keys = sorted(set(saved) | set(current))
    changed = [f"{k}: {saved.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}" for k in keys
               if saved.get(k, "(unset)") != current.get(k, "(unset)")]
    if not changed:
        return
    if allow:
        log.warning("%s was written with another config; resuming anyway (train.allow_config_change=true): %s",
                    where, "; ".join(changed))
        return
    raise ConfigError(f"{where} was written with another config ({'; '.join(changed)}): run with the same values, "
                      f"write to another --out, or set train.allow_config_change=true to resume anyway")


__all__ = ["check_resume", "run_config"]
