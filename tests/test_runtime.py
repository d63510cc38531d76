"""The run directory contract through the Ray runtime, resume and rollback drills, storage, and the loop's records.

The equivalence of every runtime and transport with the in-process run is tests/test_equivalence.py; the failure drills
with real processes and nodes are tests/test_multinode.py and tests/test_failures.py.
"""
import json
import os

import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml

import raydistill
from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint
from raydistill.engine.data import load_run_data
from raydistill.runtime.inprocess import InProcessWorkers
from raydistill.runtime.console import Console
from raydistill.runtime.loop import Run
from raydistill.policies.failures import WorkerLost
from tests.conftest import tiny_dml


def final_parameters(run_dir, num_peers):
    state = load_checkpoint(latest_checkpoint(run_dir), num_peers)
    return [peer["model"] for peer in state["peers"]]


def assert_same_parameters(a, b, tol=0.0):
    assert len(a) == len(b)
    for peer_a, peer_b in zip(a, b):
        assert peer_a.keys() == peer_b.keys()
        for key in peer_a:
            diff = (peer_a[key].double() - peer_b[key].double()).abs().max().item() if peer_a[key].numel() else 0.0
            assert diff <= tol, f"{key} differs by {diff}"


def tensorboard_scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def ray_run(ray_session, tmp_path_factory):
    """A 3-peer DML run through Ray workers (the default collective transport): two epochs."""
    out = tmp_path_factory.mktemp("ray") / "run"
    return raydistill.train(tiny_dml(**{"train.epochs": 2}), out, progress=False)


def test_run_directory_contract(ray_run):
    run_dir = ray_run.run_dir
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # resolved defaults that the input did not give: the method's, the data set's, every peer's entry
    assert config["method"]["temperature"] == 1.0 and config["method"]["per_peer_views"] is False
    assert [p["arch"] for p in config["peers"]] == ["mlp"] * 3 and config["data"]["crop_pad"] == 1
    assert config["resources"]["transport"] == "auto"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["runtime"] == "ray" and summary["transport"] == "collective"
    assert summary["epochs_completed"] == 2 and summary["restarts"] == 0 and summary["selection"] == "val"
    assert {"index", "arch", "node", "val_acc", "best_val_acc", "best_epoch"} <= set(summary["peers"][0])
    assert len({p["node"] for p in summary["peers"]}) == 1            # one local node holds them all
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["epoch_0001", "epoch_0002"]


def test_metrics_tensorboard_and_summary_agree(ray_run):
    """Every figure is written three times (metrics.parquet, TensorBoard, summary.json): the same numbers."""
    run_dir, summary = ray_run.run_dir, ray_run.summary
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(metrics["model"].unique()) == ["ensemble", "peer0", "peer1", "peer2"]
    assert sorted(metrics["epoch"].unique()) == [1, 2]
    assert {"train_kd", "train_task", "consistency", "temperature", "alpha", "samples_per_s"} <= set(metrics.columns)
    scalars = tensorboard_scalars(run_dir)
    for _, row in metrics.iterrows():
        for column in ("val_acc", "test_acc", "train_loss", "train_kd"):
            if not pd.isna(row.get(column)):
                tag = f"{row['model']}/{column.replace('_', '/', 1)}"
                assert (row["epoch"], pytest.approx(row[column], abs=1e-6)) in \
                    [(step, pytest.approx(v, abs=1e-6)) for step, v in scalars[tag]], tag
    for tag, points in scalars.items():                                  # one point per epoch, no duplicate
        assert [step for step, _ in points] == ([2] if tag.endswith("/absorption") else [1, 2]), tag
    last = metrics[metrics.epoch == 2].set_index("model")
    for i, peer in enumerate(summary["peers"]):
        assert peer["val_acc"] == pytest.approx(last.loc[f"peer{i}", "val_acc"])
        assert peer["test_acc"] == pytest.approx(last.loc[f"peer{i}", "test_acc"])


