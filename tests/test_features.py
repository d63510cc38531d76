"""Features, teachers and heterogeneous peers: hint taps, fitnet one- and two-stage, heterogeneous dml through Ray
against the in-process run, regression on diabetes, the teacher cache in a run, self-distillation, schedules, and
the training options (gradient clipping, accumulation)."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import raydistill
from raydistill.config import load_config
from raydistill.distill.features import attention_transfer_loss
from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint
from raydistill.engine.coordinator import Coordinator
from raydistill.engine.data import load_run_data
from raydistill.engine.peer import Peer
from raydistill.engine.teacher import Teacher
from raydistill.errors import ConfigError
from raydistill.methods import build_method
from tests.conftest import tiny_dml
from tests.test_runtime import assert_same_parameters, final_parameters

REGRESSION = {"task": "regression", "data": {"name": "diabetes"}, "model": {"arch": "mlp", "options": {"hidden": [32]}},
              "train": {"epochs": 6, "batch_size": 32, "lr": 0.003, "optimizer": "adam", "weight_decay": 0.0}}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A cnn_small teacher on digits, trained by raydistill for one epoch."""
    config = tiny_dml(**{"method.name": "independent", "peers": 1, "model.arch": "cnn_small", "model.options": {},
                         "train.lr": 0.1})
    return raydistill.train(config, tmp_path_factory.mktemp("teacher") / "run", runtime="inprocess", progress=False)


def fitnet_config(teacher_run, **overrides) -> dict:
    return tiny_dml(**{"method.name": "fitnet", "peers": 1,
                       "teacher": {"arch": "cnn_small", "checkpoint": str(teacher_run.run_dir)}, **overrides})


def engine(config: dict):
    resolved = load_config(config)
    spec, arrays = load_run_data(resolved)
    return resolved, spec, arrays


# ---- taps and what leaves an actor --------------------------------------------------------------------------------
def test_teacher_sends_its_hint_only_when_the_method_needs_it(teacher_run):
    config, spec, arrays = engine(fitnet_config(teacher_run, **{"method.features": {"teacher": "layer2"}}))
    teacher = Teacher(0, config, arrays, spec)
    outputs = teacher.forward(0, 1)
    assert teacher.hint.path == "net.layer2"
    x = teacher.data.view(0, 1, 0)
    net = teacher.model.net
    with torch.no_grad():
        layer2 = net.layer2(net.pool(net.layer1((x - teacher.model.mean) / teacher.model.std)))
    assert outputs["hint"].shape == (1, 128, 64, 8, 8)
    np.testing.assert_allclose(outputs["hint"][0], layer2.numpy(), rtol=1e-5, atol=1e-6)
    kd_config, _, _ = engine(fitnet_config(teacher_run, **{"method.name": "kd"}))
    assert set(Teacher(0, kd_config, arrays, spec).forward(0, 1)) == {"logits"}


def test_peer_hint_is_the_middle_stage_and_the_adapter_is_the_students(teacher_run):
    config, spec, arrays = engine(fitnet_config(teacher_run, peers=[{"arch": "resnet20", "options": {}}]))
    peer = Peer(0, config, arrays, spec)
    assert peer.hint.path == "net.layer2" and peer.hint.shape == (32, 4, 4)
    assert set(peer.adapters) == {"teacher"}
    assert isinstance(peer.adapters["teacher"][-1], torch.nn.BatchNorm2d)          # 1x1 conv + BN toward 64 x 8 x 8
    optimized = {id(p) for group in peer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in peer.adapters.parameters())
    assert set(peer.forward(0, 0)) == {"logits"}                                   # the student's hint stays home
    with pytest.raises(ConfigError, match="method.features.student='layer9'"):
        Peer(0, load_config(fitnet_config(teacher_run, **{"method.features": {"student": "layer9"}})), arrays, spec)
    with pytest.raises(ConfigError, match="method.at_weight"):          # an mlp's hint is a vector, not a map
        Peer(0, load_config(fitnet_config(teacher_run, **{"method.at_weight": 1.0})), arrays, spec)


