"""The distillation math against hand computation: ensembles, decoupled targets, ramps and schedules, EMA teachers."""

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from raydistill.distill.ema import ema_momentum, ema_update_, reference_quirk_ema_momentum
from raydistill.distill.ensembles import (
    best_peer,
    ensemble,
    mean_logits,
    mean_probs,
    minlogit,
    others_mean,
)
from raydistill.distill.schedules import (
    constant,
    cosine,
    decayed_alpha,
    decoupled_beta,
    exponential,
    linear,
    make_schedule,
    reference_quirk_rampup,
    sigmoid_rampup,
    warmup_hold,
)
from raydistill.errors import ConfigError

# two peers, two samples, three classes
PEER_A = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
PEER_B = torch.tensor([[3.0, 0.0, 1.0], [2.0, 2.0, 0.0]])
LABELS = torch.tensor([0, 2])


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- ensembles


def test_mean_logits_averages_over_peers_from_a_list_or_a_stack():
    expected = [[2.0, 1.0, 2.0], [1.0, 1.0, 2.0]]
    close(mean_logits([PEER_A, PEER_B]), expected)
    close(mean_logits(torch.stack([PEER_A, PEER_B])), expected)


def test_mean_logits_is_the_mean_prediction_for_regression():
    predictions = torch.tensor([[[1.0], [4.0]], [[3.0], [0.0]], [[2.0], [2.0]]])  # [P=3, B=2, K=1]
    close(mean_logits(predictions), [[2.0], [2.0]])


def test_mean_probs_by_hand_at_temperature_one():
    # softmax([0, 0]) = [1/2, 1/2], softmax([log 3, 0]) = [3/4, 1/4]; their mean is [5/8, 3/8]
    peers = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]], dtype=torch.float64)
    result = mean_probs(peers)
    close(result, [[math.log(5 / 8), math.log(3 / 8)]])
    close(torch.softmax(result, dim=-1), [[5 / 8, 3 / 8]])


def test_mean_probs_against_numpy_and_softens_back_to_the_mean_probability():
    temperature = 3.0
    peers = torch.stack([PEER_A, PEER_B]).double()
    z = peers.numpy() / temperature
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    mean = probs.mean(axis=0)
    result = mean_probs(peers, temperature)
    close(result, temperature * np.log(mean))
    # what KD at temperature T sees: softmax(e / T) is the mean of the peers' softened probabilities
    close(torch.softmax(result / temperature, dim=-1), mean)


def test_minlogit_shifts_each_peer_to_a_zero_target_logit_then_takes_the_minimum():
    peer_a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    peer_b = torch.tensor([[0.0, 2.0, 5.0], [2.0, 2.0, 0.0]])
    labels = torch.tensor([1, 2])
    # sample 0, y=1: a -> [-1, 0, 1], b -> [-2, 0, 3]: min [-2, 0, 1] (class 0 from b, class 2 from a)
    # sample 1, y=2: a -> [-4, -4, 0], b -> [2, 2, 0]: min [-4, -4, 0]
    result = minlogit([peer_a, peer_b], labels)
    close(result, [[-2.0, 0.0, 1.0], [-4.0, -4.0, 0.0]])
    close(result.gather(1, labels[:, None]), [[0.0], [0.0]])


def test_best_peer_picks_per_sample_the_peer_with_lowest_cross_entropy():
    # sample 0 (y=0): peer B puts its largest logit on class 0; sample 1 (y=2): peer A does
    result = best_peer([PEER_A, PEER_B], LABELS)
    close(result, [[3.0, 0.0, 1.0], [0.0, 0.0, 4.0]])


def test_best_peer_against_numpy_cross_entropy_with_three_peers():
    generator = torch.Generator().manual_seed(0)
    peers = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1])
    z = peers.numpy()
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    losses = -log_probs[:, np.arange(5), labels.numpy()]  # [P, B]
    winners = losses.argmin(axis=0)
    close(best_peer(peers, labels), z[winners, np.arange(5)])


def test_ensemble_dispatches_by_name_and_rejects_unknown_names():
    peers = [PEER_A, PEER_B]
    close(ensemble("mean_logits", peers, LABELS), mean_logits(peers))
    close(ensemble("mean_probs", peers, LABELS, temperature=2.0), mean_probs(peers, 2.0))
    close(ensemble("minlogit", peers, LABELS), minlogit(peers, LABELS))
    close(ensemble("best", peers, LABELS), best_peer(peers, LABELS))
    with pytest.raises(ConfigError, match=r"^method\.ensemble='median': one of: ") as error:
        ensemble("median", peers, LABELS)
    assert error.value.field == "method.ensemble"
    assert "minlogit" in str(error.value)


