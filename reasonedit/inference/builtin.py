"""The built-in Editor (our generator) and Thinker (our reasoner), both over one ReasonEditModel.

`GeneratorEditor` conditions the generator on the reasoner's states for (source, prompt) and samples with
`sampler.sample`; one packed batch per distinct step count. `ReasonerThinker` runs the reasoner's roles
(think; reflect = describe the target, score the edit alone, decide) as batched generation; its text
generation is a `generate(messages_batch) -> list[str]` callable, so tests can script the replies while
the real prompt builders and parsers run.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from reasonedit.inference import cancel
from reasonedit.inference.condition_prefix import ConditionPrefixCache
from reasonedit.inference.descriptions import TargetDescriptions
from reasonedit.inference.prefix_cache import PrefixCache
from reasonedit.inference.sampler import SampleSpec, SamplerConfig, sample
from reasonedit.inference.types import EditRequest, Reflection, check_reflect_inputs
from reasonedit.inference.vision_cache import VisionCache, cached_generate
from reasonedit.models import prompts
from reasonedit.models.prompts import ThinkerReplyError

if TYPE_CHECKING:
    from reasonedit.models.model import ReasonEditModel

log = logging.getLogger(__name__)

Generate = Callable[[list], list[str]]  # a batch of chat conversations -> one reply each
_TAG = re.compile(r"<#[^<>\s]*>")  # any decision-style tag
CACHES = ("prefix", "vision", "none")  # ReasonerThinker's caches over the source image
EDITOR_CACHES = ("prefix", "none")  # GeneratorEditor's caches of the condition prompt over the source
ROLES = tuple(prompts.ROLE_TASKS)  # think, describe, score, decide


def role_budgets(max_new_tokens: int | Mapping[str, int], default: int = 128) -> dict[str, int]:
    """The longest reply of each role: one number for all, or {role: tokens} (roles not named get `default`)."""
    given = ({r: max_new_tokens for r in ROLES} if isinstance(max_new_tokens, (int, np.integer))
             else dict(max_new_tokens))
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ValueError(f"max_new_tokens: unknown role(s) {', '.join(unknown)}; the roles are {', '.join(ROLES)}")
    budgets = {r: int(given.get(r, default)) for r in ROLES}
    small = {r: n for r, n in budgets.items() if n < 1}
    if small:
        raise ValueError(f"max_new_tokens: must be at least 1 for every role, got {small}")
    return budgets


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.array(PILImage.fromarray(image).resize((width, height), PILImage.BICUBIC))


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """A uint8 (H, W, 3) array, or a ValueError that says what it is instead."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what}: expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    return image