# ---- fitnet --------------------------------------------------------------------------------------------------------
def test_fitnet_loss_by_hand():
    method = build_method(_fitnet_resolved(kd_weight=0.5))
    hyper = method.hyper(0)
    assert (hyper["hint_weight"], hyper["kd_weight"], hyper["ce_weight"], hyper["alpha"]) == (100.0, 0.5, 1.0, 1.0)
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(4, 10), torch.randn(4, 10)
    adapted, teacher_hint = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([0, 1, 2, 3])
    loss, terms = method.loss(hyper, {"logits": logits, "hint": adapted, "adapted_hint": adapted}, labels,
                              {"teacher_logits": teacher_logits, "teacher_hint": teacher_hint})
    t = 4.0
    kd = t * t * F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="batchmean")
    expected = F.cross_entropy(logits, labels) + 100 * ((adapted - teacher_hint) ** 2).mean() + 0.5 * kd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["hint"].item() == pytest.approx(((adapted - teacher_hint) ** 2).mean().item(), rel=1e-6)


def _fitnet_resolved(**keys):
    """A resolved fitnet config without a teacher checkpoint (the method's pure functions need none)."""
    config = load_config(tiny_dml(**{"method.name": "dml", "train.epochs": 4}))
    method_config = dataclasses.replace(config.method, name="fitnet", temperature=4.0, alpha=1.0, ce_weight=1.0,
                                        hint_weight=100.0, kd_weight=0.0, at_weight=0.0, at_form="code",
                                        hint_epochs=0, features={})
    for key, value in keys.items():
        setattr(method_config, key, value)
    return dataclasses.replace(config, method=method_config)


def test_fitnet_two_stage_weights_per_epoch():
    method = build_method(_fitnet_resolved(hint_epochs=2))
    stages = [(h["ce_weight"], h["hint_weight"], h["kd_weight"]) for h in map(method.hyper, range(4))]
    assert stages == [(0.0, 100.0, 0.0), (0.0, 100.0, 0.0), (1.0, 0.0, 1.0), (1.0, 0.0, 1.0)]


def test_fitnet_hint_stage_trains_the_layers_below_the_hint_only(teacher_run, tmp_path):
    """Two-stage fitnet, all epochs in the hint stage: the head above the hint layer gets no gradient, the stages
    below it and the adapter do, and the hint loss falls."""
    config = fitnet_config(teacher_run, **{"method.hint_epochs": 2, "train.epochs": 2,
                                           "peers": [{"arch": "cnn_small", "options": {}}]})
    result = raydistill.train(config, tmp_path / "run", runtime="inprocess", progress=False)
    resolved, spec, arrays = engine(config)
    initial = Peer(0, resolved, arrays, spec).model.state_dict()
    final = final_parameters(result.run_dir, 1)[0]
    assert torch.equal(final["net.fc.weight"], initial["net.fc.weight"])
    assert torch.equal(final["net.layer3.0.weight"], initial["net.layer3.0.weight"])
    assert not torch.equal(final["net.layer1.0.weight"], initial["net.layer1.0.weight"])
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet")
    hint = metrics.loc[metrics.model == "peer0", "train_hint"].tolist()
    assert hint[1] < hint[0]


def test_fitnet_one_stage_with_attention_transfer_runs_heterogeneous(teacher_run, tmp_path):
    config = fitnet_config(teacher_run, **{"method.at_weight": 10.0, "peers": [{"arch": "resnet20", "options": {}}]})
    result = raydistill.train(config, tmp_path / "run", runtime="inprocess", progress=False)
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet").query("model == 'peer0'").iloc[0]
    assert metrics["hint_weight"] == 100.0 and metrics["train_hint"] > 0 and metrics["train_at"] > 0
    assert result.summary["teachers"][0]["arch"] == "cnn_small"


