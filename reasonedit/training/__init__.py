"""The trainer runtime: one code path for one process, torchrun (DDP, FSDP2) and GPUs."""

from .step import DeepSpeedStepper, StepOutcome, Stepper, step_generator
from .trainer import StageModule, StageResult, TrainingStopped, load_stage_model, train_stage

__all__ = ["DeepSpeedStepper", "StageModule", "StageResult", "StepOutcome", "Stepper", "TrainingStopped",
           "load_stage_model", "step_generator", "train_stage"]
