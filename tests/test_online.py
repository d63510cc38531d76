"""Online distillation (kdcl, pcl, dkel): targets and losses against hand computation, the per-epoch schedules, the EMA
teachers, the Ray runtime against the in-process one with teachers included, resume, and what a run records."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import raydistill
from raydistill.config import load_config
from raydistill.distill.losses import kd_loss
from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint
from raydistill.engine.data import load_run_data
from raydistill.engine.peer import Peer
from raydistill.errors import ConfigError
from raydistill.methods import build_method
from raydistill.models import build_model
from raydistill.models.taps import FeatureTaps
from tests.conftest import tiny_dml
from tests.test_runtime import assert_same_parameters

T = 3.0
RNG = np.random.default_rng(0)
PEER_LOGITS = RNG.normal(size=(3, 4, 5)).astype(np.float32) * 2          # [P, B, C]
EMA_LOGITS = RNG.normal(size=(3, 4, 5)).astype(np.float32) * 2
LABELS = np.array([0, 3, 4, 1])


def method(name, **keys):
    return build_method(load_config(tiny_dml(**{"method.name": name, "train.epochs": 200,
                                                 **{f"method.{k}": v for k, v in keys.items()}})))


def peers_outputs(with_ema=True):
    return [{"logits": PEER_LOGITS[i], **({"ema_logits": EMA_LOGITS[i]} if with_ema else {})} for i in range(3)]


# ---- hand computations, in numpy only ------------------------------------------------------------------------------
def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def kd(student, target, temperature):
    """T^2 * KL(softmax(t/T) || softmax(z/T)), batch mean."""
    p, q = softmax(target / temperature), softmax(student / temperature)
    return temperature ** 2 * (p * (np.log(p) - np.log(q))).sum(-1).mean()


def ce(logits, labels):
    return -np.log(softmax(logits)[np.arange(len(labels)), labels]).mean()


def hand_ensemble(name):
    z = PEER_LOGITS.astype(np.float64)
    if name == "mean_logits":
        return z.mean(0)
    if name == "mean_probs":
        return T * np.log(softmax(z / T).mean(0))
    if name == "minlogit":
        return (z - z[:, np.arange(4), LABELS][..., None]).min(0)
    losses = np.stack([-np.log(softmax(z[k])[np.arange(4), LABELS]) for k in range(3)])   # best: lowest CE
    return z[losses.argmin(0), np.arange(4)]


# ---- targets and losses ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ensemble", ["mean_logits", "mean_probs", "minlogit", "best"])
def test_kdcl_ensemble_target_and_loss(ensemble):
    kdcl = method("kdcl", ensemble=ensemble)
    hyper = kdcl.hyper(0)
    targets = kdcl.targets(hyper, peers_outputs(with_ema=False), [], LABELS)
    assert len(targets) == 3
    for target in targets:                              # one ensemble for every peer
        np.testing.assert_allclose(target["ensemble"], hand_ensemble(ensemble), rtol=1e-5, atol=1e-5)
    z = torch.tensor(PEER_LOGITS[1], requires_grad=True)
    total, terms = kdcl.loss(hyper, {"logits": z}, torch.tensor(LABELS),
                             {k: torch.as_tensor(v) for k, v in targets[1].items()})
    expected = ce(PEER_LOGITS[1], LABELS) + kd(PEER_LOGITS[1], hand_ensemble(ensemble), T)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert terms["kd_ensemble"].item() == pytest.approx(kd(PEER_LOGITS[1], hand_ensemble(ensemble), T), rel=1e-5)


def test_pcl_targets_and_loss():
    pcl = method("pcl", rampup_epochs=10)
    hyper = pcl.hyper(4)
    w = math.exp(-5 * (1 - 4 / 10) ** 2)
    assert hyper["ramp"] == pytest.approx(w) and hyper["temperature"] == T and hyper["alpha"] == 1.0
    targets = pcl.targets(hyper, peers_outputs(), [], LABELS)
    np.testing.assert_allclose(targets[0]["ensemble"], PEER_LOGITS.mean(0), atol=1e-6)
    np.testing.assert_array_equal(targets[0]["teacher_logits"], EMA_LOGITS[[1, 2]])   # the others' EMA teachers
    np.testing.assert_array_equal(targets[2]["teacher_logits"], EMA_LOGITS[[0, 1]])
    z = PEER_LOGITS[0]
    total, terms = pcl.loss(hyper, {"logits": torch.tensor(z)}, torch.tensor(LABELS),
                            {k: torch.as_tensor(v) for k, v in targets[0].items()})
    to_teachers = (kd(z, EMA_LOGITS[1], T) + kd(z, EMA_LOGITS[2], T)) / 2
    expected = ce(z, LABELS) + w * kd(z, PEER_LOGITS.mean(0), T) + w * to_teachers
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert terms["kd_teachers"].item() == pytest.approx(to_teachers, rel=1e-5)


def test_dkel_decoupled_target_and_loss():
    dkel = method("dkel", rampup_epochs=10)
    hyper = dkel.hyper(2)
    w, beta = math.exp(-5 * (1 - 2 / 10) ** 2), math.exp(-0.5 * 2)
    assert hyper["ramp"] == pytest.approx(w) and hyper["beta"] == pytest.approx(beta)
    assert hyper["alpha"] == 1.0                        # decay drives beta here, not alpha
    targets = dkel.targets(hyper, peers_outputs(), [], LABELS)
    np.testing.assert_allclose(targets[1]["decoupled_target"], (EMA_LOGITS[0] + EMA_LOGITS[2]) / 2, atol=1e-6)
    z = PEER_LOGITS[1]
    total, terms = dkel.loss(hyper, {"logits": torch.tensor(z)}, torch.tensor(LABELS),
                             {k: torch.as_tensor(v) for k, v in targets[1].items()})
    decoupled = kd(z, (EMA_LOGITS[0] + EMA_LOGITS[2]) / 2, T)
    individual = (kd(z, EMA_LOGITS[0], T) + kd(z, EMA_LOGITS[2], T)) / 2
    expected = (ce(z, LABELS) + w * kd(z, PEER_LOGITS.mean(0), T) + beta * w * decoupled
                + (1 - beta) * w * individual)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert terms["kd_decoupled"].item() == pytest.approx(decoupled, rel=1e-5)


# ---- schedules per epoch --------------------------------------------------------------------------------------------
def test_ramp_and_beta_per_epoch():
    dkel = method("dkel", rampup_epochs=80)
    for epoch in (0, 1, 40, 79, 80, 150):
        hyper = dkel.hyper(epoch)
        assert hyper["ramp"] == pytest.approx(math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2))
        beta = math.exp(-0.5 * epoch)
        assert hyper["beta"] == pytest.approx(beta if beta >= 0.01 else 0.0)
    assert dkel.hyper(9)["beta"] == pytest.approx(math.exp(-4.5))           # 0.011: still on
    assert dkel.hyper(10)["beta"] == 0.0 and dkel.hyper(10)["ramp"] > 0     # exp(-5) < 0.01: off
    assert method("dkel", decay=0.05).hyper(20)["beta"] == pytest.approx(math.exp(-1.0))


def test_rampup_scales_to_a_short_run_unless_given():
    assert load_config(tiny_dml(**{"method.name": "pcl", "train.epochs": 300})).method.rampup_epochs == 80
    assert load_config(tiny_dml(**{"method.name": "pcl", "train.epochs": 15})).method.rampup_epochs == 6
    given = tiny_dml(**{"method.name": "dkel", "train.epochs": 15, "method.rampup_epochs": 12})
    assert load_config(given).method.rampup_epochs == 12


def test_reference_quirks_give_the_released_schedule():
    quirky, intended = method("dkel", reference_quirks=True, rampup_epochs=80), method("dkel", rampup_epochs=80)
    assert [quirky.hyper(e)["ramp"] for e in (0, 1, 79, 80, 199)] == [0.0, 0.0, 0.0, 0.1, 0.1]
    assert intended.hyper(0)["ramp"] == pytest.approx(math.exp(-5)) and intended.hyper(80)["ramp"] == 1.0
    # the EMA warm-up: the released counter starts at 0 (momentum 0 erases the teacher), ours after the init
    assert quirky.ema_momentum(1) == 0.0 and intended.ema_momentum(1) == 0.5
    assert quirky.ema_momentum(2) == 0.5 and intended.ema_momentum(2) == pytest.approx(2 / 3)
    assert quirky.ema_momentum(10 ** 6) == intended.ema_momentum(10 ** 6) == 0.999


def test_bad_online_keys_are_refused():
    with pytest.raises(ConfigError, match="method.ensemble"):
        load_config(tiny_dml(**{"method.name": "kdcl", "method.ensemble": "median"}))
    with pytest.raises(ConfigError, match="method.ensemble"):
        load_config(tiny_dml(**{"method.name": "kdcl", "method.ensemble": "learned_head"}))
    with pytest.raises(ConfigError, match="not used by method dml"):        # never silently ignored
        load_config(tiny_dml(**{"method.ensemble": "mean_logits"}))
    with pytest.raises(ConfigError, match="method.ema_momentum"):
        load_config(tiny_dml(**{"method.name": "pcl", "method.ema_momentum": 1.0}))
    assert load_config(tiny_dml(**{"method.name": "dkel"})).method.per_peer_views is True


# ---- EMA teachers and feature taps ---------------------------------------------------------------------------------
def make_peer(**keys):
    config = load_config(tiny_dml(**{"method.name": "dkel", **{f"method.{k}": v for k, v in keys.items()}}))
    spec, arrays = load_run_data(config)
    return Peer(0, config, arrays, spec)


def one_step(peer):
    outputs = peer.forward(0, 0)
    fake_others = {"logits": outputs["logits"], "ema_logits": outputs["ema_logits"]}
    targets = peer.method.targets(peer.method.hyper(0), [outputs, fake_others, fake_others], [],
                                  peer.data.labels(0, 0).numpy())[0]
    peer.learn(0, 0, targets)
    return outputs


def test_ema_teacher_init_survives_the_first_update():
    peer = make_peer()
    student0 = {k: v.clone() for k, v in peer.model.state_dict().items()}
    teacher0 = {k: v.clone() for k, v in peer.self_teacher.model.state_dict().items()}
    assert not torch.equal(teacher0["net.fc.weight"], student0["net.fc.weight"])     # 2 CE steps at lr / 100
    moved = (teacher0["net.fc.weight"] - student0["net.fc.weight"]).abs().max().item()
    assert moved < 0.01                                                               # small ones
    one_step(peer)
    student1 = peer.model.state_dict()["net.fc.weight"]
    expected = 0.5 * teacher0["net.fc.weight"] + 0.5 * student1                       # m_1 = 0.5: blended
    torch.testing.assert_close(peer.self_teacher.model.state_dict()["net.fc.weight"], expected)
    assert peer.state_dict()["ema_updates"] == 1


def test_reference_quirks_erase_the_teacher_init_at_the_first_update():
    peer = make_peer(reference_quirks=True)
    one_step(peer)
    for name, value in peer.model.named_parameters():                                 # momentum 0: a copy
        assert torch.equal(peer.self_teacher.model.get_parameter(name), value.detach()), name


def test_ema_teacher_keeps_its_own_batchnorm_statistics():
    config = load_config(tiny_dml(**{"method.name": "pcl", "model.arch": "cnn_small", "model.options": {}}))
    spec, arrays = load_run_data(config)
    peer = Peer(0, config, arrays, spec)
    student_bn, teacher_bn = peer.model.net.layer1[1], peer.self_teacher.model.net.layer1[1]
    outputs = peer.forward(0, 0)
    assert outputs["ema_logits"].shape == outputs["logits"].shape
    assert teacher_bn.num_batches_tracked.item() == 1                 # its own forward in train mode
    torch.testing.assert_close(teacher_bn.running_mean, student_bn.running_mean)   # same view, same weights so far


def test_feature_taps_read_a_module_input_by_path():
    config = load_config(tiny_dml())
    spec, _ = load_run_data(config)
    model = build_model("mlp", spec, hidden=[16])
    taps = FeatureTaps(model, [("net.fc", "input"), ("net.layer1", "output")])
    x = torch.rand(5, *spec.input_shape)
    logits = model(x)
    hidden = model.net.layer1(model.net.flatten((x - model.mean) / model.std))
    torch.testing.assert_close(taps["net.fc"], hidden)
    torch.testing.assert_close(model.net.fc(taps["net.fc"]), logits)
    assert taps.pooled().shape == (5, 32)
    taps.remove()
    with pytest.raises(ConfigError, match="tap"):
        FeatureTaps(model, [("net.head", "output")])


# ---- whole runs -----------------------------------------------------------------------------------------------------
def online(name, **keys):
    return tiny_dml(**{"method.name": name, "train.epochs": 2, **keys})


def all_parameters(run_dir):
    """Each peer's student and EMA teacher state, in one list."""
    state = load_checkpoint(latest_checkpoint(run_dir), 3)
    return [peer["model"] for peer in state["peers"]] + [peer["ema_teacher"] for peer in state["peers"]]


