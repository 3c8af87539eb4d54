"""Chat messages for each of the reasoner's roles, and parsers for its scored and decided answers.

Roles: `condition` (what the generator is conditioned on), `think` (abstract instruction to concrete
steps), `describe_target`, `score` (edited image alone against a description), `decide` (think,
then exactly one of Success, Reflection + new instruction, Failed; a Reflection whose instruction starts with
`restart:` is for the source image, not the edited one). Each builder takes an optional
`answer`, appended as the assistant turn, so the same builders make stage-1 training text.

The condition prompt follows a `ConditionTemplate`: a fixed system prompt whose tokens, up to and including
`<|im_start|>user\\n`, are dropped from the states (see `condition_prefix_length`), then the source image(s)
and the instruction. Tiny models use ours (`OWN_TEMPLATE`); a model loaded from a diffusers Qwen-Image-Edit
folder uses the prompt its pipeline class builds, read from the installed diffusers at run time
(`pipeline_template`): the released generator weights were trained on states of that prompt, and this project
does not ship another project's prompt text. The other roles share one system prompt and put their
image first, the task after it: prompts about the same image then share a token prefix that ends right
after the image, which inference computes once (`reasonedit.inference.prefix_cache`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

from reasonedit.config.world import NOTHING, phrasing_texts
from reasonedit.models.processor import Image, Messages, ReasonerProcessor
from reasonedit.models.tokenizer import (
    DECISION_TOKENS,
    FAILED_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    REFLECTION_TOKEN,
    SUCCESS_TOKEN,
    THINK_TOKEN,
)

# our condition system prompt (tiny models); a diffusers folder's model uses its pipeline's (`pipeline_template`)
CONDITION_SYSTEM_PROMPT = (
    "Look at the input image and read the instruction after it. Say to yourself what the image shows and what "
    "the instruction changes, then picture the result: the instruction carried out, everything else kept as it was."
)
# One system prompt for every reasoner role, and the role's task written after the image: think, describe and
# decide about the same source then share one token prefix (system turn + image), whose KV cache
# `reasonedit.inference.prefix_cache` computes once per source.
REASONER_SYSTEM_PROMPT = "You are an image-editing assistant. Look at the image, then do the task written after it."
THINK_TASK = "Rewrite the editing request as concrete edit steps, one per line."
DESCRIBE_TASK = "Describe the image as it should look after the edit."
SCORE_TASK = "Score how well the image matches the description, from 0 to 10."
DECIDE_TASK = (
    "Think, then decide: <#Success> if the edit is done, <#Reflection> and a better instruction if it can be "
    "fixed, <#Failed> to start again."
)
ROLE_TASKS = {"think": THINK_TASK, "describe": DESCRIBE_TASK, "score": SCORE_TASK, "decide": DECIDE_TASK}
# The pretrain stage (tiny presets only; it stands in for Qwen2.5-VL's pretraining): read the world back from the
# image. Same system prompt and image-first layout as the roles; the questions are `reasonedit.config.world.PHRASINGS`, asked by `reasonedit.shapes.scene_qa`.
READ_TASK = "Answer the question about the image."
CAPTION_TASK = "Caption the image."

MIN_SCORE, MAX_SCORE = 0, 10
DECISION_KINDS = {SUCCESS_TOKEN: "success", REFLECTION_TOKEN: "reflection", FAILED_TOKEN: "failed"}


@dataclass(frozen=True)
class ConditionTemplate:
    """The condition prompt of one kind of model: its system text and how its source images are labelled.

    label: the text before each image, `{}` standing for its 1-based number; "" for none. label_one: label a
    single image too (QwenImageEditPlusPipeline does; our template labels only when there are several).
    """

    name: str
    system: str
    label: str = ""
    label_one: bool = False

    def user(self, images: Sequence[Image], text: str) -> dict:
        parts: list[dict] = []
        for i, image in enumerate(images, start=1):
            if self.label and (len(images) > 1 or self.label_one):
                parts.append({"type": "text", "text": self.label.format(i)})
            parts.append({"type": "image", "image": image})
        parts.append({"type": "text", "text": text})
        return {"role": "user", "content": parts}

    def prefix(self) -> str:
        """The fixed text every condition prompt starts with; its tokens are dropped from the states."""
        return f"{IM_START_TOKEN}system\n{self.system}{IM_END_TOKEN}\n{IM_START_TOKEN}user\n"


OWN_TEMPLATE = ConditionTemplate("reasonedit", CONDITION_SYSTEM_PROMPT, label="Image {}: ")
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # how Qwen2.5-VL's chat template renders an image


class TemplateError(ValueError):
    """A pipeline whose prompt cannot be read from the installed diffusers."""


@functools.lru_cache(maxsize=None)
def pipeline_template(pipeline: str) -> ConditionTemplate:
    """The condition prompt diffusers' `pipeline` class builds, read from the installed diffusers: the pipeline
    is made without weights and its prompt builder is run with a processor that only records the text (for one
    image and, where the pipeline takes several, for two). Raises TemplateError naming the class when the
    installed diffusers lacks it or builds a prompt of another shape than system turn, images, instruction."""
    try:
        import diffusers
        cls = getattr(diffusers, pipeline)
    except (ImportError, AttributeError):
        raise TemplateError(f"model.pipeline: the installed diffusers has no {pipeline}; its prompt cannot be "
                            "read (install the diffusers version in pyproject.toml)") from None
    mark = "\x00instruction\x00"

    class Recorded(Exception):
        pass

    texts: list[str] = []

    def record(text=None, **_):
        texts.extend(text)
        raise Recorded

    pipe = cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None)
    pipe.processor = record
    from PIL import Image as PILImage
    stub = PILImage.new("RGB", (32, 32))
    several = "Plus" in pipeline  # the 2509 / 2511 pipelines take a list of images
    for images in ([stub], [stub, stub]) if several else (stub,):
        try:
            pipe._get_qwen_prompt_embeds(prompt=mark, image=images, device="cpu", dtype=torch.float32)
        except Recorded:
            continue
        raise TemplateError(f"{pipeline}: its prompt builder did not call the processor; this diffusers version "
                            "builds the prompt in a way this code does not read")
    head, tail = f"{IM_START_TOKEN}system\n", f"{IM_END_TOKEN}\n{IM_START_TOKEN}user\n"
    system, label = None, None
    for n, text in enumerate(texts, start=1):
        ok = (text.startswith(head) and tail in text
              and text.endswith(f"{mark}{IM_END_TOKEN}\n{IM_START_TOKEN}assistant\n"))
        if not ok:
            raise TemplateError(f"{pipeline}: the installed diffusers builds a condition prompt this code does not "
                                f"read (expected system turn, images, instruction): {text[:120]!r}")
        sys_text, user = text[len(head):].split(tail, 1)
        pieces = user[: user.index(mark)].split(VISION_PLACEHOLDER)
        if len(pieces) != n + 1 or pieces[-1]:
            raise TemplateError(f"{pipeline}: expected {n} image placeholder(s) before the instruction: {user!r}")
        found = pieces[0].replace("1", "{}", 1)
        if any(p != found.format(i) for i, p in enumerate(pieces[:-1], start=1)) or (system or sys_text) != sys_text:
            raise TemplateError(f"{pipeline}: its image labels are not numbered as this code reads them: {user!r}")
        system, label = sys_text, found
    return ConditionTemplate(pipeline, system, label=label or "", label_one=bool(label))


def template_for(pipeline: Optional[str]) -> ConditionTemplate:
    """The condition template of a model: its diffusers pipeline's (`model.pipeline`), ours without one."""
    return pipeline_template(pipeline) if pipeline else OWN_TEMPLATE


