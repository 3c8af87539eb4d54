"""A KV cache of the condition prompt's prefix over a source, reused by every instruction about that source.

The generator's text stream is the reasoner's last-layer states over the condition prompt: system turn, the
source image(s), then the instruction (`prompts.condition`). Two condition prompts about one source differ
only from the instruction on, and the instruction starts right after the last image's `<|vision_end|>`, a
special token the tokenizer never merges with the text after it. `ConditionPrefixCache` runs that prefix
(vision tower included) once per source and keeps its past key values and the states of the prefix tokens
the generator keeps (the image tokens; the fixed `condition_prefix_length` system tokens are dropped as
always). Each prompt then runs only its instruction tokens over the cached keys and values, with the 3-axis
positions of the whole prompt (`get_rope_index`), so the suffix continues exactly where the image's rope
positions left it; prefix states + suffix states equal `Reasoner.condition_states` (float32: to 1e-5,
`tests/test_condition_prefix.py`).

New prefixes run as one packed row (as the uncached states do); the suffixes of a call run as one batch,
each row [left padding | prefix | instruction | right padding] with the padding masked. A prefix is keyed by
its tokens and the pixels the vision tower reads, so a prompt whose template put anything instruction-specific
before the image would simply miss. A prompt with no image (text to image) has no prefix worth caching and
goes through the uncached path.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from reasonedit.inference.lru import LRU
from reasonedit.models import prompts
from reasonedit.models.attention import PackedAttention
from reasonedit.models.processor import Image
from reasonedit.models.reasoner import PACKED_KWARG, pack_reasoner_inputs
from reasonedit.models.rollout import CACHE_KWARG
from reasonedit.models.tokenizer import single_token_id

if TYPE_CHECKING:
    from reasonedit.models.reasoner import Reasoner

log = logging.getLogger(__name__)

VISION_END_TOKEN = "<|vision_end|>"


@dataclass
class ConditionPrefix:
    """One source's condition prefix: per layer (keys, values), each (1, kv_heads, P, head_dim), and the
    last-layer states of its kept tokens (P - condition_prefix_length, hidden)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    states: torch.Tensor
    length: int  # P


@dataclass
class _Prompt:
    """One condition prompt, encoded unpadded, with its whole prompt's 3-axis positions and its prefix's end."""

    sample: dict[str, torch.Tensor]  # ReasonerProcessor.encode_one's output, on the CPU
    positions: torch.Tensor  # (3, 1, T)
    prefix_length: int  # P: up to and including the last image's <|vision_end|>
    key: bytes

    @property
    def ids(self) -> torch.Tensor:
        return self.sample["input_ids"]  # (1, T)


def prefix_end(ids: Sequence[int], types: Sequence[int], vision_end: int) -> Optional[int]:
    """Where the instruction starts: right after the last `<|vision_end|>`, when no image token follows it;
    None when the prompt has no image."""
    ends = [i for i, t in enumerate(ids) if t == vision_end]
    if not ends or any(types[ends[-1] + 1:]):
        return None
    return ends[-1] + 1


