"""Stage 0, pretrain (tiny presets only): what stands in for Qwen2.5-VL's pretraining.

A released Qwen2.5-VL has learned to see before stage 1 adds LoRA to its language model; a tiny random one
has not, and LoRA on its attention with a random frozen vision tower cannot learn to (its next-token loss
stays flat). This stage fully fine-tunes the tiny reasoner, vision tower and merger included, on reading the
shapes world: the captions of text-to-image records read backwards (image -> caption) and scene questions
with exact answers (`reasonedit.shapes.scene_qa`) about every rendered scene the streamed train records carry.
The questions are drawn per record from (seed, record key), so the loader's state alone resumes the stream
exactly. `reading_accuracy` scores the greedy answers on held-out scenes, per question kind.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from reasonedit.shapes.language import captions
from reasonedit.models.preprocess import Preprocessor
from reasonedit.data.segments import ReasonerSegment
from reasonedit.data.samples import Record, TextToImage
from reasonedit.shapes.scene_qa import QUESTION_KINDS, ask, record_views, scene_questions
from reasonedit.shapes.world import Scene, WorldConfig
from reasonedit.data.shards import read_records, shard_paths
from reasonedit.shapes.synth import split_of
from reasonedit.models import prompts
from reasonedit.models.model import ReasonEditModel

from .reasoning import ReasoningStage, freeze

if TYPE_CHECKING:
    from reasonedit.config import ExperimentConfig, StageConfig

log = logging.getLogger(__name__)

READING_KINDS = (*QUESTION_KINDS, "caption")


def train_whole_reasoner(model: ReasonEditModel) -> None:
    """Freeze everything, then make every reasoner parameter trainable (LM, vision tower, merger; no LoRA)."""
    if model.config.source != "tiny":
        raise ValueError(f"pretrain: model.source={model.config.source!r}; the pretrain stage stands in for "
                         "Qwen2.5-VL's pretraining on tiny presets only, a released reasoner comes pretrained")
    if model.reasoner.peft_model is not None:
        raise ValueError("pretrain: the start model's reasoner has a LoRA adapter; pretraining runs before stage 1 "
                         "adds one, so start from the models (or vae) step's model")
    freeze(model)
    for p in model.reasoner.model.parameters():
        p.requires_grad_(True)


class PretrainStage(ReasoningStage):
    number, name = 0, "pretrain"
    components = ("reasoner",)
    trains = "every reasoner parameter (language model, vision tower, merger): a full fine-tune, no LoRA"
    from_previous = "the initial (or VAE step's) model's reasoner (its generator and VAE are carried over untouched)"
    # every kind carries rendered scenes; text-to-image also carries the captions
    default_mix = {"text_to_image": 0.4, "edit_pair": 0.2, "thinking_pair": 0.2, "reflection": 0.2}
    terms = ("ntp",)

    def __init__(self, config: "StageConfig", world: WorldConfig):
        super().__init__(config)
        self.world = world

    @classmethod
    def from_experiment(cls, cfg: "ExperimentConfig") -> "PretrainStage":
        return cls(cfg.pretrain, cfg.world)  # the questions need the world's grid, kinds and colours

    def prepare(self, model: ReasonEditModel) -> None:
        train_whole_reasoner(model)

    def segments(self, pre: Preprocessor, record: Record) -> list[ReasonerSegment]:
        """The caption of a text-to-image record, then `questions_per_image` questions about each of its scenes."""
        rng = random.Random(f"{pre.config.seed}/{record.key}/pretrain")
        out = []
        if isinstance(record, TextToImage):
            out.append(pre.answer_segment(f"{record.key}/caption", "caption",
                                          prompts.caption_image(pre.bucket(record.image)), record.caption))
        for field_name, image, scene in record_views(record):
            image = pre.bucket(image)
            for q in scene_questions(scene, self.world, rng, self.config.questions_per_image):
                out.append(pre.answer_segment(f"{record.key}/{field_name}/{q.kind}", q.kind,
                                              prompts.read_scene(image, q.question), q.answer))
        return out

    # counts and loss_sums: stage 1's next-token loss on the answer tokens


# ---------------------------------------------------------------------------------------------------
# Reading accuracy on held-out scenes


@dataclass
class ReadingReport:
    """Exact-match accuracy of greedy answers per question kind (and caption: any of the scene's phrasings)."""

    accuracy: dict[str, float]
    asked: dict[str, int]
    examples: dict[str, list[dict]] = field(default_factory=dict)  # a few {question, expected, reply} per kind

    def line(self) -> str:
        """'cell 93 %, count 88 %, ...' in kind order."""
        return ", ".join(f"{k} {100 * v:.0f} %" for k, v in self.accuracy.items())

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "asked": self.asked, "examples": self.examples}