def kd_to_ensemble_over_steps(alpha, steps=20):
    """A kdcl peer's KD to a fixed ensemble target, before each of `steps` learning steps on one batch and after them.
    The other peers' logits are fixed linear functions of the peer's view: a target it can learn, far from its own."""
    config = load_config(tiny_dml(**{"method.name": "kdcl", "method.ensemble": "mean_logits", "method.alpha": alpha,
                                     "train.schedule": "constant"}))
    spec, arrays = load_run_data(config)
    peer = Peer(0, config, arrays, spec)
    x = peer.data.view(0, 0, peer.view_index)
    x = x.reshape(len(x), -1).numpy()
    weights = np.random.default_rng(1).normal(scale=3.0, size=(3, x.shape[1], 10)).astype(np.float32)
    others = [{"logits": (x - x.mean(0)) @ w} for w in weights]
    hyper = peer.method.hyper(0)
    target = peer.method.targets(hyper, others, [], peer.data.labels(0, 0).numpy())[0]
    ensemble = torch.as_tensor(target["ensemble"])
    distances = []
    for _ in range(steps):
        distances.append(kd_loss(peer.forward(0, 0)["logits"], ensemble, hyper["temperature"]).item())
        peer.learn(0, 0, target)
    distances.append(kd_loss(peer.forward(0, 0)["logits"], ensemble, hyper["temperature"]).item())
    return distances