def test_attention_transfer_sums_its_layer_pairs_and_averages_the_teachers_by_hand():
    """AT = (1/M) sum_j sum_k at_loss(f_s^k, f_t^jk), at_weight 1000 on it; without pairs it is the hint pair's."""
    torch.manual_seed(0)
    logits, teacher_logits, labels = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    student_maps = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4), torch.randn(4, 7, 2, 2)]
    teachers_maps = [[torch.randn(4, 6, 8, 8), torch.randn(4, 2, 8, 8), torch.randn(4, 4, 4, 4)] for _ in range(2)]
    hint, teacher_hint = torch.randn(4, 6), torch.randn(4, 6)
    outputs = {"logits": logits, "hint": hint, "adapted_hint": [hint, hint], "attention": student_maps}
    targets = {"teacher_logits": teacher_logits, "teacher_hint": [teacher_hint, teacher_hint],
               "teacher_attention": teachers_maps}
    method = build_method(_fitnet_resolved(at_weight=1000.0, hint_weight=0.0,
                                           features={"attention": ["layer1", "layer2", "layer3"]}))
    loss, terms = method.loss(method.hyper(0), outputs, labels, targets)
    sums = [sum(attention_transfer_loss(s, t, form="code") for s, t in zip(student_maps, maps))
            for maps in teachers_maps]
    assert terms["at"].item() == pytest.approx((sums[0] + sums[1]).item() / 2, rel=1e-6)
    assert loss.item() == pytest.approx((F.cross_entropy(logits, labels) + 1000 * terms["at"]).item(), rel=1e-6)
    paper = build_method(_fitnet_resolved(at_weight=1.0, at_form="paper", features={"attention": ["a", "b", "c"]}))
    _, terms = paper.loss(paper.hyper(0), {**outputs, "adapted_hint": hint},
                          labels, {**targets, "teacher_hint": teacher_hint, "teacher_attention": teachers_maps[:1]})
    expected = sum(attention_transfer_loss(s, t, form="paper") for s, t in zip(student_maps, teachers_maps[0]))
    assert terms["at"].item() == pytest.approx(expected.item(), rel=1e-6)
    # no pairs named: one pair, the hint pair, exactly as a one-pair config always computed it
    on_hints = build_method(_fitnet_resolved(at_weight=1000.0))
    maps = {"logits": logits, "hint": student_maps[0], "adapted_hint": torch.randn(4, 6, 8, 8)}
    _, terms = on_hints.loss(on_hints.hyper(0), maps, labels, {"teacher_logits": teacher_logits,
                                                               "teacher_hint": teachers_maps[0][0]})
    assert torch.equal(terms["at"], attention_transfer_loss(student_maps[0], teachers_maps[0][0]))
    assert on_hints.outputs_needed("teacher") == ("logits", "hint")
    assert method.outputs_needed("teacher") == ("logits", "hint", "attention0", "attention1", "attention2")


def test_teacher_sends_and_peer_taps_each_attention_pair(teacher_run, tmp_path):
    pairs = ["layer1", {"student": "layer2", "teacher": "layer3"}]
    config, spec, arrays = engine(fitnet_config(teacher_run, **{
        "peers": [{"arch": "resnet20", "options": {}}], "method.at_weight": 1000.0,
        "method.features": {"attention": pairs}, "teacher.cache": str(tmp_path / "cache")}))
    teacher = Teacher(0, config, arrays, spec)
    outputs = teacher.live_forward(0, 1)
    assert teacher.hint.attention_paths == ["net.layer1", "net.layer3"]
    assert {name: tuple(v.shape) for name, v in outputs.items() if name.startswith("attention")} == \
        {"attention0": (1, 128, 32, 8, 8), "attention1": (1, 128, 128, 8, 8)}
    assert teacher.cache.key["attention_layers"] == ["net.layer1", "net.layer3"]   # another pair, another cache
    np.testing.assert_array_equal(teacher.forward(0, 1)["attention1"], outputs["attention1"].numpy())
    peer = Peer(0, config, arrays, spec)
    assert peer.hint.attention_paths == ["net.layer1", "net.layer2"]
    peer.forward(0, 1)
    _, _, logits, _, tapped = peer._pending
    student = peer.student_outputs(logits, tapped)
    assert [tuple(f.shape[1:]) for f in student["attention"]] == [(16, 8, 8), (32, 4, 4)]
    method = build_method(config)
    target = method.targets(method.hyper(0), [{}], [outputs], None)[0]
    assert [tuple(f.shape) for f in target["teacher_attention"][0]] == [(128, 32, 8, 8), (128, 128, 8, 8)]