def test_the_deployable_peer_is_the_best_by_last_epoch_validation(ray_run):
    summary = ray_run.summary
    scores = [p["val_acc"] for p in summary["peers"]]
    assert summary["deploy"]["name"] == f"peer{int(np.argmax(scores))}"
    assert summary["deploy"]["chosen_by"] == "last-epoch val acc"
    best = [p["best_epoch"] for p in summary["peers"]]
    metrics = pd.read_parquet(ray_run.run_dir / "metrics.parquet")
    for i, epoch in enumerate(best):
        rows = metrics[metrics.model == f"peer{i}"].sort_values("epoch")
        assert epoch == int(rows.loc[rows["val_acc"].idxmax(), "epoch"])


def test_without_a_validation_split_nothing_is_chosen_on_the_test_split(tmp_path):
    result = raydistill.train(tiny_dml(**{"data.val_fraction": 0.0, "train.epochs": 2}), tmp_path / "run",
                              runtime="inprocess", progress=False)
    summary = result.summary
    assert summary["selection"] is None
    assert all(p["best_epoch"] is None and p["test_acc_at_best_epoch"] is None for p in summary["peers"])
    losses = [pd.read_parquet(tmp_path / "run" / "metrics.parquet").query(f"model == 'peer{i}' and epoch == 2")
              ["train_task"].item() for i in range(3)]
    assert summary["deploy"]["name"] == f"peer{int(np.argmin(losses))}"
    assert "training loss" in summary["deploy"]["chosen_by"] and "test" not in summary["deploy"]["chosen_by"].split(
        "(")[0]


def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(ray_run, tmp_path):
    run_dir = tmp_path / "stopped"
    first = raydistill.train(tiny_dml(**{"train.epochs": 2}), run_dir, stop_after_epoch=1, progress=False)
    assert first.summary["epochs_completed"] == 1 and "deploy" not in first.summary
    assert not (run_dir / "export").exists()
    resumed = raydistill.train(resume=run_dir, progress=False)
    assert resumed.summary["epochs_completed"] == 2
    assert_same_parameters(final_parameters(run_dir, 3), final_parameters(ray_run.run_dir, 3))
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(metrics["epoch"].tolist()) == [1] * 4 + [2] * 4             # no duplicated epoch rows
    with pytest.raises(raydistill.ConfigError, match="train.epochs"):
        raydistill.train(resume=run_dir, progress=False)                       # nothing left to train
    with pytest.raises(raydistill.ConfigError, match=r"peers.0.arch='mlp': does not match the checkpoint"):
        raydistill.train(resume=run_dir, overrides=["train.epochs=3", "peers.0.options.hidden=[48]"], progress=False)


def test_resume_with_overrides_writes_them_to_config_yaml_and_trains_with_them(tmp_path):
    run_dir = tmp_path / "run"
    raydistill.train(tiny_dml(**{"train.epochs": 2}), run_dir, runtime="inprocess", stop_after_epoch=1,
                     progress=False)
    raydistill.train(resume=run_dir, overrides=["train.lr=0.01", "train.epochs=3"], runtime="inprocess",
                     progress=False)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["lr"] == 0.01 and config["train"]["epochs"] == 3
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    lrs = metrics[metrics.model == "peer0"].sort_values("epoch")["train_lr"].tolist()
    assert lrs[0] > 0.01 and max(lrs[1:]) <= 0.01                      # epochs 2-3 trained with the new value


def test_tensorboard_after_a_resume_past_the_checkpoint_has_one_point_per_epoch(tmp_path):
    """A run killed after epoch 3 was recorded but whose last checkpoint is epoch 2 records epoch 3 again on resume:
    TensorBoard must show the new value once, not both."""
    run_dir = tmp_path / "run"
    config = tiny_dml(**{"train.epochs": 4, "train.checkpoint_every": 2})
    raydistill.train(config, run_dir, runtime="inprocess", stop_after_epoch=3, progress=False)
    # stop_after_epoch writes a checkpoint at 3: remove it, as if the run died after recording epoch 3
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "epoch_0003")
    raydistill.train(resume=run_dir, runtime="inprocess", progress=False)
    scalars = tensorboard_scalars(run_dir)
    assert [step for step, _ in scalars["peer0/val/acc"]] == [1, 2, 3, 4]
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics[metrics.model == "peer0"]["epoch"].tolist() == [1, 2, 3, 4]