def test_a_kdcl_peer_learns_toward_its_ensemble_through_the_distillation_term():
    """With alpha = 1 the peer's KD to the ensemble falls to well under half in 20 steps; with alpha = 0 (CE alone,
    same steps) it stays where it was: the pull comes from the distillation term."""
    distilled, alone = kd_to_ensemble_over_steps(1.0), kd_to_ensemble_over_steps(0.0)
    assert distilled[0] == alone[0] > 1.0                            # the same peer, far from the target at first
    assert distilled[-1] < 0.5 * distilled[0]
    assert alone[-1] > 0.9 * alone[0]
    assert all(d < a for d, a in zip(distilled[5:], alone[5:]))


def test_kdcl_run_ends_closer_to_its_ensemble_than_without_distillation_and_deploys_a_peer(tmp_path):
    config = online("kdcl", **{"method.ensemble": "best"})
    result = raydistill.train(config, tmp_path / "kdcl", runtime="inprocess", progress=False)
    config["method"]["alpha"] = 0.0
    raydistill.train(config, tmp_path / "alone", runtime="inprocess", progress=False)
    last = [pd.read_parquet(tmp_path / name / "metrics.parquet").query("epoch == 2 and model.str.startswith('peer')")
            .set_index("model")["train_kd_ensemble"] for name in ("kdcl", "alone")]
    assert (last[0] < last[1]).all(), (last[0], last[1])            # every peer, in the run's last epoch
    assert result.summary["deploy"]["kind"] == "peer" and result.summary["ema_teachers"] == []


