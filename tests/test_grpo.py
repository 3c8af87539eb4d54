"""GRPO's pieces on hand-computed values, the reasoner's rollouts, and a tiny policy that learns what it is paid for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from reasonedit.config.model import LoraConfig
from reasonedit.config.rl import GRPOConfig
from reasonedit.losses import clipped_surrogate, group_advantages, grpo_loss, k3_kl
from reasonedit.models import prompts
from reasonedit.models.reasoner import Reasoner
from reasonedit.models.rollout import (banned_ids, reference_logprobs, reply_logprobs, rollout_logprobs, sample_replies,
                                       sample_tokens, stop_ids)

SEED = 0
CORPUS = ["make the red circle blue", "move the small green star to row 2, column 3"]
TEXT_PROMPT = [{"role": "user", "content": [{"type": "text", "text": "make the red circle blue"}]}]


def image(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8)


def lora_reasoner(seed: int = SEED, b_std: float = 0.1) -> Reasoner:
    """A tiny reasoner with LoRA whose B is non-zero, so the policy and the reference differ."""
    reasoner = Reasoner.tiny(CORPUS, seed=seed)
    reasoner.add_lora(LoraConfig(rank=4, alpha=8))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        for name, param in reasoner.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=b_std)
    return reasoner


# -- advantages ----------------------------------------------------------------------------------------------------


def test_group_advantages_normalise_each_group_and_zero_an_equal_one():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.3, 0.3, 0.3, 0.3])
    out = group_advantages(rewards, group_size=4)
    z = 1 / math.sqrt(1.25)  # group 1: mean 2.5, population std sqrt(1.25)
    assert out[:4].tolist() == pytest.approx([-1.5 * z, -0.5 * z, 0.5 * z, 1.5 * z], rel=1e-5)
    assert out[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # exactly: no reply is pushed when all score alike
    assert torch.equal(group_advantages(rewards.view(2, 4), 4), out.view(2, 4))


def test_group_advantages_without_scaling_only_centre():
    out = group_advantages(torch.tensor([0.0, 1.0, 5.0, 6.0]), group_size=2, scale="none")
    assert out.tolist() == [-0.5, 0.5, -0.5, 0.5]


def test_group_advantages_refuse_rewards_that_are_not_whole_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), group_size=4, scale="rank")


# -- the clipped objective and the KL ------------------------------------------------------------------------------


def test_clipped_surrogate_hand_values_on_both_sides_and_both_signs():
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 0.9]])
    old = torch.zeros(2, 3)
    logp = ratios.log().requires_grad_()
    adv = torch.tensor([2.0, -1.0])
    loss, ratio, active = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # A = 2: 1.5 is clipped to 1.28 (min(3, 2.56)); 0.5 stays (min(1, 1.6)); 1.1 is inside
    # A = -1: 1.5 stays (min(-1.5, -1.28)); 0.5 is clipped to 0.8 (min(-0.5, -0.8)); 0.9 is inside
    torch.testing.assert_close(loss, torch.tensor([[-2.56, -1.0, -2.2], [1.5, 0.8, 0.9]]))
    torch.testing.assert_close(ratio, ratios)
    assert active.tolist() == [[True, False, False], [False, True, False]]
    loss.sum().backward()
    # d loss / d logp = -A * ratio where the unclipped term is the min, 0 where the clip took over
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.0, -2.2], [1.5, 0.0, 0.9]]))


def test_k3_kl_hand_values():
    logp = torch.zeros(3)
    ref = torch.tensor([0.0, math.log(2.0), -1.0])
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.0, 1 - math.log(2.0), math.exp(-1.0)], rel=1e-6)


def test_k3_kl_estimates_kl_from_policy_to_reference():
    policy, ref = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    draws = torch.multinomial(policy, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(policy.log()[draws], ref.log()[draws]).mean().item()
    exact = float((policy * (policy / ref).log()).sum())  # KL(policy || ref) = 0.535; the reverse is 0.632
    assert estimate == pytest.approx(exact, abs=0.01)


def test_grpo_loss_sequence_and_token_means_with_kl_and_padding():
    logp = torch.tensor([[-1.0, 7.0, 7.0], [-2.0, -1.0, -3.0]], requires_grad=True)  # reply 1 has one token
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, -1.0])
    ref = logp.detach() + torch.tensor([[0.0, 9.0, 9.0], [math.log(2.0)] * 3])  # k3 = 1 - ln 2 on reply 2
    k = 1 - math.log(2.0)
    seq, stats = grpo_loss(logp, adv, mask, ref_logp=ref, beta=0.1, loss_mean="sequence")
    assert seq.item() == pytest.approx((-1.0 + (1.0 + 0.1 * k)) / 2, rel=1e-5)  # each reply's mean, then replies
    tok, _ = grpo_loss(logp, adv, mask, ref_logp=ref, beta=0.1, loss_mean="token")
    assert tok.item() == pytest.approx((-1.0 + 3 * (1.0 + 0.1 * k)) / 4, rel=1e-5)  # every token alike
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["clip_fraction"].item() == 0.0
    assert stats["kl"].item() == pytest.approx(3 * k / 4, rel=1e-5)  # padding's huge k3 is not counted
    seq.backward()
    # on-policy (old_logp = logp detached): the policy gradient -A / length per token, plus beta's KL gradient
    # d k3 / d logp = 1 - exp(ref - logp) = -1, each over the reply's length and the 2 replies
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0, 0.0], [(1.0 - 0.1) / 3 / 2] * 3]))


def test_grpo_loss_counts_the_clipped_tokens_and_needs_the_reference_for_kl():
    logp = torch.log(torch.tensor([[1.5, 1.0]]))
    _, stats = grpo_loss(logp, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), old_logp=torch.zeros(1, 2))
    assert stats["clip_fraction"].item() == 0.5 and stats["ratio"].item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), beta=0.1)


@pytest.mark.parametrize("key, value", [("group_size", 1), ("clip_low", 1.0), ("clip_low", 0.0), ("clip_high", -0.1),
                                        ("beta", -1.0), ("temperature", 0.0), ("max_new_tokens", 0),
                                        ("loss_mean", "batch")])
def test_grpo_config_names_the_bad_key(key, value):
    GRPOConfig().validate()
    with pytest.raises(ValueError, match=rf"^rl\.{key}:"):
        GRPOConfig(**{key: value}).validate()


# -- rollouts ------------------------------------------------------------------------------------------------------


def test_sample_tokens_inverts_the_cdf_and_never_picks_an_impossible_token():
    logits = torch.tensor([0.2, 0.0, 0.5, 0.3]).log().expand(5, -1)  # CDF 0.2, 0.2, 0.7, 1.0
    u = torch.tensor([0.1, 0.2, 0.69, 0.71, 0.999999])
    assert sample_tokens(logits, u, temperature=1.0).tolist() == [0, 2, 2, 3, 3]


def test_sample_replies_are_reproducible_from_the_generator_and_stop_at_eos():
    reasoner = lora_reasoner()
    prompt = reasoner.processor.encode_one(prompts.think(image(), "make the red circle blue"))
    state = torch.get_rng_state()
    first = sample_replies(reasoner, [prompt, prompt], 4, torch.Generator().manual_seed(3), max_new_tokens=6)
    again = sample_replies(reasoner, [prompt, prompt], 4, torch.Generator().manual_seed(3), max_new_tokens=6)
    other = sample_replies(reasoner, [prompt, prompt], 4, torch.Generator().manual_seed(4), max_new_tokens=6)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    assert len(first) == 8 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # the second prompt's group draws on from the generator, not from the first's state again
    assert not all(torch.equal(a, b) for a, b in zip(first[:4], first[4:]))
    stops = set(stop_ids(reasoner))
    for reply in first:
        ids = reply.tolist()
        assert not stops & set(ids[:-1]) and (ids[-1] in stops or len(ids) == 6)


def test_near_greedy_rollouts_of_an_image_prompt_are_transformers_greedy_replies():
    reasoner = lora_reasoner()
    prompt = reasoner.processor.encode_one(prompts.think(image(), "make the red circle blue"))
    replies = sample_replies(reasoner, [prompt], 3, torch.Generator().manual_seed(0), temperature=1e-6,
                             max_new_tokens=8)
    tok = reasoner.tokenizer
    # rollouts never draw an image placeholder: greedy decoding is told the same (suppress_tokens)
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=stop_ids(reasoner),
                              pad_token_id=tok.pad_token_id, suppress_tokens=banned_ids(reasoner))
    with torch.no_grad():
        greedy = reasoner.model.generate(**prompt, generation_config=config)[0, prompt["input_ids"].shape[1]:]
    for reply in replies:  # the cached decode's positions (image's 3-axis rope) are generate's
        assert reply.tolist() == greedy[:reply.numel()].tolist() and reply.numel() == greedy.numel()


def test_reply_logprobs_are_those_of_the_distribution_the_replies_were_sampled_from(monkeypatch):
    import reasonedit.models.rollout as rollout

    reasoner = lora_reasoner()
    prompt = reasoner.processor.encode_one(prompts.think(image(), "make the red circle blue"))
    seen = []  # the sampler's logits (G, V), step by step

    def recording(logits, uniforms, temperature):
        seen.append(logits.clone())
        return sample_tokens(logits, uniforms, temperature)

    monkeypatch.setattr(rollout, "sample_tokens", recording)
    replies = sample_replies(reasoner, [prompt], 4, torch.Generator().manual_seed(2), temperature=0.7,
                             max_new_tokens=6)
    logp, mask = reply_logprobs(reasoner, prompt, replies, with_grad=False, temperature=0.7)
    sampled = torch.log_softmax(torch.stack(seen, dim=1) / 0.7, dim=-1)  # (G, steps, V)
    for g, reply in enumerate(replies):
        expected = sampled[g, :reply.numel()].gather(-1, reply[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[g, :reply.numel()], expected, atol=1e-4, rtol=1e-4)


def test_reply_logprobs_of_a_padded_group_are_each_reply_scored_alone():
    reasoner = lora_reasoner()
    prompt = reasoner.processor.encode_one(prompts.think(image(), "make the red circle blue"))
    eos = reasoner.tokenizer.eos_token_id
    replies = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10]), torch.tensor([11, 12, eos])]
    logp, mask = reply_logprobs(reasoner, prompt, replies)
    assert logp.shape == (3, 5) and mask.sum(dim=1).tolist() == [5, 1, 3]
    assert logp.requires_grad and bool((logp[~mask] == 0).all())
    n = prompt["input_ids"].shape[1]
    for i, reply in enumerate(replies):
        ids = torch.cat([prompt["input_ids"], reply[None]], dim=1)
        types = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(reply[None], dtype=torch.int32)], dim=1)
        with torch.no_grad():
            logits = reasoner.model(input_ids=ids, mm_token_type_ids=types, pixel_values=prompt["pixel_values"],
                                    image_grid_thw=prompt["image_grid_thw"]).logits[0, n - 1:-1]
        logits[:, banned_ids(reasoner)] = float("-inf")  # replies never hold an image placeholder
        alone = torch.log_softmax(logits.float(), dim=-1).gather(-1, reply[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[i, :reply.numel()].detach(), alone, atol=1e-5, rtol=1e-5)


def test_reference_logprobs_are_the_model_without_its_adapter():
    reasoner = Reasoner.tiny(CORPUS, seed=SEED)
    prompt = reasoner.processor.encode_one(TEXT_PROMPT)
    replies = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    base, _ = reply_logprobs(reasoner, prompt, replies, with_grad=False)
    with pytest.raises(ValueError, match="add_lora"):
        reference_logprobs(reasoner, prompt, replies)
    reasoner = lora_reasoner()
    ref, _ = reference_logprobs(reasoner, prompt, replies)
    policy, _ = reply_logprobs(reasoner, prompt, replies)
    assert not ref.requires_grad and policy.requires_grad
    torch.testing.assert_close(ref, base)
    assert (ref - policy).abs().max() > 1e-3  # the adapter matters, and is back on after the reference


# -- learning ------------------------------------------------------------------------------------------------------

EOS_LOGIT = 5.0  # the stop token's logit at the prompt's mean hidden state: replies of ~5 of 12 tokens at first
MAX_NEW = 12
GROUP = 8


def length_policy() -> tuple[Reasoner, dict]:
    """A tiny reasoner that stops often enough for length to vary: a random model gives <|im_end|> about 1 / V,
    so every reply would run to the cap; its output row is pointed along the prompt's mean final hidden state."""
    reasoner = Reasoner.tiny(CORPUS, seed=SEED)
    prompt = reasoner.processor.encode_one(TEXT_PROMPT)
    with torch.no_grad():
        hidden = reasoner.model(**prompt, output_hidden_states=True).hidden_states[-1][0].mean(dim=0)  # (hidden,)
        reasoner.model.get_output_embeddings().weight[reasoner.tokenizer.eos_token_id] = \
            EOS_LOGIT * hidden / hidden.norm() ** 2
    reasoner.add_lora(LoraConfig(rank=4, alpha=8))
    return reasoner, prompt


