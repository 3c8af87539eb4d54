"""Losses on hand-computed values, and the normalisation that weighs every token the same."""

import math

import pytest
import torch

from reasonedit.losses import (FlowMatchingConfig, LossSum, flow_matching_loss, global_count, joint_loss,
                               next_token_loss, normalise, resolution_mu, sample_timesteps, shift_timesteps,
                               timestep_weights)


def test_next_token_loss_sums_answer_tokens_only():
    # vocab 2; uniform logits give log(2) per labelled token
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, -100, 1, 0]])  # positions 1 and 2 predict labels 1 and 0
    out = next_token_loss(logits, labels)
    assert out.count.item() == 2
    assert out.sum.item() == pytest.approx(2 * math.log(2))


def test_next_token_loss_hand_value():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0]])  # position 0 predicts 0: -log(e^2 / (e^2 + 1))
    out = next_token_loss(logits, labels)
    assert out.sum.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6) and out.count.item() == 1


def test_flow_matching_loss_is_per_token_mean_over_channels():
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    target = torch.zeros(3, 2)
    out = flow_matching_loss(pred, target)
    assert out.sum.item() == pytest.approx(1.0 + 0.0 + 2.0) and out.count.item() == 3
    weighted = flow_matching_loss(pred, target, torch.tensor([0.5, 1.0, 2.0]))
    assert weighted.sum.item() == pytest.approx(0.5 + 4.0)


def test_resolution_mu_runs_from_base_to_max():
    cfg = FlowMatchingConfig()
    assert resolution_mu(256, cfg).item() == pytest.approx(0.5)
    assert resolution_mu(8192, cfg).item() == pytest.approx(0.9)
    assert resolution_mu((256 + 8192) / 2, cfg).item() == pytest.approx(0.7)


def test_exponential_shift_hand_value():
    # s = 0.5, mu = ln 3: 3 / (3 + 1) = 0.75
    assert shift_timesteps(torch.tensor([0.5]), torch.tensor(math.log(3))).item() == pytest.approx(0.75)


def test_timesteps_are_shifted_toward_noise_for_larger_images():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    small = sample_timesteps([256] * 64, FlowMatchingConfig(), g1)
    large = sample_timesteps([8192] * 64, FlowMatchingConfig(), g2)
    assert ((small > 0) & (small < 1)).all() and (large > small).all()


def test_cosmap_weight_hand_value():
    assert timestep_weights(torch.tensor([0.5]), "cosmap").item() == pytest.approx(2 / (math.pi * 0.5))


def test_joint_loss_weights_next_token():
    assert joint_loss(torch.tensor(2.0), torch.tensor(10.0), 0.1).item() == pytest.approx(3.0)


def test_normalise_weighs_every_token_the_same_across_micro_steps():
    # two micro-batches of 1 and 3 tokens: the step's loss is the mean over 4 tokens, not the mean of means
    a, b = LossSum(torch.tensor(4.0), torch.tensor(1.0)), LossSum(torch.tensor(6.0), torch.tensor(3.0))
    count = global_count([a.count, b.count])
    total = normalise(a.sum, count) + normalise(b.sum, count)
    assert count.item() == 4 and total.item() == pytest.approx(10 / 4)


def test_normalise_undoes_the_ranks_gradient_mean():
    assert normalise(torch.tensor(3.0), 6, world_size=2).item() == pytest.approx(1.0)


def test_normalise_of_an_empty_step_is_zero():
    x = torch.tensor(2.0, requires_grad=True)
    out = normalise(x * 3, 0)
    out.backward()
    assert out.item() == 0 and x.grad.item() == 0