@pytest.mark.parametrize("keys, message", [
    ({"method.at_form": "norm"}, "method.at_form='norm': code (the authors' released at_loss"),
    ({"method.at_weight": 0.0}, "method.features.attention=['layer1']: layer pairs of attention transfer: only with "
                                "method.at_weight > 0"),
    ({"method.features": {"attention": "layer1"}}, "method.features.attention='layer1': a list of layer pairs"),
    ({"method.features": {"attention": []}}, "method.features.attention=[]: a list of layer pairs"),
    ({"method.features": {"attention": [{"student": "layer1"}]}},
     "method.features.attention.0={'student': 'layer1'}: a module path for both networks, or {student: PATH, "
     "teacher: PATH or a list of one per teacher}"),
    ({"method.features": {"attention": ["layer1", 3]}}, "method.features.attention.1=3: a module path"),
    ({"method.hint_epochs": 2}, "method.at_weight=1000.0: 0 with method.hint_epochs > 0"),
])
def test_attention_transfer_config_is_refused_in_one_line(teacher_run, keys, message):
    config = fitnet_config(teacher_run, **{"method.at_weight": 1000.0, "method.features": {"attention": ["layer1"]},
                                           **keys})
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_attention_layers_are_found_and_must_be_maps(teacher_run):
    """Before Ray starts, each teacher's layers (check_teachers); in the peer, the student's; the field named."""
    from raydistill.engine.teacher import check_teachers

    def built(pairs, **keys):
        return engine(fitnet_config(teacher_run, **{"method.at_weight": 1000.0,
                                                    "method.features": {"attention": pairs}, **keys}))

    config, spec, arrays = built([{"student": "layer1", "teacher": "block9"}])
    with pytest.raises(ConfigError, match=r"^method.features.attention.0.teacher='block9': a module path of"):
        check_teachers(config, spec)
    config, spec, arrays = built(["layer1", "layer9"], peers=[{"arch": "cnn_small", "options": {}}])
    with pytest.raises(ConfigError, match=r"^method.features.attention.1='layer9': a module path of the model"):
        Peer(0, config, arrays, spec)
    config, spec, arrays = built([{"student": "fc", "teacher": "layer2"}], peers=[{"arch": "cnn_small",
                                                                                  "options": {}}])
    with pytest.raises(ConfigError, match=r"^method.features.attention.0.student='fc': a layer whose output is a "
                                          r"feature map \[C, H, W\] .*net.fc gives \(10,\)"):
        Peer(0, config, arrays, spec)
    config, spec, arrays = built([{"student": "layer1", "teacher": ["layer1", "layer2"]}])
    with pytest.raises(ConfigError, match=r"^method.features.attention.0.teacher=\['layer1', 'layer2'\]: one module "
                                          r"path for every teacher, or a list of 1"):
        check_teachers(config, spec)
    dml = load_config(tiny_dml(**{"method.feature_weight": 0.5, "method.features": {"attention": ["layer1"]}}))
    _, spec, arrays = engine(tiny_dml())
    with pytest.raises(ConfigError, match=r"^method.features.attention=\['layer1'\]: .*only with method.at_weight"):
        Peer(0, dml, arrays, spec)


# ---- regression ----------------------------------------------------------------------------------------------------
def test_regression_dml_on_diabetes_beats_the_mean_and_reports_mse_mae_r2(tmp_path):
    result = raydistill.train({**REGRESSION, "name": "dml-diabetes", "peers": 2, "method": {"name": "dml"}},
                              tmp_path / "run", runtime="inprocess", progress=False)
    for peer in result.summary["peers"]:
        assert peer["test_mse"] < 0.8               # standardized targets: predicting the mean scores about 1
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert {"test_mse", "test_mae", "test_r2", "train_kd"} <= set(metrics.columns)
    row = metrics[metrics.model == "peer0"].iloc[-1]
    assert row["test_r2"] > 0.2 and row["train_kd"] > 0


def performance_coordinator(val_offsets):
    """A regression dml coordinator with performance weights, after one validation pass in which peer i predicted
    every validation target off by val_offsets[i]: its validation MSE is val_offsets[i] ** 2."""
    config, spec, arrays = engine({**REGRESSION, "peers": len(val_offsets),
                                   "method": {"name": "dml", "peer_weighting": "performance"}})
    coordinator = Coordinator(config, arrays, spec)
    val_y = arrays["val_y"].reshape(-1, 1)
    coordinator.evaluate("val", *[{"logits": val_y + offset} for offset in val_offsets])
    return coordinator, config, arrays