def test_kd_from_a_teacher_run_and_from_a_torchvision_state_dict(tmp_path):
    teacher_run = raydistill.train(tiny_dml(**{"method.name": "independent", "peers": 1, "model.arch": "cnn_small",
                                               "model.options": {}, "train.epochs": 2}),
                                   tmp_path / "teacher", runtime="inprocess", progress=False)
    student = tiny_dml(**{"method.name": "kd", "peers": 2, "method.per_peer_views": True,
                          "teacher": {"arch": "cnn_small", "checkpoint": str(teacher_run.run_dir)}})
    result = raydistill.train(student, tmp_path / "kd", runtime="inprocess", progress=False)
    teacher_test = teacher_run.summary["peers"][0]["test_acc"]
    assert result.summary["teachers"][0]["test_acc"] == pytest.approx(teacher_test, abs=1e-6)
    metrics = pd.read_parquet(tmp_path / "kd" / "metrics.parquet")
    assert metrics.loc[metrics.model == "peer0", "train_kd"].iloc[0] > 0
    assert metrics.loc[metrics.model == "peer0", "ce_weight"].iloc[0] == pytest.approx(0.1)   # 1 - alpha
    # a bare state dict of the network (the torchvision convention) loads too, and teaches the same
    net_state = {k[len("net."):]: v for k, v in raydistill.load_model(teacher_run.run_dir).state_dict().items()
                 if k.startswith("net.")}
    torch.save(net_state, tmp_path / "teacher.pt")
    student["teacher"]["checkpoint"] = str(tmp_path / "teacher.pt")
    again = raydistill.train(student, tmp_path / "kd2", runtime="inprocess", progress=False)
    assert again.summary["teachers"][0]["test_acc"] == pytest.approx(teacher_test, abs=1e-6)
    assert_same_parameters(final_parameters(tmp_path / "kd2", 2), final_parameters(tmp_path / "kd", 2))


def test_storage_mirrors_the_run_directory_through_ray(ray_session, tmp_path):
    result = raydistill.train(tiny_dml(**{"train.storage": f"file://{tmp_path / 'shared' / 'runs' / 'x'}",
                                          "peers": 2, "train.batch_size": 256}),
                              tmp_path / "local", progress=False)
    mirrored = tmp_path / "shared" / "runs" / "x"
    assert json.loads((mirrored / "summary.json").read_text()) == result.summary
    assert (mirrored / "checkpoints" / "epoch_0001" / "peer_1.pt").is_file()
    assert (mirrored / "export" / "manifest.json").is_file()


class LosesAWorkerOnce(InProcessWorkers):
    """The in-process workers, except that the call covering one chosen step reports a lost worker once, after it has
    run (its steps are lost with it): a drill of the loop's rollback. The real thing, a killed process and a removed
    node, is in tests/test_multinode.py."""

    def __init__(self, *args, at):
        super().__init__(*args)
        self.at, self.fired = at, False

    def run_steps(self, epoch, first, count, replay=0, on_step=None):
        report = super().run_steps(epoch, first, count, replay, on_step)
        if not self.fired and epoch == self.at[0] and first <= self.at[1] < first + count:
            self.fired = True
            raise WorkerLost("drill")
        return report


@pytest.mark.parametrize("keys, expected_redone", [
    ({}, 40),                                                        # the whole epoch's call is run again
    ({"train.checkpoint_every_steps": 3}, 3),                        # from step 3, the last rollback point
    ({"train.checkpoint_every_steps": 3, "train.accumulate_steps": 2}, 3),   # a half-accumulated gradient kept
    ({"train.steps_per_call": 5, "train.checkpoint_every_steps": 10}, 5),
])
def test_rollback_to_the_last_common_point_replays_exactly(tmp_path, keys, expected_redone):
    config = raydistill.load_config(tiny_dml(**{"train.epochs": 2, "train.batch_size": 32, **keys}))
    spec, arrays = load_run_data(config)
    workers = LosesAWorkerOnce(config, spec, arrays, at=(1, 4))     # the call with step 4 of epoch 2 is lost
    summary = Run(config, spec, arrays, workers, tmp_path / "drill", "inprocess", Console(False)).train().summary
    assert (summary["restarts"], summary["steps_redone"]) == (1, expected_redone)
    reference = raydistill.train(config, tmp_path / "reference", runtime="inprocess", progress=False)
    assert_same_parameters(final_parameters(tmp_path / "drill", 3), final_parameters(reference.run_dir, 3))
    assert reference.summary["restarts"] == 0
    drill = pd.read_parquet(tmp_path / "drill" / "metrics.parquet")
    ref = pd.read_parquet(reference.run_dir / "metrics.parquet")
    columns = ["epoch", "model", "train_loss", "train_task", "train_kd", "val_acc", "test_acc"]
    pd.testing.assert_frame_equal(drill[columns], ref[columns])       # the figures of the replay are the same too


