"""Feature terms and performance-based peer weights against hand computation."""
import math

import numpy as np
import pytest
import torch

from raydistill.distill.features import attention_map, attention_transfer_loss, hint_loss, peer_alignment_loss
from raydistill.distill.peer_weights import (
    check_peer_weighting,
    performance_peer_weights,
    recent_loss,
    uniform_peer_weights,
)
from raydistill.errors import ConfigError


def test_hint_loss_is_the_mean_squared_difference_and_detaches_the_teacher():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    loss = hint_loss(student, teacher)
    assert loss.item() == pytest.approx((1 + 0 + 4 + 9) / 4)
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * (student - teacher).detach() / 4)
    assert teacher.grad is None


def test_attention_map_by_hand():
    # one sample, two channels, 1x2 map: Q = mean_c f^2 = [(1+9)/2, (4+0)/2] = [5, 2], a = Q / sqrt(29)
    features = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    torch.testing.assert_close(attention_map(features), torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0))
    # p = 1 uses |f|: Q = [2, 1]
    torch.testing.assert_close(attention_map(features, p=1), torch.tensor([[2.0, 1.0]]) / math.sqrt(5.0))


def test_attention_transfer_loss_by_hand_and_across_channel_counts():
    student = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])                 # [2, 1, 1, 2]: a_s = [1, 0], [0, 1]
    teacher = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]], [[[0.0, 3.0]], [[0.0, 1.0]]]])   # 2 channels
    # a_t = [1, 1]/sqrt(2) for sample 0, [0, 1] for sample 1
    expected = (math.dist([1, 0], [1 / math.sqrt(2), 1 / math.sqrt(2)]) + 0.0) / 2
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # a student map of another size is brought to the teacher's: a constant map gives the uniform attention
    big = torch.ones(2, 3, 4, 4)
    small = torch.ones(2, 5, 2, 2)
    assert attention_transfer_loss(big, small).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_transfer_loss(small, big).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"feature maps \[B, C, H, W\], got shape \(2, 3\)"):
        attention_map(torch.ones(2, 3))


def test_peer_alignment_is_the_mean_over_other_peers():
    mine = [torch.zeros(2, 3), torch.ones(2, 3)]
    others = [torch.full((2, 3), 2.0), torch.ones(2, 3)]
    assert peer_alignment_loss(mine, others).item() == pytest.approx((4.0 + 0.0) / 2)
    assert peer_alignment_loss([], []).item() == 0.0
    with pytest.raises(ValueError, match="2 adapted features for 1 peers"):
        peer_alignment_loss(mine, others[:1])


def test_performance_weights_by_hand():
    losses = [1.0, 2.0, 4.0]
    weights = performance_peer_weights(losses)
    mean = 7.0 / 3.0
    # peer 0 (the strongest) splits between peers 1 and 2 by 1/L: 1/2 and 1/4 -> 2/3, 1/3; strength 1/mean
    np.testing.assert_allclose(weights[0], [0.0, (2 / 3) / mean, (1 / 3) / mean])
    # peer 2 (the weakest) takes most, and mostly from peer 0: shares 1 and 1/2 -> 2/3, 1/3; strength 4/mean
    np.testing.assert_allclose(weights[2], [(2 / 3) * 4 / mean, (1 / 3) * 4 / mean, 0.0])
    assert weights[2].sum() > weights[1].sum() > weights[0].sum()
    np.testing.assert_allclose(weights.sum(axis=1).mean(), 1.0)


def test_equal_or_unknown_losses_give_dml_uniform_weights():
    np.testing.assert_allclose(performance_peer_weights([0.7, 0.7, 0.7, 0.7]), uniform_peer_weights(4))
    np.testing.assert_allclose(uniform_peer_weights(3), [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    np.testing.assert_allclose(performance_peer_weights([1.0, float("nan")]), uniform_peer_weights(2))
    np.testing.assert_allclose(performance_peer_weights([0.3]), [[0.0]])
    assert np.isfinite(performance_peer_weights([0.0, 1.0])).all()
    assert recent_loss([5.0, 1.0, 2.0, 3.0]) == pytest.approx(2.0) and recent_loss([]) == math.inf
    assert check_peer_weighting("performance") == "performance"
    with pytest.raises(ConfigError, match="method.peer_weighting"):
        check_peer_weighting("accuracy")
