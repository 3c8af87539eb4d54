"""Rollouts of the reasoner for GRPO: G sampled replies per encoded prompt, and their per-token log-probs.

Sampling is our own loop over the KV cache, not `generate`, so that every random draw comes from the caller's
`torch.Generator`: one uniform per reply per step, turned into a token by the inverse of the softmax's CDF. The
same generator state gives the same rollouts, so a resumed run (its generator state restored) samples what the
uninterrupted run would have. The prompt is run once, its cache repeated G times; the G replies of a prompt then
decode as one batch, all at the same position, a finished reply's later tokens discarded.

Scoring runs [prompt | reply | padding] for the G replies as one right-padded batch with the prompt's own 3-axis
positions and the replies' continuing after them (as `generate`'s rope deltas do), so the log-probs are those
of the distribution the replies were sampled from (same temperature). The reference is the same reasoner with
its LoRA adapter disabled.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

if TYPE_CHECKING:
    from reasonedit.models.reasoner import Reasoner

Prompt = Mapping[str, torch.Tensor]  # `ReasonerProcessor.encode_one`'s output: input_ids (1, T), images' patches
# transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns); 5.23 knows only the old
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters \
    else "past_key_values"


def stop_ids(reasoner: "Reasoner") -> list[int]:
    """Tokens that end a reply: the tokenizer's eos (<|im_end|>) and any the model's generation config names."""
    ids = {int(reasoner.tokenizer.eos_token_id)}
    configured = getattr(reasoner.model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids |= set(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return sorted(ids)


VISION_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def banned_ids(reasoner: "Reasoner") -> list[int]:
    """Tokens a reply may not hold: the image and video placeholders (a reply that held one would make the model
    look for image features it was not given). Sampling never draws them and scoring renormalises without them,
    so the log-probs stay those of the distribution the replies were drawn from."""
    config = reasoner.model.config
    return sorted({int(getattr(config, k)) for k in VISION_TOKENS if getattr(config, k, None) is not None})


def _without(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    return logits.index_fill(-1, banned, float("-inf")) if banned.numel() else logits


def _prompt_tensors(reasoner: "Reasoner", prompt: Prompt) -> dict[str, torch.Tensor]:
    """The prompt on the reasoner's device, with its 3-axis positions (3, 1, T)."""
    if prompt["input_ids"].dim() != 2 or prompt["input_ids"].shape[0] != 1:
        raise ValueError(f"rollout prompts are single encoded conversations (1, T) (ReasonerProcessor.encode_one); "
                         f"got input_ids {tuple(prompt['input_ids'].shape)}")
    if "attention_mask" in prompt and not bool(prompt["attention_mask"].all()):
        raise ValueError("rollout prompt is padded; encode it alone with ReasonerProcessor.encode_one")
    device = reasoner.device
    out = {k: v.to(device) for k, v in prompt.items() if k in ("input_ids", "mm_token_type_ids", "pixel_values",
                                                                "image_grid_thw")}
    if "mm_token_type_ids" not in out:
        out["mm_token_type_ids"] = torch.zeros_like(out["input_ids"], dtype=torch.int32)
    with torch.no_grad():
        positions, _ = reasoner.model.model.get_rope_index(out["input_ids"], out["mm_token_type_ids"],
                                                           image_grid_thw=out.get("image_grid_thw"))
    out["position_ids"] = positions.to(device)  # (3, 1, T)
    return out


def _images(p: dict[str, torch.Tensor], repeats: int) -> dict[str, torch.Tensor]:
    if "pixel_values" not in p:
        return {}
    return {"pixel_values": p["pixel_values"].repeat(repeats, 1),
            "image_grid_thw": p["image_grid_thw"].repeat(repeats, 1)}


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tokens (N,) drawn from softmax(logits / temperature) (N, V) by inverting its CDF at `uniforms` (N,) in [0, 1)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # float64: the CDF's top is 1 up to rounding
    cdf = probs.cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the top, so every u < 1 finds a token
    # the first index whose CDF exceeds u: a zero-probability token is never picked
    return torch.searchsorted(cdf, uniforms.to(cdf).unsqueeze(-1), right=True).squeeze(-1).clamp_max(
        logits.shape[-1] - 1)


