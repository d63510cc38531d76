"""The Ray runtime against the in-process reference, resume, and the run directory contract."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import raydistill
from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint
from raydistill.engine.data import load_run_data
from raydistill.runtime.inprocess import InProcessWorkers
from raydistill.runtime.loop import Console, Run, WorkerLost
from tests.conftest import tiny_dml


def final_parameters(run_dir, num_peers):
    state = load_checkpoint(latest_checkpoint(run_dir), num_peers)
    return [peer["model"] for peer in state["peers"]]


def assert_same_parameters(a, b, tol=1e-5):
    assert len(a) == len(b)
    for peer_a, peer_b in zip(a, b):
        assert peer_a.keys() == peer_b.keys()
        for key in peer_a:
            diff = (peer_a[key].double() - peer_b[key].double()).abs().max().item() if peer_a[key].numel() else 0.0
            assert diff <= tol, f"{key} differs by {diff}"


@pytest.fixture(scope="module")
def ray_run(ray_session, tmp_path_factory):
    """A 3-peer DML run through Ray actors: 10 steps of 128 samples, two epochs."""
    out = tmp_path_factory.mktemp("ray") / "run"
    return raydistill.train(tiny_dml(**{"train.epochs": 2}), out, progress=False)


def test_ray_runtime_equals_inprocess_runtime(ray_run, tmp_path):
    """The most important property: the distributed run computes the same function as the one-process run."""
    reference = raydistill.train(tiny_dml(**{"train.epochs": 2}), tmp_path / "ref", runtime="inprocess",
                                 progress=False)
    assert ray_run.summary["runtime"] == "ray" and reference.summary["runtime"] == "inprocess"
    ray_params, ref_params = final_parameters(ray_run.run_dir, 3), final_parameters(reference.run_dir, 3)
    assert_same_parameters(ray_params, ref_params)
    # the peers did learn, and differently from each other: the comparison is not of untouched weights
    init = raydistill.train(tiny_dml(**{"train.epochs": 1, "train.lr": 1e-12}), tmp_path / "init",
                            runtime="inprocess", progress=False)
    moved = final_parameters(init.run_dir, 3)[0]["net.fc.weight"] - ray_params[0]["net.fc.weight"]
    assert moved.abs().max() > 1e-3
    assert not torch.equal(ray_params[0]["net.fc.weight"], ray_params[1]["net.fc.weight"])


def test_run_directory_contract(ray_run):
    run_dir = ray_run.run_dir
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"]["temperature"] == 1.0 and len(config["peers"]) == 3       # every default resolved
    assert config["peers"][0]["arch"] == "mlp" and config["data"]["crop_pad"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("method", "dataset", "epochs_completed", "peers", "ensemble_val_acc", "teachers", "wall_s",
                "train_samples_per_s", "restarts"):
        assert key in summary, key
    assert summary["epochs_completed"] == 2 and summary["restarts"] == 0
    assert {"index", "arch", "node", "val_acc", "best_val_acc", "best_epoch"} <= set(summary["peers"][0])
    assert len({p["node"] for p in summary["peers"]}) == 1            # one local node holds them all
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(metrics["model"].unique()) == ["ensemble", "peer0", "peer1", "peer2"]
    assert sorted(metrics["epoch"].unique()) == [1, 2]
    last = metrics[(metrics.epoch == 2) & (metrics.model == "peer1")].iloc[0]
    assert last["val_acc"] == pytest.approx(summary["peers"][1]["val_acc"])
    assert {"train_kd", "train_task", "consistency", "temperature", "alpha", "samples_per_s"} <= set(metrics.columns)
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["epoch_0001", "epoch_0002"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"peer0/val/acc", "ensemble/test/acc", "consistency", "hyper/temperature"} <= set(tags)
    assert [e.step for e in events.Scalars("peer0/val/acc")] == [1, 2]


def test_load_model_without_ray_reproduces_the_test_accuracy(ray_run):
    from raydistill.config import load_config
    from raydistill.data.views import to_float
    from raydistill.engine.data import load_run_data

    _, arrays = load_run_data(load_config(ray_run.run_dir))
    model = raydistill.load_model(ray_run.run_dir, peer=2)
    assert not model.training
    with torch.no_grad():
        logits = model(to_float(torch.from_numpy(arrays["test_x"])))
    accuracy = (logits.argmax(1).numpy() == arrays["test_y"]).mean()
    assert accuracy == pytest.approx(ray_run.summary["peers"][2]["test_acc"], abs=1e-6)
    deploy = raydistill.load_model(ray_run.run_dir)          # the deployable model by default
    assert ray_run.summary["deploy"]["name"] in ("peer0", "peer1", "peer2")
    assert deploy.net.fc.weight.shape == model.net.fc.weight.shape


def test_eval_command_prints_each_exported_model(ray_run, capsys):
    from raydistill.cli import main

    assert main(["eval", str(ray_run.run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: float(line.split()[2]) for line in lines}
    assert set(by_name) == {"peer0", "peer1", "peer2", "ensemble"}
    assert by_name["peer0"] == pytest.approx(ray_run.summary["peers"][0]["test_acc"], abs=1e-4)


def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(ray_run, tmp_path):
    run_dir = tmp_path / "stopped"
    first = raydistill.train(tiny_dml(**{"train.epochs": 2}), run_dir, stop_after_epoch=1, progress=False)
    assert first.summary["epochs_completed"] == 1 and "deploy" not in first.summary
    assert not (run_dir / "export").exists()
    resumed = raydistill.train(resume=run_dir, progress=False)
    assert resumed.summary["epochs_completed"] == 2
    assert_same_parameters(final_parameters(run_dir, 3), final_parameters(ray_run.run_dir, 3), tol=0.0)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(metrics["epoch"].tolist()) == [1] * 4 + [2] * 4             # no duplicated epoch rows
    with pytest.raises(raydistill.ConfigError, match="train.epochs"):
        raydistill.train(resume=run_dir, progress=False)                       # nothing left to train
    with pytest.raises(raydistill.ConfigError, match=r"peers.0.arch='mlp': does not match the checkpoint"):
        raydistill.train(resume=run_dir, overrides=["train.epochs=3", "peers.0.options.hidden=[48]"], progress=False)


def test_kd_from_a_teacher_run_and_from_a_torchvision_state_dict(ray_session, tmp_path):
    teacher_run = raydistill.train(tiny_dml(**{"method.name": "independent", "peers": 1, "model.arch": "cnn_small",
                                               "model.options": {},
                                               "train.epochs": 2}),
                                   tmp_path / "teacher", runtime="inprocess", progress=False)
    student = tiny_dml(**{"method.name": "kd", "peers": 2, "method.per_peer_views": True,
                          "teacher": {"arch": "cnn_small", "checkpoint": str(teacher_run.run_dir)}})
    result = raydistill.train(student, tmp_path / "kd", progress=False)
    teacher_test = teacher_run.summary["peers"][0]["test_acc"]
    assert result.summary["teachers"][0]["test_acc"] == pytest.approx(teacher_test, abs=1e-6)
    metrics = pd.read_parquet(tmp_path / "kd" / "metrics.parquet")
    assert metrics.loc[metrics.model == "peer0", "train_kd"].iloc[0] > 0
    assert metrics.loc[metrics.model == "peer0", "ce_weight"].iloc[0] == pytest.approx(0.1)   # 1 - alpha
    # a bare state dict of the network (the torchvision convention) loads too
    net_state = {k[len("net."):]: v for k, v in raydistill.load_model(teacher_run.run_dir).state_dict().items()
                 if k.startswith("net.")}
    torch.save(net_state, tmp_path / "teacher.pt")
    student["teacher"]["checkpoint"] = str(tmp_path / "teacher.pt")
    again = raydistill.train(student, tmp_path / "kd2", runtime="inprocess", progress=False)
    assert again.summary["teachers"][0]["test_acc"] == pytest.approx(teacher_test, abs=1e-6)
    assert np.isclose(again.summary["peers"][0]["test_acc"], result.summary["peers"][0]["test_acc"], atol=1e-6)


def test_storage_mirrors_the_run_directory(tmp_path):
    result = raydistill.train(tiny_dml(**{"train.storage": f"file://{tmp_path / 'shared' / 'runs' / 'x'}"}),
                              tmp_path / "local", runtime="inprocess", progress=False)
    mirrored = tmp_path / "shared" / "runs" / "x"
    assert json.loads((mirrored / "summary.json").read_text()) == result.summary
    assert (mirrored / "checkpoints" / "epoch_0001" / "peer_2.pt").is_file()
    assert (mirrored / "export" / "manifest.json").is_file()


class LosesAnActorOnce(InProcessWorkers):
    """The in-process workers, except that collecting one chosen step reports a lost actor once (a drill of the loop's
    recovery; the real thing, a killed process and a removed node, is in tests/test_multinode.py)."""

    def __init__(self, *args, at):
        super().__init__(*args)
        self.at, self.fired = at, False

    def submit_step(self, epoch, step):
        return (epoch, step), super().submit_step(epoch, step)

    def collect(self, handle):
        where, metrics = handle
        if not self.fired and where == self.at:
            self.fired = True
            raise WorkerLost("drill")
        return metrics


@pytest.mark.parametrize("every_steps, expected_redone", [(None, 4), (3, 1)])
def test_rollback_to_the_last_common_point_replays_exactly(tmp_path, every_steps, expected_redone):
    config = raydistill.load_config(tiny_dml(**{"train.epochs": 2, "train.batch_size": 32,
                                                "train.checkpoint_every_steps": every_steps}))
    spec, arrays = load_run_data(config)
    workers = LosesAnActorOnce(config, spec, arrays, at=(1, 4))     # step 4 of epoch 2 is lost
    summary = Run(config, spec, arrays, workers, tmp_path / "drill", "inprocess", Console(False)).train().summary
    assert (summary["restarts"], summary["steps_redone"]) == (1, expected_redone)
    reference = raydistill.train(config, tmp_path / "reference", runtime="inprocess", progress=False)
    assert_same_parameters(final_parameters(tmp_path / "drill", 3), final_parameters(reference.run_dir, 3), tol=0.0)
    assert reference.summary["restarts"] == 0


def test_load_model_does_not_import_ray(ray_run):
    import subprocess
    import sys

    code = ("import sys, torch, raydistill; m = raydistill.load_model(sys.argv[1]); "
            "out = m(torch.rand(2, 1, 8, 8)); assert out.shape == (2, 10); "
            "assert 'ray' not in sys.modules, 'ray was imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(ray_run.run_dir)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
