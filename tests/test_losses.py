"""The KD and DML formulas against hand computation, and the per-epoch weights of a method."""
import math

import numpy as np
import pytest
import torch

from raydistill.config import load_config
from raydistill.distill.losses import kd_loss, pairwise_kl
from raydistill.methods import build_method


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def hand_kd(student, target, temperature):
    """T^2 * mean_b sum_c p_t (log p_t - log p_s), written out in numpy."""
    p_s, p_t = softmax(student / temperature), softmax(target / temperature)
    return temperature ** 2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_computation(temperature):
    student = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    target = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    got = kd_loss(torch.tensor(student), torch.tensor(target), temperature).item()
    assert got == pytest.approx(hand_kd(student, target, temperature), rel=1e-6)


def test_kd_loss_is_zero_toward_itself_and_detaches_the_target():
    z = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    t = torch.tensor([[3.0, 1.0, 0.0]], requires_grad=True)
    assert kd_loss(z, z.detach(), 3.0).item() == pytest.approx(0.0, abs=1e-7)
    kd_loss(z, t, 1.0).backward()
    assert t.grad is None and z.grad is not None


def test_pairwise_kl_is_the_mean_over_ordered_pairs():
    logits = np.random.default_rng(0).normal(size=(3, 4, 5))
    expected = np.mean([hand_kd(logits[i], logits[j], 1.0) for i in range(3) for j in range(3) if i != j])
    assert pairwise_kl(torch.tensor(logits)).item() == pytest.approx(expected, rel=1e-6)


def dml_method(**method):
    config = load_config({"data": {"name": "digits"}, "peers": 3, "method": {"name": "dml", **method}})
    return build_method(config)


def test_dml_targets_hand_each_peer_the_others():
    method = dml_method()
    peers = [{"logits": np.full((2, 3), float(i), np.float32)} for i in range(3)]
    targets = method.targets(method.hyper(0), peers, [], np.zeros(2))
    assert [sorted(t["peer_logits"][:, 0, 0].tolist()) for t in targets] == [[1, 2], [0, 2], [0, 1]]


def test_dml_loss_is_ce_plus_alpha_times_mean_kd():
    method = dml_method(alpha=0.5, temperature=2.0)
    rng = np.random.default_rng(1)
    z, others = rng.normal(size=(4, 3)), rng.normal(size=(2, 4, 3))
    labels = np.array([0, 2, 1, 1])
    total, terms = method.loss(method.hyper(0), {"logits": torch.tensor(z)}, torch.tensor(labels),
                               {"peer_logits": torch.tensor(others)})
    ce = -np.mean(np.log(softmax(z)[np.arange(4), labels]))
    kd = np.mean([hand_kd(z, o, 2.0) for o in others])
    assert terms["task"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert total.item() == pytest.approx(ce + 0.5 * kd, rel=1e-6)


def test_decay_and_complement_weights_per_epoch():
    method = dml_method(alpha=0.8, decay=0.5, ce_weight="complement")
    for epoch in (0, 1, 4):
        hyper = method.hyper(epoch)
        assert hyper["alpha"] == pytest.approx(0.8 * math.exp(-0.5 * epoch))
        assert hyper["ce_weight"] == pytest.approx(1 - hyper["alpha"])


def test_method_defaults_reproduce_the_sources():
    dml = load_config({"method": {"name": "dml"}}).method
    assert (dml.temperature, dml.alpha, dml.ce_weight) == (1.0, 1.0, 1.0)
    from raydistill.methods import method_defaults

    kd = method_defaults("kd")
    assert (kd["temperature"], kd["alpha"], kd["ce_weight"]) == (4.0, 0.9, "complement")