@torch.no_grad()
def sample_replies(reasoner: "Reasoner", prompts: Sequence[Prompt], group_size: int, generator: torch.Generator,
                   temperature: float = 1.0, max_new_tokens: int = 256) -> list[torch.Tensor]:
    """`group_size` sampled replies per prompt, prompt by prompt (prompt i's replies at i * G .. i * G + G - 1):
    each a 1-D tensor of token ids ending at its stop token (kept) or after `max_new_tokens`. Every draw comes from
    `generator` (a CPU one works on any device), so the same generator state gives the same replies."""
    if group_size < 1 or max_new_tokens < 1 or not temperature > 0:
        raise ValueError(f"sample_replies: group_size={group_size} and max_new_tokens={max_new_tokens} must be at "
                         f"least 1 and temperature={temperature} positive")
    model, device = reasoner.model, reasoner.device
    stops = torch.tensor(stop_ids(reasoner), device=device)
    banned = torch.tensor(banned_ids(reasoner), dtype=torch.long, device=device)
    replies: list[torch.Tensor] = []
    for prompt in prompts:
        p = _prompt_tensors(reasoner, prompt)
        out = model(input_ids=p["input_ids"], position_ids=p["position_ids"], mm_token_type_ids=p["mm_token_type_ids"],
                    use_cache=True, logits_to_keep=1, **_images(p, 1))
        cache = getattr(out, CACHE_KWARG)
        cache.batch_repeat_interleave(group_size)  # the prompt's keys and values, once per reply
        logits = _without(out.logits[:, -1].float(), banned).expand(group_size, -1)  # (G, V)
        following = p["position_ids"].max() + 1  # replies continue after the prompt on all three axes
        done = torch.zeros(group_size, dtype=torch.bool, device=device)
        lengths = torch.full((group_size,), max_new_tokens, dtype=torch.long, device=device)
        tokens = []
        for step in range(max_new_tokens):
            uniforms = torch.rand(group_size, generator=generator, device=generator.device, dtype=torch.float64)
            token = sample_tokens(logits, uniforms.to(device), temperature)  # (G,)
            tokens.append(token)
            stopped = torch.isin(token, stops) & ~done
            lengths = torch.where(stopped, torch.full_like(lengths, step + 1), lengths)
            done = done | stopped
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            positions = (following + step).view(1, 1, 1).expand(3, group_size, 1)
            logits = _without(model(input_ids=token[:, None], position_ids=positions, use_cache=True,
                                    logits_to_keep=1, **{CACHE_KWARG: cache}).logits[:, -1].float(), banned)
        generated = torch.stack(tokens, dim=1).cpu()  # (G, steps)
        replies += [generated[g, :n] for g, n in enumerate(lengths.tolist())]
    return replies


def pad_replies(replies: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and the mask of real tokens (N, T)."""
    width = max(int(r.numel()) for r in replies)
    ids = torch.full((len(replies), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(replies), width, dtype=torch.bool)
    for i, r in enumerate(replies):
        ids[i, :r.numel()] = r
        mask[i, :r.numel()] = True
    return ids, mask


def reply_logprobs(reasoner: "Reasoner", prompt: Prompt, replies: Sequence[torch.Tensor], *, with_grad: bool = True,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (N, T) of the replies to one prompt under the reasoner as it is now, right-padded (0
    past each reply), and the mask of real tokens (N, T); one forward over the N replies. Float32."""
    if not replies or min(int(r.numel()) for r in replies) < 1:
        raise ValueError("reply_logprobs: needs at least one reply, each of at least one token")
    p = _prompt_tensors(reasoner, prompt)
    device, n = reasoner.device, len(replies)
    ids, mask = pad_replies(replies, int(reasoner.tokenizer.pad_token_id))
    ids, mask = ids.to(device), mask.to(device)
    length, width = p["input_ids"].shape[1], ids.shape[1]
    following = p["position_ids"].max() + 1
    reply_positions = (following + torch.arange(width, device=device)).view(1, 1, width).expand(3, n, width)
    batch = {
        "input_ids": torch.cat([p["input_ids"].expand(n, -1), ids], dim=1),  # (N, P + T)
        "position_ids": torch.cat([p["position_ids"].expand(-1, n, -1), reply_positions], dim=2),  # (3, N, P + T)
        "mm_token_type_ids": torch.cat([p["mm_token_type_ids"].expand(n, -1),
                                        torch.zeros_like(ids, dtype=p["mm_token_type_ids"].dtype)], dim=1),
        "attention_mask": torch.cat([torch.ones(n, length, dtype=torch.long, device=device), mask.long()], dim=1),
        **_images(p, n),
    }
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        # position P - 1 + t predicts reply token t: the last T + 1 positions, the very last dropped
        logits = reasoner.model(**batch, use_cache=False, logits_to_keep=width + 1).logits[:, :-1]  # (N, T, V)
        banned = torch.tensor(banned_ids(reasoner), dtype=torch.long, device=device)
        logp = torch.log_softmax(_without(logits.float(), banned) / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0), mask


@torch.no_grad()
def reference_logprobs(reasoner: "Reasoner", prompt: Prompt, replies: Sequence[torch.Tensor], *,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`reply_logprobs` under the reference model: the reasoner with its LoRA adapter disabled; no gradient."""
    if reasoner.peft_model is None:
        raise ValueError("reference_logprobs: the reasoner has no LoRA adapter to disable; the reference is the "
                         "model before add_lora (call Reasoner.add_lora first)")
    with reasoner.peft_model.disable_adapter():
        return reply_logprobs(reasoner, prompt, replies, with_grad=False, temperature=temperature)


def rollout_logprobs(reasoner: "Reasoner", prompts: Sequence[Prompt], replies: Sequence[torch.Tensor],
                     group_size: int, *, with_grad: bool = True, reference: bool = False,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and mask (B * G, T) of `sample_replies`' output, one forward per prompt, padded to one width."""
    if len(replies) != len(prompts) * group_size:
        raise ValueError(f"rollout_logprobs: {len(replies)} replies for {len(prompts)} prompts of {group_size}")
    score = (lambda p, r: reference_logprobs(reasoner, p, r, temperature=temperature)) if reference else \
        (lambda p, r: reply_logprobs(reasoner, p, r, with_grad=with_grad, temperature=temperature))
    parts = [score(p, replies[i * group_size:(i + 1) * group_size]) for i, p in enumerate(prompts)]
    width = max(lp.shape[1] for lp, _ in parts)
    logp = torch.cat([torch.nn.functional.pad(lp, (0, width - lp.shape[1])) for lp, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in parts])
    return logp, mask


__all__ = ["Prompt", "VISION_TOKENS", "banned_ids", "pad_replies", "reference_logprobs", "reply_logprobs", "rollout_logprobs", "sample_replies",
           "sample_tokens", "stop_ids"]