def test_dkel_run_records_resumes_and_deploys_an_ema_teacher(tmp_path):
    whole = raydistill.train(online("dkel"), tmp_path / "whole", runtime="inprocess", progress=False)
    stopped = tmp_path / "stopped"
    raydistill.train(online("dkel"), stopped, runtime="inprocess", stop_after_epoch=1, progress=False)
    resumed = raydistill.train(resume=stopped, runtime="inprocess", progress=False)
    assert_same_parameters(all_parameters(stopped), all_parameters(whole.run_dir), tol=0.0)   # teachers included

    summary = json.loads((whole.run_dir / "summary.json").read_text())
    assert [t["name"] for t in summary["ema_teachers"]] == ["peer0_ema", "peer1_ema", "peer2_ema"]
    for entry in summary["ema_teachers"]:
        assert {"val_acc", "best_val_acc", "best_epoch", "test_acc", "test_acc_at_best_epoch"} <= set(entry)
    deploy = summary["deploy"]
    best_val = max(t["val_acc"] for t in summary["ema_teachers"])          # chosen on validation, not test
    assert deploy["kind"] == "ema_teacher" and deploy["name"] == f"peer{deploy['index']}_ema"
    assert summary["ema_teachers"][deploy["index"]]["val_acc"] == best_val
    assert resumed.summary["deploy"] == deploy

    metrics = pd.read_parquet(whole.run_dir / "metrics.parquet")
    assert set(metrics.model) == {"peer0", "peer1", "peer2", "peer0_ema", "peer1_ema", "peer2_ema", "ensemble"}
    assert {"ramp", "beta", "temperature", "alpha", "train_kd_decoupled", "train_kd_teachers"} <= set(metrics.columns)
    epoch2 = metrics[metrics.epoch == 2].iloc[0]
    assert epoch2["beta"] == pytest.approx(math.exp(-0.5)) and epoch2["ramp"] == 1.0     # R = 0.4 * 2 epochs

    ema = raydistill.load_model(whole.run_dir)                                  # the deployable model: a teacher
    state = load_checkpoint(latest_checkpoint(whole.run_dir), 3)["peers"][deploy["index"]]["ema_teacher"]
    torch.testing.assert_close(ema.state_dict()["net.fc.weight"], state["net.fc.weight"])

    from raydistill.runtime.reports import Reports

    config = load_config(whole.run_dir)            # epoch_report over the last epoch's record, as Tune reads it
    last = load_checkpoint(latest_checkpoint(whole.run_dir), 3)["loop"]["last"]
    report = Reports(config, build_method(config), None, True).epoch_report(last)
    assert report["val_acc"] == pytest.approx(best_val)
    assert report["peer1_ema_val_acc"] == pytest.approx(summary["ema_teachers"][1]["val_acc"])
