"""The health watch (train.health): rollbacks on a non-finite loss or an unhealthy consistency, replays in a new data
order, the knowledge absorption rate, and the config's refusals.

This test covers:
- a drill whose failure depends on the data order: one training sample is poisoned (an infinite feature) and each
  epoch is one batch of 700 of the 1,294 training samples (the last partial batch is dropped), so the loss is
  non-finite exactly in the epochs whose order draws that sample: epoch 4's first attempt, and no other. The run rolls
  back to epoch_0002, replays epochs 3-4 in a new order, says so (console line, summary.json ``rollbacks``,
  metrics.parquet ``replay``/``rollbacks`` columns, TensorBoard ``health/`` scalars) and finishes, in this process and
  through Ray (the session's Ray), with the same parameters in both;
- that run killed during its replay and resumed ends with the parameters of the uninterrupted drill (the rollback,
  hence the replay number, is in the checkpoint);
- a consistency bound crossed at every epoch: a rollback to epoch_0000 (kept from keep_checkpoints: 1's pruning while
  it is the target), then a stop after max_rollbacks with one line naming the rule and the resume command;
  ``action: stop`` stops at once, on the consistency rule and on a non-finite loss;
- a watch that never fires changes nothing: the parameters of the run without train.health, tolerance 0;
- every member of a run draws the same batch for a replay, a replay's batches and views differ from the first
  attempt's, and a first attempt's are the numbers of a run without train.health; a cached teacher runs live for a
  replay (its cache holds first attempts only);
- the absorption rate in metrics.parquet equals its hand computation from the run's val figures and logged weights;
  None at epoch 1 and where the distillation weight is 0;
- each train.health refusal is one line naming the field, the value and what is allowed.
Runs are tiny (digits, 3 peers of a 16-unit MLP).
"""
import io
import json
import math
import re
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest
import torch

import raydistill
from raydistill.cli import main
from raydistill.data.memory import InMemorySet
from raydistill.data.views import batch_indices, make_view
from raydistill.engine.checkpoint import list_checkpoints, load_latest_checkpoint
from raydistill.engine.data import load_run_data
from raydistill.engine.teacher import Teacher
from raydistill.models import build_model
from raydistill.runtime.inprocess import InProcessWorkers
from raydistill.runtime.console import Console
from raydistill.runtime.loop import Run
from raydistill.policies.failures import WorkerLost
from raydistill.seeding import generator
from tests.conftest import one_line, tiny_dml, write_config
from tests.test_runtime import assert_same_parameters, final_parameters, tensorboard_scalars


def tiny(**overrides) -> dict:
    """3 DML peers of a 16-unit MLP on digits, batch 256 (5 steps an epoch)."""
    return tiny_dml(**{"model.options": {"hidden": [16]}, "train.batch_size": 256, "train.epochs": 2, **overrides})


# ---- the drill: a failure that depends on the data order ------------------------------------------------------------
DRILL = tiny(**{"train.epochs": 4, "train.batch_size": 700, "train.checkpoint_every": 2,
                "train.health": {"max_rollbacks": 1}})      # a replay that failed again would stop the run
ROLLBACK_LINE = ("train.health (non_finite): non-finite loss at epoch 4 step 0 on peer(s) [0, 1, 2]; rolled back to "
                 "checkpoint epoch_0002 (the end of epoch 2), replaying from epoch 3 in a new data order (rollback 1 "
                 "of at most 1)")


def drill_data(**overrides):
    """(config, spec, arrays, poisoned index): the digits arrays as floats with one training sample set to inf, a
    sample that epoch 4's first attempt draws and no other attempt of the run does (epochs 1-3, replays of 3-4)."""
    config = raydistill.load_config(DRILL, overrides)
    spec, arrays = load_run_data(config)
    n, size = len(arrays["train_y"]), config.train.batch_size

    def drawn(epoch, replay):
        return set(batch_indices(config.seed, epoch, 0, n, size, replay).tolist())

    avoided = set().union(drawn(0, 0), drawn(1, 0), drawn(2, 0), drawn(2, 1), drawn(3, 1))
    candidates = sorted(drawn(3, 0) - avoided)
    assert candidates, "no sample is drawn by epoch 4's first order alone; choose another seed or batch size"
    x = arrays["train_x"].astype(np.float32) / 255.0      # float input: the same pixels, and room for an inf
    x[candidates[0], 0, 0, 0] = np.inf
    return config, spec, InMemorySet(spec, {**arrays, "train_x": x}, arrays.recipe), candidates[0]