def test_performance_weights_reach_each_peers_targets_from_the_validation_losses():
    """Validation MSEs 0.25, 1 and 4 (hand-computed weights below): the weakest peer takes the most, and every peer
    takes more from a stronger peer than from a weaker one; DML's uniform weights (1/2 each) satisfy neither."""
    coordinator, config, arrays = performance_coordinator([0.5, 1.0, 2.0])
    assert coordinator.val_losses == [[pytest.approx(0.25)], [pytest.approx(1.0)],
                                      [pytest.approx(4.0)]]
    batch = np.random.default_rng(0).normal(size=(3, config.train.batch_size, 1)).astype(np.float32)
    targets = coordinator.targets(0, 0, *[{"logits": batch[i]} for i in range(3)])
    mean = (0.25 + 1 + 4) / 3
    # W[i, j] = (L_i / mean L) * (1/L_j) / sum_{k != i} 1/L_k, over the other peers j in order
    expected = [[0.25 / mean * 1 / (1 + 1 / 4), 0.25 / mean * (1 / 4) / (1 + 1 / 4)],
                [1 / mean * 4 / (4 + 1 / 4), 1 / mean * (1 / 4) / (4 + 1 / 4)],
                [4 / mean * 4 / (4 + 1), 4 / mean * 1 / (4 + 1)]]
    for i, target in enumerate(targets):
        np.testing.assert_allclose(target["peer_weights"], expected[i], rtol=1e-5)
        np.testing.assert_array_equal(target["peer_logits"], np.delete(batch, i, axis=0))
    weights = [target["peer_weights"] for target in targets]
    assert weights[2].sum() > weights[1].sum() > weights[0].sum()          # the weaker, the more it distils
    assert weights[0][0] > weights[0][1] and weights[2][0] > weights[2][1]   # from the stronger peer above all

    # the peer's loss sums its distillation terms with these weights, not DML's mean
    method = build_method(config)
    hyper = method.hyper(0)
    labels = torch.from_numpy(arrays["train_y"][:config.train.batch_size])
    z = torch.from_numpy(batch[2])
    _, terms = method.loss(hyper, {"logits": z}, labels, {k: torch.as_tensor(v) for k, v in targets[2].items()})
    by_hand = sum(w * ((batch[2] - other) ** 2).mean() for w, other in zip(expected[2], batch[:2]))
    assert terms["kd"].item() == pytest.approx(by_hand, rel=1e-5)
    uniform = sum(((batch[2] - other) ** 2).mean() for other in batch[:2]) / 2
    assert abs(by_hand - uniform) > 0.1 * uniform


def test_performance_weighting_in_a_run_starts_as_dml_and_departs_from_it_once_validation_losses_exist(tmp_path):
    """Epoch 1 has no validation loss yet (uniform weights: DML exactly); from epoch 2 the weights follow the peers'
    recorded validation MSEs, which the coordinator keeps in its checkpoint."""
    def run(weighting):
        config = {**REGRESSION, "name": weighting, "peers": 2, "train": {**REGRESSION["train"], "epochs": 2},
                  "method": {"name": "dml", "peer_weighting": weighting}}
        return raydistill.train(config, tmp_path / weighting, runtime="inprocess", progress=False)

    weighted, uniform = run("performance"), run("uniform")
    first_epoch = [[p["model"] for p in load_checkpoint(r.run_dir / "checkpoints" / "epoch_0001", 2)["peers"]]
                   for r in (weighted, uniform)]
    assert_same_parameters(*first_epoch, tol=0.0)
    weighted_final, uniform_final = final_parameters(weighted.run_dir, 2), final_parameters(uniform.run_dir, 2)
    # the same first epoch bit for bit, so any difference after the second comes from the weights
    assert any(not torch.equal(weighted_final[i][k], uniform_final[i][k]) for i in (0, 1) for k in uniform_final[i])
    metrics = pd.read_parquet(weighted.run_dir / "metrics.parquet")
    recorded = [metrics[metrics.model == f"peer{i}"].sort_values("epoch")["val_mse"].tolist() for i in (0, 1)]
    coordinator = load_checkpoint(latest_checkpoint(weighted.run_dir), 2)["coordinator"]
    np.testing.assert_allclose(coordinator["val_losses"], recorded, rtol=1e-6)