def test_others_mean_with_two_peers_is_the_other_peer():
    result = others_mean([PEER_A, PEER_B])
    assert result.shape == (2, 2, 3)
    close(result[0], PEER_B)
    close(result[1], PEER_A)


def test_others_mean_with_three_peers_by_hand():
    peers = torch.tensor([[[1.0, 4.0]], [[3.0, 0.0]], [[5.0, 2.0]]])  # [P=3, B=1, C=2]
    expected = [[[4.0, 1.0]], [[3.0, 3.0]], [[2.0, 2.0]]]
    close(others_mean(peers), expected)


def test_others_mean_needs_two_peers():
    with pytest.raises(ValueError, match="others_mean needs at least 2 peers, got 1"):
        others_mean([PEER_A])


# ---------------------------------------------------------------- ramps and decays


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(80, 80) == pytest.approx(1.0)
    assert sigmoid_rampup(200, 80) == pytest.approx(1.0)
    assert sigmoid_rampup(40, 80, w_max=2.0) == pytest.approx(2.0 * math.exp(-1.25))
    assert sigmoid_rampup(0, 0, w_max=3.0) == 3.0


def test_reference_quirk_rampup_is_off_then_a_constant_tenth():
    assert reference_quirk_rampup(0, 80) == 0.0
    assert reference_quirk_rampup(79, 80) == 0.0
    assert reference_quirk_rampup(80, 80) == pytest.approx(0.1)
    assert reference_quirk_rampup(100, 80) == pytest.approx(0.1)
    assert reference_quirk_rampup(100, 80, w_max=2.0) == pytest.approx(0.2)


def test_decoupled_beta_decays_then_drops_to_zero_below_the_floor():
    assert decoupled_beta(0, 0.5) == 1.0
    assert decoupled_beta(2, 0.5) == pytest.approx(math.exp(-1.0))
    assert decoupled_beta(9, 0.5) == pytest.approx(math.exp(-4.5))  # 0.0111, above 0.01
    assert decoupled_beta(10, 0.5) == 0.0  # exp(-5) = 0.0067, below 0.01
    assert decoupled_beta(10, 0.5, floor=0.001) == pytest.approx(math.exp(-5.0))


def test_decayed_alpha():
    assert decayed_alpha(0.9, 2, 0.5) == pytest.approx(0.9 * math.exp(-1.0))
    assert decayed_alpha(0.9, 50, 0.0) == 0.9


# ---------------------------------------------------------------- schedules


def test_schedule_shapes_at_a_few_epochs():
    assert constant(2.5)(7) == 2.5
    ramp = linear(4.0, 1.0, 10)
    assert [ramp(e) for e in (0, 5, 10, 20)] == pytest.approx([4.0, 2.5, 1.0, 1.0])
    anneal = cosine(4.0, 1.0, 10)
    assert [anneal(e) for e in (0, 5, 10, 20)] == pytest.approx([4.0, 2.5, 1.0, 1.0])
    assert anneal(2.5) == pytest.approx(1.0 + 1.5 * (1.0 + math.sqrt(0.5)))
    assert exponential(2.0, 0.1)(10) == pytest.approx(2.0 * math.exp(-1.0))
    assert [warmup_hold(e, 3) for e in (0, 2, 3, 9)] == [0.0, 0.0, 1.0, 1.0]


def test_make_schedule_from_numbers_and_defaults():
    assert make_schedule(4, 1.0, "method.temperature")(3, 10) == 4.0
    assert make_schedule(None, 0.9, "method.alpha")(3, 10) == 0.9
    assert make_schedule(None, {"kind": "linear", "start": 1, "end": 0}, "method.alpha")(5, 10) == pytest.approx(0.5)