def _user(images: Sequence[Image], text: str) -> dict:
    """A reasoner role's user turn: the images (numbered when several), then the text."""
    return OWN_TEMPLATE.user(images, text)


def _conversation(system: str, user: dict, answer: Optional[str]) -> Messages:
    messages = [{"role": "system", "content": system}, user]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _as_images(images: Image | Sequence[Image]) -> list[Image]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("a prompt needs at least one image; got an empty list")
        return list(images)
    return [images]


def condition(images: Image | Sequence[Image], instruction: str,
              template: ConditionTemplate = OWN_TEMPLATE) -> Messages:
    """What the generator is conditioned on: source image(s) and the instruction, under the template's fixed
    system prompt; no image (an empty list) for text-to-image, where the instruction is the caption."""
    images = [] if isinstance(images, (list, tuple)) and not images else _as_images(images)
    return _conversation(template.system, template.user(images, instruction), None)


def encode_condition(processor: ReasonerProcessor, images: Image | Sequence[Image], instruction: str,
                     template: ConditionTemplate = OWN_TEMPLATE) -> dict[str, torch.Tensor]:
    """The condition prompt's unpadded inputs, checked to start with the fixed system prefix (whose tokens the
    generator's text stream drops): a chat template that does not render the system turn verbatim fails here."""
    inputs = processor.encode_one(condition(images, instruction, template))
    prefix = condition_prefix_ids(processor.tokenizer, template)
    if inputs["input_ids"][0, : len(prefix)].tolist() != prefix:
        raise ValueError("the condition prompt does not start with the fixed system prefix tokens; the "
                         "tokenizer's chat template must render the system turn verbatim")
    return inputs


