"""The training stages: what each trains, on which data, with which loss.

| stage | trains | loss | data | from the previous checkpoint |
| 0 pretrain (tiny only) | whole reasoner, vision included | next-token | captions, scene questions | initial model |
| 1 reasoning | reasoner LoRA (LM attention) | next-token | thinking pairs, reflection | initial model |
| 2 editing | generator | flow matching | edit pairs, text-to-image | stage 1 reasoner + LoRA (frozen) |
| 3 unified | reasoner LoRA + generator | L_FM + 0.1 L_NTP | all four kinds, mixed rows | stage 2 model |
"""

from .base import LossTotals, Stage, StageContext
from .editing import EditingStage
from .pretrain import PretrainStage
from .reasoning import ReasoningStage
from .unified import UnifiedStage

STAGES: dict[int, type[Stage]] = {0: PretrainStage, 1: ReasoningStage, 2: EditingStage, 3: UnifiedStage}


def stage_for(number: int, config) -> Stage:
    """The stage `number` (0 pretrain, 1, 2 or 3) built from the experiment config's section of its name
    (`pretrain`, `stage<N>`)."""
    if number not in STAGES:
        raise ValueError(f"--stage: {number} is not a stage; choose from {sorted(STAGES)}")
    return STAGES[number].from_experiment(config)


__all__ = ["EditingStage", "LossTotals", "PretrainStage", "ReasoningStage", "STAGES", "Stage", "StageContext",
           "UnifiedStage", "stage_for"]
