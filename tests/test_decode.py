"""Sampling arithmetic, checked against values computed by hand."""

import math

import pytest
import torch

from videoqa.decode import Sampling, logits_to_probs, next_token

LOGITS = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])


def test_temperature_one_is_softmax():
    assert logits_to_probs(LOGITS, 1.0, 0, 1.0)[0].tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05])


def test_top_k_keeps_the_k_likeliest():
    assert logits_to_probs(LOGITS, 1.0, 2, 1.0)[0].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 < 0.7 so the second token is needed; 0.5 + 0.3 = 0.8 >= 0.7 so the third is not.
    assert logits_to_probs(LOGITS, 1.0, 0, 0.7)[0].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert logits_to_probs(LOGITS, 1.0, 0, 0.5)[0].tolist() == pytest.approx([1, 0, 0, 0])


def test_temperature_sharpens():
    # p_i^(1/T) renormalised: T = 0.5 squares the probabilities.
    squares = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    assert logits_to_probs(LOGITS, 0.5, 0, 1.0)[0].tolist() == pytest.approx((squares / squares.sum()).tolist())


def test_greedy_is_argmax():
    assert next_token(LOGITS, Sampling(), None).tolist() == [0]


def test_sampling_draws_from_the_distribution():
    generator = torch.Generator().manual_seed(0)
    draws = [int(next_token(LOGITS, Sampling(temperature=1.0), generator)) for _ in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4) / 4000
    assert frequencies.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