def test_regression_self_distillation_beats_the_mean_and_deploys_its_student(tmp_path):
    self_run = raydistill.train({**REGRESSION, "name": "s", "peers": 1, "method": {"name": "self",
                                                                                   "hidden_weight": 1.0}},
                                tmp_path / "s", runtime="inprocess", progress=False)
    assert self_run.summary["peers"][0]["test_mse"] < 0.8
    assert self_run.summary["deploy"]["kind"] == "peer"
    with pytest.raises(ConfigError, match="task='classification'"):
        raydistill.train({**REGRESSION, "task": "classification", "peers": 1, "method": {"name": "independent"}},
                         tmp_path / "bad", runtime="inprocess", progress=False)


# ---- the teacher cache in a run --------------------------------------------------------------------------------------
def test_kd_with_a_cached_teacher_trains_exactly_as_with_the_live_teacher(teacher_run, tmp_path):
    config = tiny_dml(**{"method.name": "kd", "peers": 2, "method.per_peer_views": True,
                         "teacher": {"arch": "cnn_small", "checkpoint": str(teacher_run.run_dir)}})
    live = raydistill.train(config, tmp_path / "live", runtime="inprocess", progress=False)
    config["teacher"]["cache"] = str(tmp_path / "cache")
    cached = raydistill.train(config, tmp_path / "cached", runtime="inprocess", progress=False)
    assert (tmp_path / "cache" / "teacher0" / "epoch_0000.parquet").is_file()
    assert_same_parameters(final_parameters(cached.run_dir, 2), final_parameters(live.run_dir, 2), tol=0.0)
    config["teacher"]["cache"] = True                  # the cache in the run directory, through the Ray runtime
    in_run = raydistill.train(config, tmp_path / "in_run", progress=False)
    assert (in_run.run_dir / "teacher_cache" / "teacher0" / "epoch_0000.parquet").is_file()
    assert_same_parameters(final_parameters(in_run.run_dir, 2), final_parameters(live.run_dir, 2), tol=0.0)


# ---- self-distillation ---------------------------------------------------------------------------------------------
def test_born_again_generations_restart_the_student_under_the_previous_one(tmp_path):
    config = tiny_dml(**{"method.name": "self", "peers": 1, "method.generations": 2, "train.epochs": 2})
    resolved, spec, arrays = engine(config)
    peer = Peer(0, resolved, arrays, spec)
    for step in range(peer.data.steps_per_epoch):
        peer.forward(0, step)
        peer.learn(0, step, {})
    trained = {k: v.clone() for k, v in peer.model.state_dict().items()}
    assert peer.method.hyper(0)["alpha"] == 0.0 and peer.self_teacher.snapshot is None
    peer.forward(1, 0)                               # generation 2 starts: the trained student becomes the teacher
    assert peer.self_teacher.generation == 1 and peer.method.hyper(1)["alpha"] == 1.0
    for key, value in peer.self_teacher.snapshot.state_dict().items():
        assert torch.equal(value, trained[key])
    torch.manual_seed(0)
    assert not torch.equal(peer.model.state_dict()["net.fc.weight"], trained["net.fc.weight"])   # a fresh student
    assert set(peer.local_targets) == {"teacher_logits"}
    metrics = peer.learn(1, 0, {}).host()
    assert metrics["kd"] > 0
    # the state carries the generation and its teacher, so a rollback or resume continues the same generation
    state = peer.state_dict()
    again = Peer(0, resolved, arrays, spec)
    again.load_state_dict(state)
    assert again.self_teacher.generation == 1 and torch.equal(again.self_teacher.snapshot.state_dict()["net.fc.weight"],
                                                 trained["net.fc.weight"])


def test_a_self_teachers_logits_stay_in_the_actor():
    """The EMA teacher of `self` teaches locally: its logits never go to the coordinator (pcl's do: its targets read them)."""
    resolved, spec, arrays = engine(tiny_dml(**{"method.name": "self", "peers": 1}))
    peer = Peer(0, resolved, arrays, spec)
    assert peer.self_teacher.model is not None and set(peer.forward(0, 0)) == {"logits"}
    assert set(peer.local_targets) == {"teacher_logits"}
    resolved, spec, arrays = engine(tiny_dml(**{"method.name": "pcl"}))
    assert set(Peer(0, resolved, arrays, spec).forward(0, 0)) == {"logits", "ema_logits"}


