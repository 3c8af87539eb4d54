"""The trainer runtime: one code path for one process, torchrun (DDP, FSDP2) and GPUs."""

from .trainer import StageModule, StageResult, TrainingStopped, load_stage_model, step_generator, train_stage

__all__ = ["StageModule", "StageResult", "TrainingStopped", "load_stage_model", "step_generator", "train_stage"]