def run_drill(workers, config, spec, arrays, run_dir, runtime, **train_kwargs):
    """Runs the drill's loop over these workers; returns (summary, console text)."""
    out = io.StringIO()
    with redirect_stdout(out):
        result = Run(config, spec, arrays, workers, run_dir, runtime, Console(True), **train_kwargs.pop("run", {}))
        summary = result.train(**train_kwargs).summary
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    """The drill in this process: (run_dir, summary, console text)."""
    config, spec, arrays, _ = drill_data()
    run_dir = tmp_path_factory.mktemp("drill") / "run"
    summary, text = run_drill(InProcessWorkers(config, spec, arrays), config, spec, arrays, run_dir, "inprocess")
    return run_dir, summary, text


def assert_reports_the_rollback(run_dir, summary, text):
    assert summary["epochs_completed"] == 4 and (run_dir / "export" / "manifest.json").is_file()
    assert summary["rollbacks"] == {"count": 1, "events": [
        {"epoch": 4, "rule": "non_finite", "reason": "non-finite loss at epoch 4 step 0 on peer(s) [0, 1, 2]",
         "back_to": 2}]}
    assert text.count(ROLLBACK_LINE) == 1, text
    assert re.search(r"epoch   3/4 .* \| replay 1\n", text) and re.search(r"epoch   4/4 .* \| replay 1\n", text)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    peer0 = metrics[metrics.model == "peer0"]
    assert peer0["epoch"].tolist() == [1, 2, 3, 4]                 # the abandoned epoch 3 is recorded once
    assert peer0["replay"].tolist() == [0, 0, 1, 1] and peer0["rollbacks"].tolist() == [0, 0, 1, 1]
    scalars = tensorboard_scalars(run_dir)
    assert scalars["health/replay"] == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]
    assert scalars["health/rollbacks"] == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch_0002", "epoch_0004"]
    for peer in final_parameters(run_dir, 3):
        assert all(torch.isfinite(value).all() for value in peer.values())


def test_a_failure_of_one_data_order_rolls_back_replays_in_another_and_finishes(drill):
    run_dir, summary, text = drill
    config, spec, arrays, poisoned = drill_data()
    n, size = len(arrays["train_y"]), config.train.batch_size
    # the first attempt of epoch 4 draws the poisoned sample, its replay does not: the run finished with
    # max_rollbacks: 1, so its workers trained on the replay's order
    assert poisoned in batch_indices(config.seed, 3, 0, n, size).tolist()
    assert poisoned not in batch_indices(config.seed, 3, 0, n, size, replay=1).tolist()
    assert_reports_the_rollback(run_dir, summary, text)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["collective", "object_store", "codistill"])
def test_the_drill_through_ray_rolls_back_the_same_way(ray_session, drill, tmp_path, transport):
    """codistill with codistill_every: 1 is the per-step exchange bit for bit (README, "Codistillation"), a replay
    included: the stale copies draw the replayed epoch's batches and views too."""
    from raydistill.runtime.driver import RayWorkers

    keys = {"method.codistill_every": 1} if transport == "codistill" else {}
    config, spec, arrays, _ = drill_data(**{"resources.transport": transport, **keys})
    workers = RayWorkers(config, spec, arrays)
    try:
        summary, text = run_drill(workers, config, spec, arrays, tmp_path / "ray", "ray")
    finally:
        workers.shutdown()
    assert summary["runtime"] == "ray" and summary["transport"] == transport
    assert_reports_the_rollback(tmp_path / "ray", summary, text)
    assert_same_parameters(final_parameters(tmp_path / "ray", 3), final_parameters(drill[0], 3))


class LosesAWorkerInTheReplay(InProcessWorkers):
    """The in-process workers, except that the first call of a replayed epoch reports a lost worker after it ran (the
    loop's recovery drill, as tests/test_runtime.py's LosesAWorkerOnce; real killed processes: test_failures.py)."""

    fired = False

    def run_steps(self, epoch, first, count, replay=0, on_step=None):
        report = super().run_steps(epoch, first, count, replay, on_step)
        if replay and not self.fired:
            self.fired = True
            raise WorkerLost("drill")
        return report


