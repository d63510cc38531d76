"""Feature terms and performance-based peer weights against hand computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def authors_attention(features: torch.Tensor) -> torch.Tensor:
    """The authors' at(x), written out: Q = mean over channels of x^2 per position, flattened, divided by its L2 norm."""
    q = (features ** 2).mean(dim=1).reshape(features.shape[0], -1)
    return q / q.pow(2).sum(dim=1, keepdim=True).sqrt()


def block_mean(features: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling of a square map to size x size in blocks (what adaptive pooling does when the sizes divide)."""
    b, c, h, w = features.shape
    return features.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def authors_at_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The authors' at_loss (utils.py), with RepDistiller's and mdistiller's size match: the larger feature map is
    average-pooled to the smaller's side, then the mean over batch and positions of the squared difference."""
    side = min(student.shape[-1], teacher.shape[-1])
    student, teacher = block_mean(student, side), block_mean(teacher, side)
    return ((authors_attention(student) - authors_attention(teacher)) ** 2).mean()


STUDENT_BY_HAND = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])                 # [2, 1, 1, 2]: a_s = [1, 0], [0, 1]
TEACHER_BY_HAND = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]], [[[0.0, 3.0]], [[0.0, 1.0]]]])   # 2 channels
# a_t = [1, 1]/sqrt(2) for sample 0, [0, 1] for sample 1: ||a_s - a_t||_2 = sqrt(2 - sqrt(2)) and 0


def test_attention_transfer_code_form_is_the_mean_over_batch_and_positions_of_squared_differences():
    # ||a_s - a_t||^2 = 2 - sqrt(2) and 0, over B * H * W = 2 * 2 entries
    expected = (2 - math.sqrt(2)) / 4
    loss = attention_transfer_loss(STUDENT_BY_HAND, TEACHER_BY_HAND)              # form "code" is the default
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert attention_transfer_loss(STUDENT_BY_HAND, TEACHER_BY_HAND, form="code").item() == loss.item()


def test_attention_transfer_paper_form_is_the_batch_mean_of_the_norm():
    expected = (math.sqrt(2 - math.sqrt(2)) + 0.0) / 2
    assert attention_transfer_loss(STUDENT_BY_HAND, TEACHER_BY_HAND, form="paper").item() == \
        pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("student_shape, teacher_shape", [
    ((4, 3, 4, 4), (4, 5, 4, 4)),          # equal sizes, other channel counts
    ((4, 3, 8, 8), (4, 6, 4, 4)),          # the student's map is the larger: it is pooled
    ((4, 7, 2, 2), (4, 2, 8, 8)),          # the teacher's map is the larger: it is pooled
])
def test_attention_transfer_code_form_against_the_authors_formula(student_shape, teacher_shape):
    torch.manual_seed(0)
    student = torch.randn(student_shape, requires_grad=True)
    teacher = torch.randn(teacher_shape, requires_grad=True)
    loss = attention_transfer_loss(student, teacher, form="code")
    torch.testing.assert_close(loss, authors_at_loss(student.detach(), teacher.detach()), rtol=1e-5, atol=0)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    if student_shape[-1] != teacher_shape[-1]:
        # the features are pooled, not the attention maps: pooling |f|^2 would give another figure
        side = min(student_shape[-1], teacher_shape[-1])
        def pooled_map(f):
            return F.normalize(F.adaptive_avg_pool2d((f.detach() ** 2).mean(1, keepdim=True), side).flatten(1))
        pooled_maps = (pooled_map(student) - pooled_map(teacher)).pow(2).mean()
        assert abs(pooled_maps.item() - loss.item()) > 1e-4 * loss.item()


@pytest.mark.parametrize("student_shape, teacher_shape", [((4, 3, 4, 4), (4, 5, 4, 4)),
                                                          ((4, 3, 8, 8), (4, 6, 4, 4))])
def test_attention_transfer_paper_form_against_the_norm(student_shape, teacher_shape):
    torch.manual_seed(1)
    student, teacher = torch.randn(student_shape), torch.randn(teacher_shape)
    side = teacher_shape[-1]
    q = (student ** 2).mean(dim=1, keepdim=True)
    a_s = F.normalize(block_mean(q, side).flatten(1)) if student_shape[-1] != side else authors_attention(student)
    expected = (a_s - authors_attention(teacher)).norm(dim=1).mean()
    torch.testing.assert_close(attention_transfer_loss(student, teacher, form="paper"), expected, rtol=1e-5, atol=0)
    if student_shape[-2:] == teacher_shape[-2:]:
        # on maps of one size the two forms differ by the square and the H*W positions: code = mean_b ||d||^2 / (H*W)
        squared = ((a_s - authors_attention(teacher)).norm(dim=1) ** 2).mean() / (side * side)
        torch.testing.assert_close(attention_transfer_loss(student, teacher, form="code"), squared, rtol=1e-5,
                                   atol=0)


def test_attention_transfer_across_sizes_and_its_errors():
    # a constant map gives the uniform attention at any size, in both forms
    big, small = torch.ones(2, 3, 4, 4), torch.ones(2, 5, 2, 2)
    for form in ("code", "paper"):
        assert attention_transfer_loss(big, small, form=form).item() == pytest.approx(0.0, abs=1e-6)
        assert attention_transfer_loss(small, big, form=form).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"feature maps \[B, C, H, W\], got shape \(2, 3\)"):
        attention_map(torch.ones(2, 3))
    with pytest.raises(ValueError, match="form 'norm': one of code, paper"):
        attention_transfer_loss(big, big, form="norm")


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