class GeneratorEditor:
    """Our generator as an `Editor`. The model's image policy (`model.images`) sizes what the reasoner and the VAE
    see and the edit: native keeps the source's size (rounded to the model's latent grid inside); the
    Qwen-Image-Edit policies resize as diffusers' pipelines do and return the edit at that size.

    cache: "prefix" (default) keeps the reasoner's KV cache of the condition prompt's prefix (system turn +
        source images, `ConditionPrefixCache`) across calls, so the prompt and negative prompt of an edit, and
        every later round that edits the same source, run only their instruction's tokens; "none" runs the whole
        condition prompt every time. Both give the same states (to float rounding). The cache holds states of
        the reasoner's weights when they were computed: after changing them, `prefix_cache.clear()`.
    """

    name = "reasonedit-generator"

    def __init__(self, model: "ReasonEditModel", sampler: SamplerConfig | None = None,
                 progress: Callable[[int, int], None] | None = None, cache: str = "prefix"):
        if cache not in EDITOR_CACHES:
            raise ValueError(f"GeneratorEditor cache: {cache!r} is not one of {', '.join(EDITOR_CACHES)}")
        model.require("generator")
        model.require("vae")
        self.model = model
        self.prefix_cache: Optional[ConditionPrefixCache] = None
        if cache == "prefix" and model.reasoner is not None:  # without a reasoner, encode_condition says so
            self.prefix_cache = ConditionPrefixCache(model.reasoner, backend=model.config.attention_backend)
        self.sampler = sampler or SamplerConfig.for_model(model.config.schedule)
        self.progress = progress
        self.policy = model.image_policy
        self.multiple = model.grid  # one latent patch of the generator covers this many pixels per side

    def edit(self, requests: Sequence[EditRequest]) -> list[np.ndarray]:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            for k, image in enumerate(r.images):
                check_image(image, f"request {i}: image" if k == 0 else f"request {i}: extra image {k}")
            self.policy.check_sources(len(r.images), f"request {i}")
            groups[int(r.num_inference_steps)].append(i)
        out: list[Optional[np.ndarray]] = [None] * len(requests)
        for steps, index in groups.items():
            latents, plans = self.latents([requests[i] for i in index], steps)
            decoded = self.model.decode_latents(latents)
            for i, image, plan in zip(index, decoded, plans):
                out[i] = _resize(image, *plan.returned)
        return out  # type: ignore[return-value]

    def latents(self, requests: Sequence[EditRequest], steps: int) -> tuple[list[torch.Tensor], list]:
        """The clean (C, h, w) latents of each request's edit, sampled in `steps` steps as one packed batch, and
        each request's `SizePlan` (the sizes its sources were resized to and the edit's)."""
        m, f = self.model, int(self.model.vae.downsample)
        prepared = [self.policy.prepare(r.images, self.multiple, f"request {i}") for i, r in enumerate(requests)]
        condition = [c for c, _, _ in prepared]
        guided = [r.guidance_scale > 1.0 for r in requests]
        neg_index = [i for i, g in enumerate(guided) if g]
        with torch.no_grad():  # prompts and negative prompts: one reasoner call (uncached: one packed forward)
            encode = self.prefix_cache.states if self.prefix_cache is not None else m.encode_condition
            states = encode(condition + [condition[i] for i in neg_index],
                            [r.prompt for r in requests] + [requests[i].negative_prompt or " " for i in neg_index])
            neg = dict(zip(neg_index, states[len(requests):]))
            flat = m.encode_images([image for _, vae, _ in prepared for image in vae])
        sources, at = [], 0
        for _, vae, _ in prepared:
            sources.append(flat[at: at + len(vae)])
            at += len(vae)
        channels = int(flat[0].shape[0])
        specs = [SampleSpec(text_states=s, sources=z, shape=(channels, plan.output[0] // f, plan.output[1] // f),
                            seed=r.seed, guidance_scale=float(r.guidance_scale), negative_states=neg.get(i))
                 for i, (r, s, z, (_, _, plan)) in enumerate(zip(requests, states, sources, prepared))]
        clean = sample(m.predict, specs, steps, m.generator.config.patch_size, self.sampler, self.progress)
        return clean, [plan for _, _, plan in prepared]


class ReasonerThinker:
    """Our reasoner as a `Thinker`, speaking the decision format of `prompts`.

    generate: replies to a batch of conversations (all of one role); default greedy generation by `model.reasoner`
        with a cache
        over the source image chosen by `cache`: "prefix" (default) keeps the language model's KV cache of the
        prompt prefix that ends after the image (`PrefixCache`), so think, describe and decide of every round
        read the source once; "vision" keeps only the vision tower's embeddings (`VisionCache`); "none" is
        plain `Reasoner.generate`. All three give the same greedy replies.
    max_new_tokens: the longest reply, one number or {role: tokens} (`role_budgets`).
    Each phase asks all its samples in one `generate` call. The target's description depends only on (source,
    instruction): it is asked once per sample and read back in later rounds (`descriptions`). `calls` counts
    the prompts asked per role.
    A reply that does not parse (empty description, bad score, not exactly one decision tag) is recorded
    in `Reflection.parse_error`, counted in `parse_errors`, and taken as "failed".
    loop: the loop's rules `edit_with_reasoning` follows with this thinker when not told (None: ours); the
        replies are read the same way under either.
    """

    name = "reasonedit-reasoner"

    def __init__(self, model: Optional["ReasonEditModel"] = None, generate: Optional[Generate] = None,
                 max_new_tokens: int | Mapping[str, int] = 128, cache: str = "prefix", loop: Optional[str] = None):
        if cache not in CACHES:
            raise ValueError(f"ReasonerThinker cache: {cache!r} is not one of {', '.join(CACHES)}")
        self.max_new_tokens = budgets = role_budgets(max_new_tokens)
        self.prefix_cache: Optional[PrefixCache] = None
        self.vision_cache: Optional[VisionCache] = None
        if generate is None:
            if model is None:
                raise ValueError("ReasonerThinker needs a model or a generate callable")
            reasoner = model.reasoner
            if cache == "prefix":  # the source's prefix KV serves think, describe and decide of every round
                prefixes = self.prefix_cache = PrefixCache(reasoner)

                def generate(batch: list) -> list[str]:
                    # score shows an edited image no later prompt shows: its prefix is not worth keeping
                    role = _role(batch)
                    return prefixes.generate(batch, max_new_tokens=budgets.get(role, budgets["think"]),
                                             keep=role != "score")
            elif cache == "vision":  # the source's embeddings serve think, describe and decide of every round
                embeddings = self.vision_cache = VisionCache()

                def generate(batch: list) -> list[str]:
                    return cached_generate(reasoner, batch, embeddings,
                                           max_new_tokens=budgets.get(_role(batch), budgets["think"]))
            else:
                def generate(batch: list) -> list[str]:
                    return reasoner.generate(batch, max_new_tokens=budgets.get(_role(batch), budgets["think"]))
        self.generate = generate
        self.parse_errors = 0
        self.loop = loop
        self.descriptions = TargetDescriptions()
        self.calls = {r: 0 for r in ROLES}  # prompts asked per role

    def _ask(self, conversations: list, role: str) -> list[str]:
        if not conversations:
            return []
        cancel.check("reasoner generation")
        self.calls[role] += len(conversations)
        replies = self.generate(conversations)
        if len(replies) != len(conversations):
            raise RuntimeError(f"generate returned {len(replies)} replies for {len(conversations)} conversations")
        return [str(r) for r in replies]

    def think(self, sources: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
        replies = self._ask([prompts.think(s, i) for s, i in zip(sources, instructions)], "think")
        out = []
        for reply, instruction in zip(replies, instructions):
            text = reply.strip()
            if not text:  # nothing to act on: the user's own words are the best instruction we have
                log.warning("think: empty reply for %r; editing with the instruction as given", instruction)
                self.parse_errors += 1
                text = instruction
            out.append(text)
        return out

    def reflect(self, sources: Sequence[np.ndarray], edited: Sequence[np.ndarray], instructions: Sequence[str],
                previous: Sequence[Optional[str]]) -> list[Reflection]:
        n = check_reflect_inputs(sources, edited, instructions, previous)
        out = [Reflection(decision="failed") for _ in range(n)]

        # 1. the expected target, from the source and the user's instruction: asked once per (source, instruction)
        keys = [self.descriptions.key(s, i) for s, i in zip(sources, instructions)]
        known = {k: self.descriptions.get(key) for k, key in enumerate(keys)}
        ask: dict[tuple, int] = {}  # each new (source, instruction) asked once, for its first sample
        for k, key in enumerate(keys):
            if known[k] is None:
                ask.setdefault(key, k)
        t0 = time.perf_counter()
        described = dict(zip(ask, self._ask([prompts.describe_target(sources[k], instructions[k])
                                             for k in ask.values()], "describe")))
        asked = [k for k in range(n) if known[k] is None]
        _share(out, asked, "describe", time.perf_counter() - t0)
        live = []
        for k in range(n):
            if known[k] is not None:
                out[k].raw["describe"], out[k].description = known[k]
                out[k].timings["describe"] = 0.0
                live.append(k)
                continue
            reply = described[keys[k]]
            out[k].raw["describe"] = reply
            description = reply.strip()
            if description and not _TAG.search(description):
                out[k].description = description
                self.descriptions.put(keys[k], reply, description)
                live.append(k)
            else:
                self._fail(out[k], "describe", f"description is empty or holds a decision tag: {reply[:80]!r}")

        # 2. the edited image alone against that description
        t0 = time.perf_counter()
        scored = self._ask([prompts.score(edited[k], out[k].description) for k in live], "score")
        _share(out, live, "score", time.perf_counter() - t0)
        still = []
        for k, reply in zip(live, scored):
            out[k].raw["score"] = reply
            try:
                value, reason = prompts.parse_score(reply)
            except ThinkerReplyError as e:
                self._fail(out[k], "score", str(e))
                continue
            out[k].score, out[k].reason = float(value), reason
            still.append(k)

        # 3. the decision, with exactly one decision tag
        t0 = time.perf_counter()
        decided = self._ask([prompts.decide(sources[k], previous[k] or instructions[k], out[k].description,
                                            int(out[k].score), out[k].reason) for k in still], "decide")
        _share(out, still, "decide", time.perf_counter() - t0)
        for k, reply in zip(still, decided):
            out[k].raw["decide"] = reply
            try:
                d = prompts.parse_decision(reply)
            except ThinkerReplyError as e:
                self._fail(out[k], "decide", str(e))
                continue
            out[k].decision, out[k].thought, out[k].instruction = d.kind, d.thought, d.new_instruction
            out[k].restart = d.kind == "failed" or d.restart  # a `restart:` reflection re-edits the source too
        return out

    def _fail(self, reflection: Reflection, phase: str, message: str) -> None:
        self.parse_errors += 1
        reflection.decision, reflection.restart = "failed", True
        reflection.parse_error = f"{phase}: {message}"
        log.warning("reflect: %s reply did not parse (%s); taken as failed", phase, message)


def _role(batch: list) -> str:
    """The role of a batch's prompts ("" for prompts that are not a role's: they get think's budget)."""
    try:
        return prompts.role_of(batch[0])
    except ValueError:
        return ""


def _share(out: Sequence[Reflection], index: Sequence[int], phase: str, seconds: float) -> None:
    """Each sample of a batched phase is charged an equal share of its wall time, so shares sum to the total."""
    index = list(index)
    for k in index:
        out[k].timings[phase] = seconds / len(index)


__all__ = ["CACHES", "EDITOR_CACHES", "GeneratorEditor", "Generate", "ROLES", "ReasonerThinker", "check_image",
           "role_budgets"]