def test_a_worker_lost_during_a_replay_replays_it_again_with_the_same_order(drill, tmp_path):
    config, spec, arrays, _ = drill_data()
    workers = LosesAWorkerInTheReplay(config, spec, arrays)
    summary, text = run_drill(workers, config, spec, arrays, tmp_path / "lost", "inprocess")
    assert workers.fired and summary["restarts"] == 1 and summary["steps_redone"] == 1
    assert "rolled back to epoch 3 step 0 (1 steps to redo)" in text     # the replayed epoch 3, from its start
    assert summary["rollbacks"] == drill[1]["rollbacks"]           # the same replay, not a second rollback
    assert_same_parameters(final_parameters(tmp_path / "lost", 3), final_parameters(drill[0], 3))


class Killed(Exception):
    """The drill's driver dies here."""


def test_a_run_killed_during_its_replay_resumes_it_exactly(drill, tmp_path):
    config, spec, arrays, _ = drill_data()
    run_dir, epochs_seen = tmp_path / "killed", []

    def die_after_the_first_replayed_epoch(report, checkpoint):
        epochs_seen.append(report["epoch"])
        if epochs_seen == [1, 2, 3, 3]:                 # epoch 3's first attempt, then its replay
            raise Killed

    with pytest.raises(Killed):
        run_drill(InProcessWorkers(config, spec, arrays), config, spec, arrays, run_dir, "inprocess",
                  run={"on_epoch": die_after_the_first_replayed_epoch})
    state, _ = load_latest_checkpoint(run_dir, 3)
    assert state["loop"]["epochs_completed"] == 2 and len(state["loop"]["rollbacks"]) == 1   # written again
    summary, text = run_drill(InProcessWorkers(config, spec, arrays), config, spec, arrays, run_dir, "inprocess",
                              resume_state=state)
    assert "rolled back" not in text and summary["rollbacks"] == drill[1]["rollbacks"]   # epoch 4 replayed again
    assert_same_parameters(final_parameters(run_dir, 3), final_parameters(drill[0], 3))
    peer0 = pd.read_parquet(run_dir / "metrics.parquet").query("model == 'peer0'")
    assert peer0["epoch"].tolist() == [1, 2, 3, 4] and peer0["replay"].tolist() == [0, 0, 1, 1]


# ---- the consistency rule, and stops -------------------------------------------------------------------------------