def heldout_scene_records(data: Path, n: int,
                          splits: Sequence[str] = ("val", "test")) -> tuple[str, list[TextToImage]]:
    """(split, records): the first `n` text-to-image records of the first held-out split the dataset has, whose
    scene lies outside the train split (the synthesizer assigns scenes to splits by content hash)."""
    if n <= 0:
        return "", []
    for split in splits:
        try:
            if not shard_paths(data, split, "text_to_image"):
                continue
        except FileNotFoundError:  # the dataset has no such split
            continue
        picked = []
        for record in read_records(data, split=split, kind="text_to_image"):
            if "scene" in record.meta and split_of(Scene.from_dict(record.meta["scene"])) != "train":
                picked.append(record)
                if len(picked) == n:
                    break
        return split, picked
    return "", []


@torch.no_grad()
def reading_accuracy(model: ReasonEditModel, records: Sequence[TextToImage], world: WorldConfig, pre: Preprocessor,
                     seed: int = 0, batch_size: int = 32, examples: int = 3) -> ReadingReport:
    """Ask each record's scene one question of every kind and for its caption; greedy answers, batched by kind.

    The images go through `pre.bucket`, as they do in training. Questions are drawn from (seed, record key).
    """
    if not records:
        raise ValueError("reading_accuracy: no held-out records to read")
    reasoner = model.reasoner
    tok = reasoner.tokenizer
    asked: dict[str, list[tuple[list, tuple[str, ...], str]]] = {k: [] for k in READING_KINDS}
    for r in records:
        scene = Scene.from_dict(r.meta["scene"])
        image = pre.bucket(r.image)
        rng = random.Random(f"{seed}/{r.key}/reading")
        for kind in QUESTION_KINDS:
            q = ask(kind, scene, world, rng)
            if q is not None:
                asked[kind].append((prompts.read_scene(image, q.question), (q.answer,), q.question))
        asked["caption"].append((prompts.caption_image(image), captions(scene, world.grid), prompts.CAPTION_TASK))
    was_training = reasoner.model.training
    reasoner.eval()
    accuracy, counts, shown = {}, {}, {}
    try:
        for kind, items in asked.items():
            if not items:
                continue
            # room for the longest right answer and its end token: a longer reply cannot be right
            longest = max(len(tok.encode(ref, add_special_tokens=False)) for _, refs, _ in items for ref in refs)
            replies = []
            for i in range(0, len(items), batch_size):
                replies += reasoner.generate([m for m, _, _ in items[i:i + batch_size]], max_new_tokens=longest + 2)
            right = [reply.strip() in refs for reply, (_, refs, _) in zip(replies, items)]
            accuracy[kind], counts[kind] = sum(right) / len(right), len(right)
            shown[kind] = [{"question": q, "expected": refs[0] if len(refs) == 1 else list(refs), "reply": reply,
                            "right": ok} for reply, (_, refs, q), ok in list(zip(replies, items, right))[:examples]]
    finally:
        reasoner.train(was_training)
    return ReadingReport(accuracy, counts, shown)


__all__ = ["PretrainStage", "READING_KINDS", "ReadingReport", "heldout_scene_records", "reading_accuracy",
           "train_whole_reasoner"]