class ConditionPrefixCache:
    """Least-recently-used condition prefixes (`capacity` sources) for one reasoner, and condition states from them.

    Counters: `computed` prefixes run through the model (one per new source, whatever the prompts about it),
    `prefills` the packed forwards that ran them and `prefix_tokens` the tokens they read; `hits` prompts whose
    prefix was stored or computed for another prompt of the same call; `prompts` prompts answered from a
    prefix; `uncached` prompts sent to the uncached path.
    """

    def __init__(self, reasoner: "Reasoner", capacity: int = 32, backend: str = "auto"):
        self._store: LRU[bytes, ConditionPrefix] = LRU(capacity, "ConditionPrefixCache")
        self.reasoner = reasoner
        self.capacity = capacity
        self.backend = backend
        self._vision_end = single_token_id(reasoner.tokenizer, VISION_END_TOKEN)
        self.reset()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def reset(self) -> None:
        """Empty the store and zero the counters: the cache as a new process starts with it."""
        self.clear()
        self.computed = self.prefills = self.prefix_tokens = self.hits = self.prompts = self.uncached = 0

    # -- prompts ----------------------------------------------------------------------------------------

    def _encode(self, images: Image | Sequence[Image], instruction: str) -> tuple[dict, Optional[_Prompt]]:
        r = self.reasoner
        sample = prompts.encode_condition(r.processor, images, instruction, r.condition_template)
        if "image_grid_thw" not in sample:
            return sample, None
        ids, types = sample["input_ids"], sample["mm_token_type_ids"]
        length = prefix_end(ids[0].tolist(), types[0].tolist(), self._vision_end)
        if length is None or length < r.condition_prefix_length or length >= ids.shape[1]:
            return sample, None
        with torch.no_grad():
            positions, _ = r.model.model.get_rope_index(ids, types, image_grid_thw=sample["image_grid_thw"])
        digest = hashlib.blake2b(ids[0, :length].numpy().tobytes(), digest_size=16)
        digest.update(sample["image_grid_thw"].numpy().tobytes())
        digest.update(sample["pixel_values"].contiguous().numpy().tobytes())
        return sample, _Prompt(sample, positions, length, digest.digest())

    # -- prefixes ---------------------------------------------------------------------------------------

    def _prefill(self, todo: Sequence[_Prompt]) -> list[ConditionPrefix]:
        """The prefixes of `todo` (distinct sources), run as one packed row."""
        r = self.reasoner
        pieces = [{"input_ids": p.ids[:, :p.prefix_length],
                   "mm_token_type_ids": p.sample["mm_token_type_ids"][:, :p.prefix_length],
                   "pixel_values": p.sample["pixel_values"], "image_grid_thw": p.sample["image_grid_thw"]}
                  for p in todo]
        row = pack_reasoner_inputs(pieces, r.model).to(r.device)
        out = r.model.model(input_ids=row.input_ids, position_ids=row.position_ids, pixel_values=row.pixel_values,
                            image_grid_thw=row.image_grid_thw, use_cache=True,
                            **{PACKED_KWARG: PackedAttention(row.layout, self.backend)})
        self.prefills += 1
        self.computed += len(todo)
        self.prefix_tokens += sum(row.lengths)
        hidden = row.split(out.last_hidden_state)  # (1, L, hidden) -> (P_i, hidden) each
        keep = r.condition_prefix_length
        # (1, kv_heads, L, head_dim) per layer -> one (1, kv_heads, P_i, head_dim) piece per prefix, each its own
        # storage so an evicted prefix frees its memory
        layers = [(k.split(row.lengths, dim=2), v.split(row.lengths, dim=2))
                  for k, v in ((layer.keys, layer.values) for layer in getattr(out, CACHE_KWARG).layers)]
        return [ConditionPrefix([(k[i].clone(), v[i].clone()) for k, v in layers], hidden[i][keep:].clone(),
                                p.prefix_length)
                for i, p in enumerate(todo)]

    # -- states -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def states(self, images: Sequence[Image | Sequence[Image]], instructions: Sequence[str]) -> list[torch.Tensor]:
        """`Reasoner.condition_states(images, instructions)`, one (T_i, hidden) tensor per prompt, with each
        source's prefix run once and kept."""
        if len(images) != len(instructions):
            raise ValueError(f"condition: {len(images)} image entries for {len(instructions)} instructions")
        encoded = [self._encode(image, text) for image, text in zip(images, instructions)]
        out: list[Optional[torch.Tensor]] = [None] * len(encoded)
        plain = [i for i, (_, p) in enumerate(encoded) if p is None]
        if plain:
            self.uncached += len(plain)
            states = self.reasoner.encoded_condition_states([encoded[i][0] for i in plain], packed=True,
                                                            backend=self.backend)
            for i, s in zip(plain, states):
                out[i] = s
        cached = [(i, p) for i, (_, p) in enumerate(encoded) if p is not None]
        if not cached:
            return out  # type: ignore[return-value]
        found: dict[bytes, ConditionPrefix] = {}
        todo: dict[bytes, _Prompt] = {}
        for _, p in cached:
            stored = self._store.get(p.key)
            if stored is not None:
                found[p.key] = stored
                self.hits += 1
            elif p.key in todo:
                self.hits += 1  # the negative prompt, or a second instruction, about a source this call computes
            else:
                todo[p.key] = p
        if todo:
            for key, prefix in zip(todo, self._prefill(list(todo.values()))):
                found[key] = prefix
                self._store.put(key, prefix)
        self.prompts += len(cached)
        for (i, p), s in zip(cached, self._suffixes([p for _, p in cached], [found[p.key] for _, p in cached])):
            out[i] = s
        return out  # type: ignore[return-value]

    def _suffixes(self, batch: Sequence[_Prompt], prefixes: Sequence[ConditionPrefix]) -> list[torch.Tensor]:
        """Each prompt's states: its prefix's kept states, then its instruction tokens' run over the prefix's keys
        and values, all prompts as one batch."""
        r = self.reasoner
        device, model = r.device, r.model
        longest = max(x.length for x in prefixes)
        rest = [p.ids.shape[1] - p.prefix_length for p in batch]
        width = max(rest)
        cache = DynamicCache(config=model.config.get_text_config())
        for layer in range(len(prefixes[0].layers)):
            # (B, kv_heads, longest, head_dim): each prefix left-padded to the longest, the padding masked
            keys = torch.cat([F.pad(x.layers[layer][0], (0, 0, longest - x.length, 0)) for x in prefixes])
            values = torch.cat([F.pad(x.layers[layer][1], (0, 0, longest - x.length, 0)) for x in prefixes])
            cache.update(keys, values, layer)
        ids = torch.full((len(batch), width), int(r.tokenizer.pad_token_id), dtype=torch.long)
        positions = torch.zeros(3, len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), longest + width, dtype=torch.long)
        for b, (p, x, n) in enumerate(zip(batch, prefixes, rest)):
            ids[b, :n] = p.ids[0, x.length:]
            # the whole prompt's rope positions: the instruction continues where the image's positions end
            positions[:, b, :n] = p.positions[:, 0, x.length:]
            positions[:, b, n:] = p.positions[:, 0, -1:]  # right padding: causal, so no real token reads it
            mask[b, longest - x.length:longest + n] = 1
        hidden = model.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=True,
                             **{CACHE_KWARG: cache}).last_hidden_state  # (B, width, hidden)
        return [torch.cat([x.states, hidden[b, :n]]) for b, (x, n) in enumerate(zip(prefixes, rest))]


__all__ = ["ConditionPrefix", "ConditionPrefixCache", "prefix_end"]