def condition_prefix(template: ConditionTemplate = OWN_TEMPLATE) -> str:
    """The fixed text every condition prompt starts with; its tokens are dropped from the states."""
    return template.prefix()


def condition_prefix_ids(tokenizer: PreTrainedTokenizerBase, template: ConditionTemplate = OWN_TEMPLATE) -> list[int]:
    """The fixed prefix's token ids under `tokenizer`."""
    return tokenizer.encode(template.prefix(), add_special_tokens=False)


def condition_prefix_length(tokenizer: PreTrainedTokenizerBase, template: ConditionTemplate = OWN_TEMPLATE) -> int:
    """How many tokens the fixed condition prefix is under `tokenizer` (64 for Qwen-Image-Edit's prompt under the
    released Qwen2.5-VL tokenizer)."""
    return len(condition_prefix_ids(tokenizer, template))


def _role(task: str, image: Image, text: str, answer: Optional[str]) -> Messages:
    """A reasoner role's conversation: the shared system prompt, the image, then the task and its text."""
    return _conversation(REASONER_SYSTEM_PROMPT, _user([image], f"{task}\n{text}"), answer)


def role_of(messages: Messages) -> str:
    """Which role ("think", "describe", "score", "decide") built `messages`; ValueError for any other prompt."""
    if len(messages) >= 2 and messages[0].get("content") == REASONER_SYSTEM_PROMPT:
        content = messages[1].get("content")
        texts = [p.get("text", "") for p in content if p.get("type") == "text"] if isinstance(content, list) else []
        for role, task in ROLE_TASKS.items():
            if texts and texts[-1].startswith(task + "\n"):
                return role
    raise ValueError("not a reasoner role prompt (think, describe_target, score or decide)")


def think(image: Image, instruction: str, answer: Optional[str] = None) -> Messages:
    """Abstract instruction to concrete, executable steps."""
    return _role(THINK_TASK, image, f"Request: {instruction}", answer)


def describe_target(source: Image, instruction: str, answer: Optional[str] = None) -> Messages:
    """Source and instruction to a description of the expected target."""
    return _role(DESCRIBE_TASK, source, f"Edit: {instruction}", answer)


def score(edited: Image, description: str, answer: Optional[str] = None) -> Messages:
    """The edited image alone against the expected description; answered as `format_score` writes."""
    return _role(SCORE_TASK, edited, f"Expected: {description}\nAnswer as:\nscore: N\nreason: why", answer)


def decide(
    source: Image, instruction: str, description: str, score_value: int, reason: str, answer: Optional[str] = None
) -> Messages:
    """Source, instruction, expected description and the edit's score to a decision (see `format_decision`).

    An empty description (a record imported without one) leaves out the `Expected:` line rather than showing
    an empty expectation."""
    expected = f"Expected: {description}\n" if description.strip() else ""
    text = f"Edit: {instruction}\n{expected}score: {score_value}\nreason: {reason}"
    return _role(DECIDE_TASK, source, text, answer)


def read_scene(image: Image, question: str, answer: Optional[str] = None) -> Messages:
    """A question about the image (pretrain stage): "What is in the top-left corner?" -> "a small red circle"."""
    return _role(READ_TASK, image, f"Question: {question}", answer)


def caption_image(image: Image, answer: Optional[str] = None) -> Messages:
    """The image to its caption (pretrain stage): text-to-image records read backwards."""
    return _conversation(REASONER_SYSTEM_PROMPT, _user([image], CAPTION_TASK), answer)


def template_texts() -> list[str]:
    """The fixed prompt texts, for training a tiny tokenizer that encodes them compactly."""
    return [CONDITION_SYSTEM_PROMPT, REASONER_SYSTEM_PROMPT, THINK_TASK, DESCRIBE_TASK, SCORE_TASK, DECIDE_TASK,
            "Request: ", "Edit: ", "Expected: ", "score: 7\nreason: ", "Image 1: ", READ_TASK, CAPTION_TASK,
            "Question: ", NOTHING, *phrasing_texts(), "system\n", "user\n", "assistant\n"]


# ---------------------------------------------------------------------------------------------------
# Answers: writers and strict parsers


class ThinkerReplyError(ValueError):
    """A reasoner answer that is not in the expected format; the message says what is wrong."""


# After <#Reflection>, this marker says the new instruction is for the source image (start again from it), not
# for the edited image: EditThinker's refinement. Plain text, not a decision token, so a decision still has
# exactly one tag and tokenizers and checkpoints keep their vocabulary.
RESTART_MARKER = "restart:"


