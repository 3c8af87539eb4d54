"""The three training stages: what each trains, on which data, with which loss.

| stage | trains | loss | data | from the previous checkpoint |
| 1 reasoning | reasoner LoRA (LM attention) | next-token | thinking pairs, reflection | initial model |
| 2 editing | generator | flow matching | edit pairs, text-to-image | stage 1 reasoner + LoRA (frozen) |
| 3 unified | reasoner LoRA + generator | L_FM + 0.1 L_NTP | all four kinds, mixed rows | stage 2 model |
"""

from .base import Stage, StageContext
from .editing import EditingStage
from .reasoning import ReasoningStage
from .unified import UnifiedStage

STAGES: dict[int, type[Stage]] = {1: ReasoningStage, 2: EditingStage, 3: UnifiedStage}


def stage_for(number: int, config) -> Stage:
    """The stage `number` (1, 2 or 3) built from the experiment config's `stage<N>` section."""
    if number not in STAGES:
        raise ValueError(f"--stage: {number} is not a stage; choose 1, 2 or 3")
    return STAGES[number](getattr(config, f"stage{number}"))


__all__ = ["EditingStage", "ReasoningStage", "STAGES", "Stage", "StageContext", "UnifiedStage", "stage_for"]