def test_make_schedule_from_mappings():
    over_run = make_schedule({"kind": "linear", "start": 4, "end": 1}, 1.0, "method.temperature")
    assert over_run(0, 30) == pytest.approx(4.0)
    assert over_run(15, 30) == pytest.approx(2.5)
    own_length = make_schedule({"kind": "cosine", "start": 4, "end": 1, "epochs": 10}, 1.0, "method.temperature")
    assert own_length(5, 100) == pytest.approx(2.5)
    assert own_length(50, 100) == pytest.approx(1.0)
    decaying = make_schedule({"kind": "exponential", "start": 1, "decay": 0.5}, 1.0, "method.alpha")
    assert decaying(2, 10) == pytest.approx(math.exp(-1.0))
    held = make_schedule({"kind": "constant", "value": 0.7, "warmup_epochs": 3}, 1.0, "method.alpha")
    assert [held(e, 10) for e in (0, 2, 3, 8)] == pytest.approx([0.0, 0.0, 0.7, 0.7])
    # warmup keeps the run's epoch clock: at epoch 5 a 10-epoch ramp is half done
    warm_ramp = make_schedule({"kind": "linear", "start": 0, "end": 1, "epochs": 10, "warmup_epochs": 2}, 0, "x")
    assert [warm_ramp(e) for e in (1, 5)] == pytest.approx([0.0, 0.5])


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "step", "start": 1}, "method.alpha.kind"),
        ({"start": 1, "end": 0}, "method.alpha.kind"),
        ({"kind": "linear", "start": 1, "end": 0, "decay": 0.1}, "method.alpha.decay"),
        ({"kind": "exponential", "start": 1}, "method.alpha.decay"),
        ({"kind": "linear", "start": "high", "end": 0}, "method.alpha.start"),
        ({"kind": "constant", "value": True}, "method.alpha.value"),
        ({"kind": "constant", "value": 1, "warmup_epochs": -1}, "method.alpha.warmup_epochs"),
        ("high", "method.alpha"),
        (float("nan"), "method.alpha"),
    ],
)
def test_make_schedule_rejects_bad_specs_naming_the_field(spec, field):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}=") as error:
        make_schedule(spec, 1.0, "method.alpha")
    assert error.value.field == field


def test_make_schedule_needs_a_length_for_linear_without_epochs():
    schedule = make_schedule({"kind": "linear", "start": 1, "end": 0}, 1.0, "method.alpha")
    with pytest.raises(ConfigError, match=r"^method\.alpha\.epochs=None: required for kind linear") as error:
        schedule(3)
    assert error.value.field == "method.alpha.epochs"


# ---------------------------------------------------------------- EMA teachers


def _network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_momentum_warms_up_from_one_half_and_caps_at_the_momentum():
    assert ema_momentum(1, 0.999) == 0.5
    assert ema_momentum(2, 0.999) == pytest.approx(2 / 3)
    assert ema_momentum(10_000, 0.999) == 0.999
    with pytest.raises(ValueError, match="ema step counts updates from 1, got 0"):
        ema_momentum(0, 0.999)


def test_ema_update_two_steps_with_warmup_momentum_against_manual_computation():
    student = _network(0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():  # the teacher's init differs from the student (the DKEL init steps)
        for parameter in teacher.parameters():
            parameter.add_(0.25)
        teacher[1].running_mean.fill_(7.0)
        teacher[1].num_batches_tracked.fill_(3)
    teacher_buffers = {name: buffer.clone() for name, buffer in teacher.named_buffers()}
    expected = {name: parameter.detach().clone() for name, parameter in teacher.named_parameters()}

    for step in (1, 2):
        with torch.no_grad():  # the student moves between EMA updates
            for parameter in student.parameters():
                parameter.mul_(1.5).add_(0.1 * step)
        momentum = ema_momentum(step, 0.999)
        for name, parameter in student.named_parameters():
            expected[name] = momentum * expected[name] + (1 - momentum) * parameter.detach()
        ema_update_(teacher, student, momentum)

    for name, parameter in teacher.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name])
        assert parameter.grad is None
    # buffers are the teacher's own: running statistics and counters are not copied from the student
    for name, buffer in teacher.named_buffers():
        assert torch.equal(buffer, teacher_buffers[name]), name
    assert not torch.equal(teacher[1].running_mean, student[1].running_mean)


def test_quirk_momentum_at_step_zero_overwrites_the_teacher_with_the_student():
    assert reference_quirk_ema_momentum(0, 0.999) == 0.0
    assert reference_quirk_ema_momentum(1, 0.999) == 0.5
    student = _network(0)
    teacher = _network(1)
    ema_update_(teacher, student, reference_quirk_ema_momentum(0, 0.999))
    for (name, teacher_param), student_param in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(teacher_param, student_param), name


def test_ema_update_rejects_a_different_architecture():
    with pytest.raises(ValueError, match=r"ema parameter weight: teacher \(2, 3\) != student \(4, 3\)"):
        ema_update_(nn.Linear(3, 2), nn.Linear(3, 4), 0.5)
    with pytest.raises(ValueError, match="ema teacher and student have different parameters"):
        ema_update_(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), 0.5)