def test_a_consistency_bound_crossed_rolls_back_then_stops_after_max_rollbacks(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tiny(**{"train.epochs": 3, "train.keep_checkpoints": 1,
                     "train.health": {"max_consistency": 1e-6, "patience": 2, "max_rollbacks": 1}})
    code = main(["train", write_config(tmp_path / "c.yaml", config), "--runtime", "inprocess",
                 "--output", str(run_dir)])
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert code == 1
    assert re.fullmatch(
        r"raydistill: TrainingError: train\.health \(max_consistency\): validation consistency \S+ above "
        r"train\.health\.max_consistency=1e-06 for 2 epoch\(s\) in a row \(epochs 1-2\), after 1 rollback\(s\) "
        r"\(train\.health\.max_rollbacks=1\); the run stopped: `raydistill train --resume " + re.escape(str(run_dir))
        + r"` goes on from its checkpoint epoch_0001", line), line
    # epochs 1-2 were above the bound: back to the run's start, which keep_checkpoints: 1 did not prune
    assert captured.out.count("rolled back to checkpoint epoch_0000 (the run's start), replaying from epoch 1") == 1
    firsts = re.findall(r"epoch   1/3 \| loss (\S+) .*", captured.out)
    assert len(firsts) == 2 and firsts[0] != firsts[1]             # the replay trained on another order
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rollbacks"]["count"] == 1 and summary["stopped"]["rule"] == "max_consistency"
    assert [(e["epoch"], e["rule"], e["back_to"]) for e in summary["rollbacks"]["events"]] == \
        [(2, "max_consistency", 0)]
    peer0 = pd.read_parquet(run_dir / "metrics.parquet").query("model == 'peer0'")
    assert peer0["epoch"].tolist() == [1, 2] and peer0["replay"].tolist() == [1, 1]
    assert (peer0["consistency"] > 1e-6).all()
    assert tensorboard_scalars(run_dir)["health/rollbacks"] == [(1, 1.0), (2, 1.0)]
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch_0000", "epoch_0001"]   # the target is kept


@pytest.mark.parametrize("keys, expected", [
    ({"train.health": {"max_consistency": 1e-6, "action": "stop"}},
     r"train\.health \(max_consistency\): validation consistency \S+ above train\.health\.max_consistency=1e-06 for "
     r"1 epoch\(s\) in a row \(epoch 1\) \(train\.health\.action: stop\)"),
    ({"train.health": {"action": "stop"}, "train.lr": 1e6},
     r"train\.health \(non_finite\): non-finite loss at epoch 1 step \d+ on peer\(s\) \[[\d, ]+\] "
     r"\(train\.health\.action: stop\)"),
])
def test_action_stop_stops_at_once_with_one_line_naming_the_rule(ray_session, tmp_path, capsys, keys, expected):
    """On Ray. Both stop in the first epoch, the second before it ends: summary.json says why all the same."""
    run_dir = tmp_path / "run"
    code = main(["train", write_config(tmp_path / "c.yaml", tiny(**keys)), "--output", str(run_dir), "--quiet"])
    line = one_line(capsys.readouterr().err)
    assert code == 1
    assert re.fullmatch(r"raydistill: TrainingError: " + expected + r"; the run stopped: `raydistill train --resume "
                        + re.escape(str(run_dir)) + r"` goes on from the beginning \(no checkpoint yet\)", line), line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"]["rule"] in line and summary["stopped"]["reason"] in line
    assert summary["epochs_completed"] == (1 if "max_consistency" in line else 0)


def test_a_watch_that_never_fires_changes_nothing(tmp_path):
    watched = raydistill.train(tiny(**{"train.health": {"max_consistency": 100.0}}), tmp_path / "watched",
                               runtime="inprocess", progress=False)
    plain = raydistill.train(tiny(), tmp_path / "plain", runtime="inprocess", progress=False)
    assert_same_parameters(final_parameters(tmp_path / "watched", 3), final_parameters(tmp_path / "plain", 3))
    assert watched.summary["rollbacks"] == plain.summary["rollbacks"] == {"count": 0, "events": []}
    assert (pd.read_parquet(tmp_path / "watched" / "metrics.parquet")["replay"] == 0).all()
    assert "replay" not in pd.read_parquet(tmp_path / "plain" / "metrics.parquet").columns


# ---- the data order of a replay ------------------------------------------------------------------------------------
def test_every_member_draws_the_same_replayed_batch_and_a_first_attempt_keeps_its_numbers():
    config = raydistill.load_config(tiny())
    spec, arrays = load_run_data(config)
    worker = InProcessWorkers(config, spec, arrays).worker
    n, size = len(arrays["train_y"]), config.train.batch_size
    for replay in (0, 1, 2):
        for peer in worker.peers:
            labels = peer.data.labels(1, 2, replay).numpy()
            np.testing.assert_array_equal(labels, arrays["train_y"][batch_indices(config.seed, 1, 2, n, size, replay)])
            np.testing.assert_array_equal(labels, worker.coordinator.batch_labels(1, 2, replay))
    # a first attempt draws what a run drew before replays existed: (seed, "epoch", epoch) alone
    order = torch.randperm(n, generator=generator(config.seed, "epoch", 1))
    assert torch.equal(batch_indices(config.seed, 1, 2, n, size), order[2 * size:3 * size])
    assert not torch.equal(batch_indices(config.seed, 1, 2, n, size, replay=1), order[2 * size:3 * size])
    assert not torch.equal(batch_indices(config.seed, 1, 2, n, size, replay=1),
                           batch_indices(config.seed, 1, 2, n, size, replay=2))
    x = torch.from_numpy(arrays["train_x"][:64])
    first = make_view(x, config.seed, 1, 2, 0, crop_pad=1, flip=True)
    assert torch.equal(first, make_view(x, config.seed, 1, 2, 0, crop_pad=1, flip=True, replay=0))
    assert not torch.equal(first, make_view(x, config.seed, 1, 2, 0, crop_pad=1, flip=True, replay=1))


def test_a_cached_teacher_runs_live_for_a_replay_and_sees_the_replayed_views(tmp_path):
    """The cache holds first attempts: a replayed step's targets come from the live teacher on the replay's views."""
    spec, arrays = load_run_data(raydistill.load_config(tiny()))
    torch.manual_seed(0)
    torch.save(build_model("mlp", spec, hidden=[16]).state_dict(), tmp_path / "teacher.pt")
    config = raydistill.load_config(tiny(**{
        "method.name": "kd", "peers": 2, "method.per_peer_views": True,
        "teacher": {"arch": "mlp", "options": {"hidden": [16]}, "checkpoint": str(tmp_path / "teacher.pt"),
                    "cache": str(tmp_path / "cache")}}))
    teacher = Teacher(0, config, arrays, spec)
    first = teacher.forward(1, 2)["logits"]
    np.testing.assert_array_equal(first, teacher.live_forward(1, 2)["logits"])
    assert teacher.cache.computed_epochs == [1]                          # the first attempt came from the cache
    replayed = teacher.forward(1, 2, replay=1)["logits"]
    np.testing.assert_array_equal(replayed, teacher.live_forward(1, 2, replay=1)["logits"])
    assert not np.array_equal(replayed, first) and teacher.cache.computed_epochs == [1]


# ---- the knowledge absorption rate ---------------------------------------------------------------------------------
def test_the_absorption_rate_is_the_val_gain_per_unit_of_distillation_weight(tmp_path):
    """pcl: the weight is alpha_e times the ramp w(e), both logged; independent: alpha is 0, so no rate at all."""
    pcl = tiny(**{"method.name": "pcl", "method.rampup_epochs": 10, "train.epochs": 3})   # w(e) < 1 throughout
    raydistill.train(pcl, tmp_path / "pcl", runtime="inprocess", progress=False)
    metrics = pd.read_parquet(tmp_path / "pcl" / "metrics.parquet")
    for i in range(3):
        rows = metrics[metrics.model == f"peer{i}"].sort_values("epoch").reset_index()
        assert pd.isna(rows.loc[0, "absorption"])                           # no previous epoch
        for e in (1, 2):
            weight = rows.loc[e, "alpha"] * rows.loc[e, "ramp"]
            assert 0 < weight < 1                                           # the ramp is in it
            expected = (rows.loc[e, "val_acc"] - rows.loc[e - 1, "val_acc"]) / weight
            assert rows.loc[e, "absorption"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert metrics.loc[metrics.model == "ensemble", "absorption"].isna().all()
    scalars = tensorboard_scalars(tmp_path / "pcl")
    assert [step for step, _ in scalars["peer1/absorption"]] == [2, 3]

    raydistill.train(tiny(**{"method.name": "independent"}), tmp_path / "ind", runtime="inprocess", progress=False)
    independent = pd.read_parquet(tmp_path / "ind" / "metrics.parquet")
    assert (independent["alpha"] == 0).all() and independent["absorption"].isna().all()   # None, not inf


# ---- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys, message", [
    ({"train.health": 3}, "train.health=3: must be a mapping of max_consistency, patience, action, max_rollbacks"),
    ({"train.health": {"when": 3}},
     "train.health.when=3: unknown key; allowed: action, max_consistency, max_rollbacks, patience"),
    ({"train.health": {"action": "retry"}}, "train.health.action='retry': one of: rollback, stop"),
    ({"train.health": {"patience": 0}}, "train.health.patience=0: must be >= 1 (epochs in a row)"),
    ({"train.health": {"patience": 1.5}}, "train.health.patience=1.5: must be an integer"),
    ({"train.health": {"max_rollbacks": -1}},
     "train.health.max_rollbacks=-1: must be >= 0 (0: stop at the first)"),
    ({"train.health": {"max_consistency": 0}},
     "train.health.max_consistency=0.0: must be a finite number > 0, or null"),
    ({"train.health": {"max_consistency": math.inf}},
     "train.health.max_consistency=inf: must be a finite number > 0, or null"),
    ({"train.health": {"max_consistency": 0.5}, "data.val_fraction": 0.0},
     "train.health.max_consistency=0.5: needs a validation split (data.val_fraction > 0): the test split never "
     "decides a rollback"),
    ({"train.health": {"max_consistency": 0.5}, "peers": 1, "method.name": "independent"},
     "train.health.max_consistency=0.5: needs 2 or more peers of a classification task (consistency is their mean "
     "pairwise KL)"),
])
def test_each_health_refusal_is_one_line_naming_the_field(keys, message):
    with pytest.raises(raydistill.ConfigError) as caught:
        raydistill.load_config(tiny(**keys))
    assert str(caught.value) == message