def test_a_rollback_past_recorded_epochs_records_them_once(tmp_path):
    """Checkpoints every 2 epochs: a worker lost in epoch 4 rolls back to epoch 2, so epoch 3, already recorded, runs
    again: metrics.parquet and TensorBoard hold it once, with the replay's figures (the same as an uninterrupted run)."""
    config = raydistill.load_config(tiny_dml(**{"train.epochs": 4, "train.batch_size": 256,
                                                "train.checkpoint_every": 2}))
    spec, arrays = load_run_data(config)
    workers = LosesAWorkerOnce(config, spec, arrays, at=(3, 0))
    summary = Run(config, spec, arrays, workers, tmp_path / "drill", "inprocess", Console(False)).train().summary
    assert summary["restarts"] == 1 and summary["steps_redone"] == 2 * 5
    reference = raydistill.train(config, tmp_path / "reference", runtime="inprocess", progress=False)
    assert_same_parameters(final_parameters(tmp_path / "drill", 3), final_parameters(reference.run_dir, 3))
    drill, ref = (pd.read_parquet(d / "metrics.parquet") for d in (tmp_path / "drill", reference.run_dir))
    assert drill.groupby(["epoch", "model"]).size().max() == 1
    pd.testing.assert_frame_equal(drill[["epoch", "model", "train_loss", "val_acc"]],
                                  ref[["epoch", "model", "train_loss", "val_acc"]])
    scalars = tensorboard_scalars(tmp_path / "drill")
    assert [step for step, _ in scalars["peer0/val/acc"]] == [1, 2, 3, 4]
    assert scalars["peer0/val/acc"] == tensorboard_scalars(reference.run_dir)["peer0/val/acc"]


def test_calls_end_at_rollback_points_and_the_epoch_end(tmp_path):
    config = raydistill.load_config(tiny_dml(**{"train.batch_size": 128, "train.steps_per_call": 4,
                                                "train.checkpoint_every_steps": 6}))
    spec, arrays = load_run_data(config)
    run = Run(config, spec, arrays, InProcessWorkers(config, spec, arrays), tmp_path, "inprocess", Console(False))
    assert run.steps == 10
    assert run.calls(0) == [(0, 4), (4, 2), (6, 4)]
    assert run.calls(6) == [(6, 4)]