def test_self_teacher_must_differ_from_the_student():
    with pytest.raises(ConfigError, match="method.ema_momentum"):
        load_config(tiny_dml(**{"method.name": "self", "method.ema_momentum": 0.0}))
    with pytest.raises(ConfigError, match="teacher="):
        load_config(tiny_dml(**{"method.name": "self", "teacher": {"arch": "mlp", "checkpoint": "x"}}))
    with pytest.raises(ConfigError, match="method.generations"):
        load_config(tiny_dml(**{"method.name": "self", "method.generations": 3, "train.epochs": 2}))


def test_self_ema_distills_output_and_hidden_layer(tmp_path):
    config = tiny_dml(**{"method.name": "self", "peers": 1, "method.hidden_weight": 1.0, "train.epochs": 1})
    result = raydistill.train(config, tmp_path / "run", runtime="inprocess", progress=False)
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet").query("model == 'peer0'").iloc[0]
    assert metrics["train_kd"] > 0 and metrics["train_hidden"] > 0
    assert result.summary["ema_teachers"][0]["name"] == "peer0_ema"


# ---- schedules -----------------------------------------------------------------------------------------------------
def test_temperature_and_alpha_schedules_per_epoch():
    config = load_config(tiny_dml(**{"train.epochs": 4,
                                      "method.temperature": {"kind": "linear", "start": 4.0, "end": 1.0},
                                      "method.alpha": {"kind": "exponential", "start": 1.0, "decay": 0.5,
                                                       "warmup_epochs": 1}}))
    method = build_method(config)
    temperatures = [method.hyper(e)["temperature"] for e in range(5)]
    alphas = [method.hyper(e)["alpha"] for e in range(4)]
    assert temperatures == pytest.approx([4.0, 3.25, 2.5, 1.75, 1.0])
    assert alphas == pytest.approx([0.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)])
    cosine = build_method(load_config(tiny_dml(**{"train.epochs": 2, "method.temperature":
                                                  {"kind": "cosine", "start": 3.0, "end": 1.0, "epochs": 2}})))
    assert [cosine.hyper(e)["temperature"] for e in range(3)] == pytest.approx([3.0, 2.0, 1.0])
    with pytest.raises(ConfigError, match="method.temperature"):
        load_config(tiny_dml(**{"train.epochs": 4,
                                "method.temperature": {"kind": "linear", "start": 4.0, "end": 0.0, "epochs": 2}}))
    with pytest.raises(ConfigError, match="method.alpha.kind"):
        load_config(tiny_dml(**{"method.alpha": {"kind": "step"}}))


# ---- training options ----------------------------------------------------------------------------------------------
def _independent(**overrides):
    config = tiny_dml(**{"method.name": "independent", "peers": 1, "data.crop_pad": 0, "data.flip": False,
                         "train.schedule": "constant", **overrides})
    return engine(config)


def test_accumulating_two_half_batches_equals_one_full_batch():
    config, spec, arrays = _independent(**{"train.batch_size": 128})
    full = Peer(0, config, arrays, spec)
    config, spec, arrays = _independent(**{"train.batch_size": 64, "train.accumulate_steps": 2})
    half = Peer(0, config, arrays, spec)
    full.forward(0, 0)
    full.learn(0, 0, {})
    for step in (0, 1):                               # the two halves of the same 128 samples
        half.forward(0, step)
        half.learn(0, step, {})
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(half.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in half.model.state_dict().items()}
    half.forward(0, 2)
    half.learn(0, 2, {})                              # the first half of the next pair: no step yet
    assert all(torch.equal(half.model.state_dict()[k], v) for k, v in before.items())


def test_gradient_clipping_bounds_the_update():
    clip = 1e-4
    config, spec, arrays = _independent(**{"train.grad_clip": clip, "train.momentum": 0.0, "train.nesterov": False,
                                           "train.weight_decay": 0.0})
    peer = Peer(0, config, arrays, spec)
    before = [p.detach().clone() for p in peer.model.parameters()]
    peer.forward(0, 0)
    peer.learn(0, 0, {})
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(peer.model.parameters(), before)])
    assert update.norm().item() == pytest.approx(config.train.lr * clip, rel=1e-3)
    with pytest.raises(ConfigError, match="train.grad_clip"):
        load_config(tiny_dml(**{"train.grad_clip": -1.0}))
    with pytest.raises(ConfigError, match="train.accumulate_steps"):
        load_config(tiny_dml(**{"train.accumulate_steps": 0}))