@dataclass(frozen=True)
class Decision:
    kind: str  # "success" | "reflection" | "failed"
    thought: str
    new_instruction: Optional[str] = None  # only for "reflection"
    restart: bool = False  # only for "reflection": new_instruction edits the source, not the edited image

    def __post_init__(self) -> None:
        if self.restart and self.kind != "reflection":
            raise ValueError(f"Decision(restart=True) is for a reflection, not {self.kind!r} (failed always "
                             "starts again from the source)")


_SCORE_RE = re.compile(r"\s*score:[ \t]*(\S+)[ \t]*\r?\n\s*reason:[ \t]*(.*?)\s*", re.IGNORECASE | re.DOTALL)
_TAG_RE = re.compile(r"<#[^<>\s]*>")


def format_score(value: int, reason: str) -> str:
    """The answer `parse_score` reads back."""
    return f"score: {value}\nreason: {reason}"


def parse_score(text: str) -> tuple[int, str]:
    """Read "score: N\\nreason: ..." with N an integer in 0-10 and a non-empty reason; raise ThinkerReplyError."""
    match = _SCORE_RE.fullmatch(text)
    if match is None:
        raise ThinkerReplyError(f"score answer is not 'score: N\\nreason: ...': {text[:80]!r}")
    raw, reason = match.groups()
    if not re.fullmatch(r"[+-]?\d+", raw):
        raise ThinkerReplyError(f"score {raw!r} is not an integer")
    value = int(raw)
    if not MIN_SCORE <= value <= MAX_SCORE:
        raise ThinkerReplyError(f"score {value} is outside {MIN_SCORE}-{MAX_SCORE}")
    if not reason:
        raise ThinkerReplyError("score answer has an empty reason")
    return value, reason


def format_decision(decision: Decision) -> str:
    """The answer `parse_decision` reads back."""
    tag = {kind: tag for tag, kind in DECISION_KINDS.items()}[decision.kind]
    text = f"{THINK_TOKEN} {decision.thought} {tag}"
    if decision.kind != "reflection":
        return text
    marker = f"{RESTART_MARKER} " if decision.restart else ""
    return f"{text} {marker}{decision.new_instruction}"


def parse_decision(text: str) -> Decision:
    """Read `<#Think> thought` then exactly one of `<#Success>`, `<#Reflection> new instruction`, `<#Failed>`;
    `<#Reflection> restart: new instruction` is a Reflection for the source image (`Decision.restart`).

    Raise ThinkerReplyError (naming what is wrong) for a missing or repeated tag, an unknown tag, text after
    Success or Failed, or a Reflection without a new instruction.
    """
    tags = _TAG_RE.findall(text)
    unknown = [t for t in tags if t not in DECISION_TOKENS]
    if unknown:
        raise ThinkerReplyError(f"unknown tag {unknown[0]!r}; the tags are {', '.join(DECISION_TOKENS)}")
    if tags.count(THINK_TOKEN) != 1 or not text.lstrip().startswith(THINK_TOKEN):
        raise ThinkerReplyError(f"a decision starts with one {THINK_TOKEN}; found {tags.count(THINK_TOKEN)} in {text[:80]!r}")
    decisions = [t for t in tags if t in DECISION_KINDS]
    if len(decisions) != 1:
        raise ThinkerReplyError(f"a decision has exactly one of {', '.join(DECISION_KINDS)}; found {decisions or 'none'}")
    tag = decisions[0]
    before, after = text.lstrip()[len(THINK_TOKEN):].split(tag)
    thought, after = before.strip(), after.strip()
    kind = DECISION_KINDS[tag]
    if kind == "reflection":
        restart = after.startswith(RESTART_MARKER)
        if restart:
            after = after[len(RESTART_MARKER):].strip()
        if not after:
            raise ThinkerReplyError(f"{REFLECTION_TOKEN} must be followed by a new instruction"
                                    + (f" after {RESTART_MARKER!r}" if restart else ""))
        return Decision(kind, thought, after, restart)
    if after:
        raise ThinkerReplyError(f"unexpected text after {tag}: {after[:80]!r}")
    return Decision(kind, thought, None)


__all__ = ["CAPTION_TASK", "CONDITION_SYSTEM_PROMPT", "ConditionTemplate", "DECISION_KINDS", "Decision", "OWN_TEMPLATE",
           "READ_TASK", "RESTART_MARKER", "TemplateError", "pipeline_template", "template_for", "REASONER_SYSTEM_PROMPT", "ROLE_TASKS", "ThinkerReplyError", "caption_image",
           "condition", "condition_prefix", "condition_prefix_ids", "condition_prefix_length", "decide",
           "describe_target", "encode_condition", "format_decision", "format_score", "parse_decision", "parse_score", "read_scene", "role_of", "score", "template_texts", "think"]
