"""A KV cache of the reasoner's prompt prefix over a source image, reused by every prompt about that image.

The role prompts (`reasonedit.models.prompts`) share one system prompt and start the user turn with the
image, so think, describe and decide about one source begin with the same tokens, up to and including the
image's `<|vision_end|>`. `PrefixCache` runs that prefix through the language model once per source (vision
tower included), keeps its past key values, and answers each prompt greedily from them: only the role's
text and the reply go through the model. Positions are Qwen2.5-VL's 3-axis rope index of the whole
prompt, so the cached forward sees exactly the positions, ids and image embeddings of an uncached one, and
the replies are `Reasoner.generate`'s greedy replies token for token (`tests/test_prefix_cache.py`).

Prompts whose prefixes have the same length decode as one batch: each row is [prefix | padding | role
text], the padding masked out. A prompt with no image or several images has no cacheable prefix and goes to
plain `Reasoner.generate`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList

from reasonedit.inference import cancel
from reasonedit.inference.lru import LRU
from reasonedit.inference.vision_cache import image_key
from reasonedit.models.processor import Messages, image_parts
from reasonedit.models.rollout import CACHE_KWARG
from reasonedit.models.tokenizer import single_token_id

if TYPE_CHECKING:
    from reasonedit.models.reasoner import Reasoner

log = logging.getLogger(__name__)

VISION_END_TOKEN = "<|vision_end|>"


@dataclass
class Prefix:
    """One prefix's past key values: per layer (keys, values), each (1, kv_heads, P, head_dim)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


@dataclass
class _Prompt:
    """One conversation, encoded unpadded, with its full 3-axis positions and where its prefix ends."""

    index: int
    ids: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (3, 1, T): get_rope_index of the whole prompt
    types: torch.Tensor  # (1, T) mm_token_type_ids
    pixel_values: torch.Tensor
    grid: torch.Tensor  # (1, 3)
    prefix_length: int
    key: bytes


