"""Losses checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pneumoscope.train.losses import (BCELoss, FocalLoss, build_loss, class_weights_from_counts, logits_to_probs,
                                      num_outputs)


def test_class_weights_match_the_notebook_values():
    w = class_weights_from_counts([1341, 3875])
    assert w[0] == pytest.approx(5216 / (2 * 1341))  # 1.9448
    assert w[1] == pytest.approx(5216 / (2 * 3875))  # 0.6730
    assert round(w[0], 2) == 1.94 and round(w[1], 2) == 0.67
    with pytest.raises(ValueError):
        class_weights_from_counts([0, 10])


def test_focal_loss_hand_computed():
    # two samples, 2 classes; p_y = softmax(logits)[y]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    p0 = math.exp(2) / (math.exp(2) + 1)
    p1 = 1 / (1 + math.e)
    gamma = 2.0
    expected = (-(1 - p0) ** gamma * math.log(p0) - (1 - p1) ** gamma * math.log(p1)) / 2
    assert float(FocalLoss(gamma=gamma)(logits, y)) == pytest.approx(expected, rel=1e-6)
    # with class weights: each term scaled by w[y]
    w = torch.tensor([3.0, 1.0])
    assert float(FocalLoss(gamma=gamma, weight=w)(logits, y)) == pytest.approx(3 * expected, rel=1e-6)
    # alpha weights the positive class by alpha and the negative by 1 - alpha
    y2 = torch.tensor([1, 1])
    q0, q1 = 1 - p0, 1 - p1  # p(class 1)
    exp2 = (-(1 - q0) ** gamma * math.log(q0) - (1 - q1) ** gamma * math.log(q1)) / 2
    assert float(FocalLoss(gamma=gamma, alpha=0.25)(logits, y2)) == pytest.approx(0.25 * exp2, rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert float(FocalLoss(gamma=0.0)(logits, y)) == pytest.approx(float(ce), rel=1e-6)


def test_weighted_bce_hand_computed():
    logits = torch.tensor([[0.0], [2.0]])
    y = torch.tensor([0, 1])
    w = torch.tensor([1.94, 0.67])
    expected = (1.94 * math.log(2) + 0.67 * math.log(1 + math.exp(-2))) / 2
    assert float(BCELoss(weight=w)(logits, y)) == pytest.approx(expected, rel=1e-6)


def test_sigmoid_focal_single_logit_matches_formula():
    logits, y = torch.tensor([[1.0]]), torch.tensor([1])
    p = 1 / (1 + math.exp(-1))
    expected = -0.25 * (1 - p) ** 2 * math.log(p)
    assert float(FocalLoss(gamma=2.0, alpha=0.25)(logits, y)) == pytest.approx(expected, rel=1e-5)


def test_logits_to_probs_shapes_and_num_outputs():
    p = logits_to_probs(torch.tensor([[0.0], [100.0]]))
    assert p.shape == (2, 2) and torch.allclose(p[0], torch.tensor([0.5, 0.5]))
    assert p[1, 1] > 0.999
    assert num_outputs("bce", 2) == 1 and num_outputs("ce", 2) == 2 and num_outputs("bce", 3) == 3
    assert isinstance(build_loss("ce", class_weights=np.array([1.0, 2.0])), torch.nn.CrossEntropyLoss)
