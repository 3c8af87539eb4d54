"""The training stages: what each trains, on which data, with which loss.

| stage | trains | loss | data | from the previous checkpoint |
| 0 pretrain (tiny only) | whole reasoner, vision included | next-token | captions, scene questions | initial model |
| 1 reasoning | reasoner LoRA (LM attention) | next-token | thinking pairs, reflection | initial model |
| 2 editing | generator | flow matching | edit pairs, text-to-image | stage 1 reasoner + LoRA (frozen) |
| 3 unified | reasoner LoRA + generator | L_FM + 0.1 L_NTP | all four kinds, mixed rows | stage 2 model |
| 4 rl | reasoner LoRA | GRPO (+ k3 KL) | thinking pairs, reflection: their prompts | stage 3 (else 1) model |
"""

from .base import LossTotals, Stage, StageContext
from .editing import EditingStage
from .pretrain import PretrainStage
from .reasoning import ReasoningStage
from .rl import RLStage
from .unified import UnifiedStage

STAGES: dict[int, type[Stage]] = {0: PretrainStage, 1: ReasoningStage, 2: EditingStage, 3: UnifiedStage, 4: RLStage}
STAGE_ALIASES = {"rl": 4}  # what `--stage` also takes


def stage_number(number: int | str) -> int:
    """A stage's number from its number or alias ("rl"); a ValueError naming the choices otherwise."""
    if isinstance(number, str):
        number = STAGE_ALIASES.get(number, int(number) if number.isdigit() else -1)
    if number not in STAGES:
        raise ValueError(f"--stage: {number} is not a stage; choose from {sorted(STAGES)} or {sorted(STAGE_ALIASES)}")
    return number


def stage_for(number: int | str, config) -> Stage:
    """The stage `number` (0 pretrain, 1, 2, 3, or 4 / "rl") built from the experiment config's section of its name
    (`pretrain`, `stage<N>`, `rl`)."""
    return STAGES[stage_number(number)].from_experiment(config)


__all__ = ["EditingStage", "LossTotals", "PretrainStage", "RLStage", "ReasoningStage", "STAGES", "STAGE_ALIASES",
           "Stage", "StageContext", "UnifiedStage", "stage_for", "stage_number"]