class PrefixCache:
    """Least-recently-used prefix KV caches (`capacity` prefixes) for one reasoner, and greedy answers from them.

    Counters: `prefills` prefix forwards run (one per batch of equal-length new prefixes) and `prefix_tokens`
    the tokens they read; `misses` new prefixes, `hits` prompts that found theirs; `uncached` prompts sent to
    plain generation.
    """

    def __init__(self, reasoner: "Reasoner", capacity: int = 32):
        self._store: LRU[bytes, Prefix] = LRU(capacity, "PrefixCache")
        self.reasoner = reasoner
        self.capacity = capacity
        self._vision_end = single_token_id(reasoner.tokenizer, VISION_END_TOKEN)
        self.prefills = self.prefix_tokens = self.hits = self.misses = self.uncached = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    # -- prompts ----------------------------------------------------------------------------------------

    def _encode(self, index: int, messages: Messages) -> Optional[_Prompt]:
        """The prompt with its prefix (everything up to the image's `<|vision_end|>`) marked, or None when it
        has no cacheable prefix (not exactly one image)."""
        images = image_parts(messages)
        if len(images) != 1:
            return None
        sample = self.reasoner.processor.encode_one(messages, add_generation_prompt=True)
        ids = sample["input_ids"]
        ends = (ids[0] == self._vision_end).nonzero().flatten().tolist()
        if len(ends) != 1:
            return None
        length = ends[0] + 1
        if bool(sample["mm_token_type_ids"][0, length:].any()):
            return None
        with torch.no_grad():
            positions, _ = self.reasoner.model.model.get_rope_index(ids, sample["mm_token_type_ids"],
                                                                    image_grid_thw=sample["image_grid_thw"])
        digest = hashlib.blake2b(ids[0, :length].numpy().tobytes(), digest_size=16)
        digest.update(image_key(images[0]))
        return _Prompt(index, ids, positions, sample["mm_token_type_ids"], sample["pixel_values"],
                       sample["image_grid_thw"], length, digest.digest())

    # -- prefixes ---------------------------------------------------------------------------------------

    def _prefill(self, prompts: Sequence[_Prompt], keep: bool) -> dict[bytes, Prefix]:
        """The prompts' prefixes: found in the store, or run through the model (one batch per prefix length) and,
        with `keep`, stored."""
        found: dict[bytes, Prefix] = {}
        todo: dict[bytes, _Prompt] = {}
        for p in prompts:
            stored = self._store.get(p.key)
            if stored is not None:
                found[p.key] = stored
                self.hits += 1
            elif p.key in todo:
                self.hits += 1  # a second prompt about a source this batch prefills anyway
            else:
                self.misses += 1
                todo[p.key] = p
        groups: dict[int, list[_Prompt]] = defaultdict(list)
        for p in todo.values():
            groups[p.prefix_length].append(p)
        device = self.reasoner.device
        for length, group in groups.items():
            out = self.reasoner.model.model(
                input_ids=torch.cat([p.ids[:, :length] for p in group]).to(device),  # (B, P)
                position_ids=torch.cat([p.positions[:, :, :length] for p in group], dim=1).to(device),  # (3, B, P)
                mm_token_type_ids=torch.cat([p.types[:, :length] for p in group]).to(device),
                pixel_values=torch.cat([p.pixel_values for p in group]).to(device),
                image_grid_thw=torch.cat([p.grid for p in group]).to(device),
                use_cache=True,
            )
            self.prefills += 1
            self.prefix_tokens += length * len(group)
            layers = [(layer.keys, layer.values) for layer in getattr(out, CACHE_KWARG).layers]
            for b, p in enumerate(group):
                found[p.key] = Prefix([(k[b:b + 1], v[b:b + 1]) for k, v in layers], length)
                if keep:
                    self._store.put(p.key, found[p.key])
        return found

    # -- answers ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, conversations: Sequence[Messages], max_new_tokens: int = 64, *, keep: bool = True) -> list[str]:
        """Greedy answers, one per conversation, equal to `Reasoner.generate`'s greedy answers. `keep=False` uses
        stored prefixes but does not store new ones (prompts about images that will not be asked about again)."""
        conversations = list(conversations)
        answers: list[Optional[str]] = [None] * len(conversations)
        encoded = [self._encode(i, c) for i, c in enumerate(conversations)]
        plain = [i for i, p in enumerate(encoded) if p is None]
        if plain:
            self.uncached += len(plain)
            for i, text in zip(plain, self.reasoner.generate([conversations[i] for i in plain], max_new_tokens)):
                answers[i] = text
        cached = [p for p in encoded if p is not None]
        prefixes = self._prefill(cached, keep)
        groups: dict[int, list[_Prompt]] = defaultdict(list)
        for p in cached:
            groups[p.prefix_length].append(p)
        for group in groups.values():
            generated = self._decode(group, [prefixes[p.key] for p in group], max_new_tokens)
            for p, text in zip(group, self.reasoner.decode_answers(generated)):
                answers[p.index] = text
        return answers  # type: ignore[return-value]

    def _processors(self, max_new_tokens: int, prompt_length: int) -> tuple[LogitsProcessorList, set[int], int]:
        """The logits processors, end ids and pad id of `Reasoner.generate`'s greedy call: the model's own
        generation config fills what that call leaves unset (released Qwen2.5-VL sets repetition_penalty 1.05),
        so the cached replies follow the same rules."""
        tok, model = self.reasoner.tokenizer, self.reasoner.model
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        config, _ = model._prepare_generation_config(config)  # transformers' own merge, so it stays theirs
        processors = model._get_logits_processor(config, input_ids_seq_length=prompt_length,
                                                 device=self.reasoner.device)
        eos = config.eos_token_id
        return processors, set(eos if isinstance(eos, (list, tuple)) else [eos]), int(config.pad_token_id)

    def _decode(self, group: Sequence[_Prompt], prefixes: Sequence[Prefix], max_new_tokens: int) -> torch.Tensor:
        """Greedy tokens (B, <= max_new_tokens) for prompts whose prefixes have one length, from the cache."""
        device, model = self.reasoner.device, self.reasoner.model
        rules = [self._processors(max_new_tokens, p.ids.shape[1]) for p in group]
        eos, pad = rules[0][1], rules[0][2]
        length = group[0].prefix_length
        rest = [p.ids.shape[1] - length for p in group]
        width = max(rest)
        cache = DynamicCache(config=model.config.get_text_config())
        for layer, _ in enumerate(prefixes[0].layers):
            cache.update(torch.cat([x.layers[layer][0] for x in prefixes]),
                         torch.cat([x.layers[layer][1] for x in prefixes]), layer)
        # each row: [prefix | padding | role text]; the padding is masked and its positions never read
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        positions = torch.zeros(3, len(group), width, dtype=torch.long)
        mask = torch.ones(len(group), length + width, dtype=torch.long)
        for b, (p, n) in enumerate(zip(group, rest)):
            ids[b, width - n:] = p.ids[0, length:]
            positions[:, b, width - n:] = p.positions[:, 0, length:]
            mask[b, length:length + width - n] = 0
        # the reply continues where the prompt's positions end, on all three axes, as generate's rope_deltas do
        following = torch.stack([p.positions.max() + 1 for p in group]).view(1, -1, 1).expand(3, -1, -1)
        ids, positions, mask, following = ids.to(device), positions.to(device), mask.to(device), following.to(device)
        done = torch.zeros(len(group), dtype=torch.bool, device=device)
        sequences = [p.ids.to(device) for p in group]  # each row's own tokens so far, as its processors see them
        out = []
        for step in range(max_new_tokens):
            cancel.check("reasoner generation")  # a given-up request stops here, token by token
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{CACHE_KWARG: cache}).logits[:, -1].float()  # (B, vocab)
            if len(rules[0][0]):
                logits = torch.cat([processors(seq, logits[b:b + 1])
                                    for b, ((processors, _, _), seq) in enumerate(zip(rules, sequences))])
            token = logits.argmax(dim=-1).masked_fill(done, pad)
            out.append(token)
            sequences = [torch.cat([seq, token[b:b + 1, None]], dim=1) for b, seq in enumerate(sequences)]
            done = done | torch.isin(token, torch.tensor(sorted(eos), device=device))
            if bool(done.all()):
                break
            ids = token[:, None]
            positions = following + step
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(out, dim=1) if out else torch.zeros(len(group), 0, dtype=torch.long)


__all__ = ["Prefix", "PrefixCache"]