def test_an_in_process_run_needs_no_ray(tmp_path):
    """A machine without Ray (a GPU box for accuracy runs) trains in-process: Ray made unimportable, the run ends."""
    import subprocess
    import sys

    code = ("import sys, importlib.abc\n"
            "class NoRay(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'):\n"
            "            raise ImportError('no ray here')\n"
            "sys.meta_path.insert(0, NoRay())\n"
            "import raydistill\n"
            "r = raydistill.train({'name': 'noray', 'data': {'name': 'digits'}, 'peers': 2,\n"
            "                      'model': {'arch': 'mlp', 'options': {'hidden': [16]}},\n"
            "                      'train': {'epochs': 1, 'batch_size': 256}}, sys.argv[1], runtime='inprocess',\n"
            "                     progress=False)\n"
            "assert 'ray' not in sys.modules and r.summary['epochs_completed'] == 1\n"
            "print('ok', r.summary['runtime'])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "inprocess"], proc.stderr[-2000:]


def test_what_a_checkpoint_rewrites_does_not_grow_with_the_epochs(tmp_path):
    """A long run's per-epoch cost must stay flat: each checkpoint rewrites its loop state, so that state keeps the
    last record and each model's last and best figures, not every epoch's record (1.3 MB at epoch 1,000 before).
    The summary's best epochs are still those of the whole history (checked against metrics.parquet)."""
    sizes = {}

    def measure(report, checkpoint):
        sizes[report["epoch"]] = {p.name: p.stat().st_size for p in checkpoint.iterdir()}

    run_dir = tmp_path / "run"
    result = raydistill.train(tiny_dml(**{"train.epochs": 24, "train.batch_size": 512,
                                          "model.options": {"hidden": [8]}}), run_dir, runtime="inprocess",
                              on_epoch=measure, progress=False)
    early, late = sizes[3], sizes[24]
    assert early.keys() == late.keys()
    assert abs(late["loop.json"] - early["loop.json"]) < 64, (early["loop.json"], late["loop.json"])  # digits only
    assert all(late[name] == early[name] for name in early if name.endswith(".pt"))
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    for peer in result.summary["peers"]:
        rows = metrics[metrics.model == peer["name"]]
        best = rows.loc[rows["val_acc"].idxmax()]                     # the earliest of equal bests
        assert (peer["best_epoch"], peer["best_val_acc"]) == (best["epoch"], best["val_acc"])
        assert peer["test_acc_at_best_epoch"] == best["test_acc"]
        assert peer["val_acc"] == rows[rows.epoch == 24]["val_acc"].item()


def test_a_run_directory_written_before_the_compact_loop_state_resumes_exactly(tmp_path):
    """tests/data/run-before-compact-loop: a 2-peer run stopped after epoch 1 of 2, its loop.json holding every
    epoch's record (``history``), as runs wrote it before. It resumes (its records folded into the compact state)
    to the parameters of an uninterrupted run, and its summary names epoch 1's figures where they are the best."""
    import shutil
    from pathlib import Path

    run_dir = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "run-before-compact-loop", run_dir)
    assert "history" in load_checkpoint(latest_checkpoint(run_dir), 2)["loop"]
    result = raydistill.train(resume=run_dir, runtime="inprocess", progress=False)
    uninterrupted = raydistill.train(str(run_dir / "config.yaml"), tmp_path / "new", runtime="inprocess",
                                     progress=False)
    assert_same_parameters(final_parameters(run_dir, 2), final_parameters(uninterrupted.run_dir, 2))
    assert result.summary["peers"] == uninterrupted.summary["peers"]
    assert "history" not in load_checkpoint(latest_checkpoint(run_dir), 2)["loop"]


# ---- the test suite's warm workers ---------------------------------------------------------------------------------
def test_a_warm_worker_set_serves_the_next_run_of_another_name_and_another_shape_gets_its_own(ray_session, tmp_path):
    """RAYDISTILL_KEEP_WORKERS=1 (this suite): the workers of a finished run are taken by the next run of this process
    with as many workers, the same GPUs, strategy, restarts and transport actors, whatever its name or CPUs per peer;
    that run trains as it would in process, and find_actor gives its actors. A run with another number of workers
    starts its own, and the warm set is gone (no bundle left held)."""
    from raydistill.runtime.driver import KEEP_WORKERS, find_actor

    assert os.environ.get(KEEP_WORKERS) == "1"
    pids = {}

    def note(name, config):
        def on_epoch(record, checkpoint):
            actors = [find_actor(raydistill.load_config(config), f"worker{rank}") for rank in range(2)]
            pids[name] = [ray.get(actor.pid.remote(), timeout=60) for actor in actors]
        return on_epoch

    first = tiny_dml(**{"name": "warm-first", "peers": 2})
    second = tiny_dml(**{"name": "warm-second", "peers": 2, "seed": 11, "resources.cpus_per_peer": 2})
    third = tiny_dml(**{"name": "warm-third", "peers": 3, "resources.peers_per_worker": 1})     # 3 workers
    for name, config in (("first", first), ("second", second), ("third", third)):
        raydistill.train(config, tmp_path / name, progress=False, on_epoch=note(name, config))
    assert pids["second"] == pids["first"]                      # the same processes: taken warm
    assert not set(pids["third"]) & set(pids["first"])          # another shape: its own
    assert not any(alive(pid) for pid in pids["first"])         # ... and the warm set was killed for its bundles
    reference = raydistill.train(second, tmp_path / "reference", runtime="inprocess", progress=False)
    assert_same_parameters(final_parameters(tmp_path / "second", 2), final_parameters(reference.run_dir, 2))


def alive(pid: int) -> bool:
    """A process that runs (a zombie, dead and not yet reaped, does not)."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")