def mean_length(reasoner: Reasoner, prompt: dict) -> float:
    replies = sample_replies(reasoner, [prompt], 64, torch.Generator().manual_seed(123), max_new_tokens=MAX_NEW)
    return sum(r.numel() for r in replies) / len(replies)


def train_on_length(sign: float, steps: int = 8) -> tuple[float, float]:
    """GRPO on reward = sign * reply length; (mean length before, after)."""
    torch.manual_seed(SEED)
    reasoner, prompt = length_policy()
    before = mean_length(reasoner, prompt)
    config = GRPOConfig(group_size=GROUP, beta=0.01, max_new_tokens=MAX_NEW)
    optimiser = torch.optim.AdamW(list(reasoner.trainable_parameters()), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        replies = sample_replies(reasoner, [prompt], config.group_size, generator, config.temperature,
                                 config.max_new_tokens)
        rewards = sign * torch.tensor([float(r.numel()) for r in replies])
        advantages = group_advantages(rewards, config.group_size)
        old, _ = rollout_logprobs(reasoner, [prompt], replies, config.group_size, with_grad=False)
        ref, _ = rollout_logprobs(reasoner, [prompt], replies, config.group_size, reference=True)
        for _ in range(2):  # two updates per batch of rollouts, so the ratio and its clip take part
            logp, mask = rollout_logprobs(reasoner, [prompt], replies, config.group_size)
            loss, _ = grpo_loss(logp, advantages, mask, old_logp=old, ref_logp=ref, clip_low=config.clip_low,
                                clip_high=config.clip_high, beta=config.beta, loss_mean=config.loss_mean)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return before, mean_length(reasoner, prompt)


def test_grpo_rewarded_for_length_lengthens_its_replies():
    before, after = train_on_length(+1.0)
    assert 3.0 < before < 8.0  # lengths vary at the start: there is something to learn either way
    assert after > before + 3.0, (before, after)


def test_grpo_with_the_advantage_sign_flipped_shortens_its_replies():
    before, after = train_on_length(-1.0)
    assert after < before - 2.0, (before, after)


def test_rollouts_never_draw_an_image_placeholder_and_score_without_it():
    """A reply holding <|image_pad|> would make the model look for image features it was not given: sampling
    masks the placeholders out, and scoring renormalises without them, so the two distributions stay one."""
    reasoner = Reasoner.tiny(CORPUS, seed=SEED)
    prompt = reasoner.processor.encode_one(TEXT_PROMPT)
    banned = banned_ids(reasoner)
    assert reasoner.model.config.image_token_id in banned
    with torch.no_grad():  # make the image placeholder the likeliest next token everywhere near the prompt
        hidden = reasoner.model(**prompt, output_hidden_states=True).hidden_states[-1][0].mean(dim=0)
        reasoner.model.get_output_embeddings().weight[reasoner.model.config.image_token_id] = \
            20.0 * hidden / hidden.norm() ** 2
    reasoner.add_lora(LoraConfig(rank=4, alpha=8))
    replies = sample_replies(reasoner, [prompt], 16, torch.Generator().manual_seed(0), max_new_tokens=6)
    assert not any(set(r.tolist()) & set(banned) for r in replies)
    logp, mask = reply_logprobs(reasoner, prompt, replies, with_grad=False)
    assert torch.isfinite(logp[mask]).all()
    # without the mask the placeholder would take almost all the mass, so each drawn token's log-prob is far lower
    with torch.no_grad():
        logits = reasoner.model(**prompt).logits[0, -1].float()
    raw = torch.log_softmax(logits, -1)[replies[0][0]]
    assert float(logp[0, 0]) > float(raw) + 5.0



def test_a_merged_adapter_is_the_base_a_fresh_adapter_starts_from():
    """The rl stage's reference: the start model's LoRA folded into the base, a fresh LoRA on top; the model computes
    what it did with the old adapter, and with the fresh one (B = 0) or with it disabled, the same again."""
    reasoner = lora_reasoner()
    prompt = reasoner.processor.encode_one(TEXT_PROMPT)
    with torch.no_grad():
        before = reasoner.model(**prompt).logits
        with reasoner.peft_model.disable_adapter():
            base = reasoner.model(**prompt).logits
    assert not torch.allclose(before, base, atol=1e-4)  # the adapter does something
    reasoner.merge_lora()
    assert reasoner.peft_model is None and not any("lora_" in n for n, _ in reasoner.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reasoner.model(**prompt).logits, before, atol=1e-5, rtol=1e-5)
    reasoner.add_lora(LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        fresh = reasoner.model(**prompt).logits
        with reasoner.peft_model.disable_adapter():
            reference = reasoner.model(**prompt).logits
    torch.testing.assert_close(fresh, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, before, atol=1e-5, rtol=1e-5)
