"""Elastic peers: a peer added to and another removed from a running run, on the Ray runtime and both transports.

This file covers:
- the drill: a 6-epoch run, a peer added after epoch 2 and another removed after epoch 4 through control requests
  written into its run directory (what ``raydistill peers add|remove`` writes), a bad request refused in one line while
  the run goes on; every peer's history (metrics.parquet, TensorBoard, summary, export, the final table) under its
  stable name;
- exactness: the live changes on Ray end with the parameters of the same changes made offline in this process
  (``--resume DIR --set peers=...`` after epochs 2 and 4);
- the command line against a running ``raydistill train``, and its one-line refusals; the same changes offline
  (``train --resume DIR --set peers...``), and a run resumed after a live change;
- the methods whose coordinator keeps per-peer state refuse a change in one line; an added peer the cluster has no
  room for is refused and the run goes on with its peers, exactly as without the request.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import raydistill
from raydistill.cli import main
from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint
from raydistill.errors import ConfigError
from raydistill.runtime import control
from raydistill.runtime.control import requested_config
from raydistill.runtime.inprocess import InProcessWorkers
from tests.conftest import one_line, tiny_dml, write_config
from tests.test_cli import session_address
from tests.test_failures import wait_for
from tests.test_runtime import assert_same_parameters, tensorboard_scalars

REPO = Path(__file__).resolve().parents[1]


def drill(run_dir, init: str):
    """on_epoch: after epoch 2 a peer joins; after epoch 4 peer1 leaves, and a request for an unknown peer is made."""
    def on_epoch(report, checkpoint):
        if report["epoch"] == 2:
            control.submit(run_dir, {"action": "add", "arch": "mlp", "init": init})
        if report["epoch"] == 4:
            control.submit(run_dir, {"action": "remove", "peer": 1})
            control.submit(run_dir, {"action": "remove", "peer": 7})
    return on_epoch


def final_parameters_by_name(run_dir) -> dict:
    state = load_checkpoint(latest_checkpoint(run_dir), 0)
    return dict(zip(state["loop"]["peers"], (peer["model"] for peer in state["peers"])))


def offline(tmp_path, init: str) -> dict:
    """The same changes made by stopping and resuming in this process with another peer list."""
    run_dir = tmp_path / "offline"
    raydistill.train(tiny_dml(**{"train.epochs": 6}), run_dir, runtime="inprocess", stop_after_epoch=2,
                     progress=False)
    raydistill.train(resume=run_dir, overrides={"peers.3": {"arch": "mlp", "init": init}}, runtime="inprocess",
                     stop_after_epoch=4, progress=False)
    raydistill.train(resume=run_dir, overrides={"peers": [{"id": 0}, {"id": 2}, {"id": 3}]},
                     runtime="inprocess", progress=False)
    return final_parameters_by_name(run_dir)


@pytest.mark.parametrize("transport,init", [("collective", "ensemble"), ("object_store", "peer:0")])
def test_a_peer_added_at_epoch_2_and_another_removed_at_epoch_4_keep_their_histories(ray_session, tmp_path, capsys,
                                                                                    transport, init):
    run_dir = tmp_path / "live"
    result = raydistill.train(tiny_dml(**{"train.epochs": 6, "resources.transport": transport}), run_dir,
                              on_epoch=drill(run_dir, init))
    out = capsys.readouterr().out

    # phase 1: the requests were answered, the bad one refused in one line, and the run went on to its end
    answers = sorted(p.suffix for p in (run_dir / "control").iterdir())
    assert answers == [".done", ".done", ".refused"]
    assert "peers: added peer3 (mlp, init " in out and "peers: removed peer1 after epoch 4" in out
    assert "peers: refused: --peer=7: not a peer of the run (its peers: peer0, peer2, peer3)" in out
    assert not (run_dir / "control" / "running.json").exists()

    # phase 2: metrics.parquet keeps every peer's rows under its name: peer3 from epoch 3, peer1 up to epoch 4
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    epochs = metrics.groupby("model")["epoch"].apply(sorted).to_dict()
    assert epochs == {"peer0": [1, 2, 3, 4, 5, 6], "peer1": [1, 2, 3, 4], "peer2": [1, 2, 3, 4, 5, 6],
                      "peer3": [3, 4, 5, 6], "ensemble": [1, 2, 3, 4, 5, 6]}
    scalars = tensorboard_scalars(run_dir)
    assert [step for step, _ in scalars["peer1/val/acc"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["peer3/val/acc"]] == [3, 4, 5, 6]
    assert [step for step, _ in scalars["peer2/val/acc"]] == [1, 2, 3, 4, 5, 6]

    # phase 3: the summary, the final table and the export list every peer that ever trained
    summary = json.loads((run_dir / "summary.json").read_text())
    peers = {p["name"]: p for p in summary["peers"]}
    assert sorted(peers) == ["peer0", "peer1", "peer2", "peer3"]
    assert peers["peer1"]["removed_at_epoch"] == 4 and "removed_at_epoch" not in peers["peer3"]
    last_peer1 = metrics[(metrics.model == "peer1") & (metrics.epoch == 4)]["val_acc"].item()
    assert peers["peer1"]["val_acc"] == pytest.approx(last_peer1)
    assert [(c["action"], c["peer"], c["epoch"]) for c in summary["peer_changes"]] == \
        [("add", "peer3", 2), ("remove", "peer1", 4)]
    assert "peer1 (removed at epoch 4)" in out and "\npeer3 " in out
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert sorted(manifest["models"]) == ["peer0", "peer1", "peer2", "peer3"]
    assert manifest["models"]["peer1"]["removed"] is True
    assert summary["deploy"]["name"] in ("peer0", "peer2", "peer3")
    removed = raydistill.load_model(run_dir, peer=1)
    assert all(p.dtype.is_floating_point for p in removed.parameters())
    assert result.summary["epochs_completed"] == 6

    # phase 4: exactness: the live changes on Ray equal the same changes made offline in this process
    live = final_parameters_by_name(run_dir)
    reference = offline(tmp_path, init)
    assert sorted(live) == sorted(reference) == ["peer0", "peer2", "peer3"]
    assert_same_parameters([live[n] for n in sorted(live)], [reference[n] for n in sorted(live)])


def test_a_removed_peers_name_is_never_reused_and_bad_requests_name_what_is_allowed(tmp_path):
    config = raydistill.load_config(tiny_dml())
    loop = {"changes": [{"epoch": 1, "action": "remove", "peer": "peer3", "arch": "mlp"}]}
    added = requested_config(config, {"action": "add", "init": "scratch"}, loop)
    assert added.peer_names == ["peer0", "peer1", "peer2", "peer4"]
    with pytest.raises(ConfigError, match=r"peers\.3\.arch='nosuch'"):
        requested_config(config, {"action": "add", "arch": "nosuch"}, loop)
    with pytest.raises(ConfigError, match=r"peers\.3\.init='peer:x'"):
        requested_config(config, {"action": "add", "init": "peer:x"}, loop)
    single = raydistill.load_config(tiny_dml(**{"peers": 1, "method.name": "independent"}))
    with pytest.raises(ConfigError, match="the run's last peer"):
        requested_config(single, {"action": "remove", "peer": 0}, {})
    with pytest.raises(ConfigError, match=r"^peers\.1\.init='ensemble': a new run has no checkpoint; init starts"):
        raydistill.train(tiny_dml(peers=[{}, {"init": "ensemble"}]), tmp_path / "run", runtime="inprocess")
    performance = raydistill.load_config(tiny_dml(**{"method.peer_weighting": "performance"}))
    with pytest.raises(ConfigError, match=r"^method\.peer_weighting='performance': .*peer_weighting: uniform$"):
        requested_config(performance, {"action": "remove", "peer": 0}, {})


def test_the_cli_removes_a_peer_of_a_running_train_and_refuses_a_run_that_is_not_running(ray_session, tmp_path,
                                                                                         capsys):
    """`raydistill peers` (run here, as the console script's main) against `raydistill train` in its own process."""
    assert main(["peers", "remove", str(tmp_path / "nothing"), "--peer", "1"]) == 2
    assert one_line(capsys.readouterr().err).startswith("raydistill: error: RUN=")
    config = write_config(tmp_path / "run.yaml", tiny_dml(**{"train.epochs": 300}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    train = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "train", config, "--output", str(run_dir),
                              "--quiet", "--address", session_address(ray_session)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: control.running(run_dir) or train.poll() is not None, 180, "the run to start")
        assert main(["peers", "remove", str(run_dir), "--peer", "2", "--timeout", "120"]) == 0
        assert "removed peer2 after epoch" in capsys.readouterr().out
        assert main(["peers", "remove", str(run_dir), "--peer", "2"]) == 1
        assert one_line(capsys.readouterr().err) == \
            "raydistill: refused: --peer=2: not a peer of the run (its peers: peer0, peer1)"
    finally:
        train.terminate()
        train.wait(60)
    assert main(["peers", "add", str(run_dir)]) == 2
    assert "shows no running run" in one_line(capsys.readouterr().err)


def test_offline_changes_through_resume_keep_the_histories_and_a_refused_change_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", tiny_dml(**{"train.epochs": 3}))
    run_dir = str(tmp_path / "run")
    inprocess = ["--runtime", "inprocess"]
    assert main(["train", config, "--output", run_dir, "--stop-after-epoch", "1", *inprocess]) == 0
    assert main(["train", "--resume", run_dir, "--stop-after-epoch", "2", "--set", "peers.3.init=peer:2",
                 *inprocess]) == 0
    assert "peers: added peer3 (mlp, init peer:2) after epoch 1; peers now peer0, peer1, peer2, peer3" in \
        capsys.readouterr().out
    assert yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["peers"][3]["init"] is None   # carried out
    assert main(["train", "--resume", run_dir, "--set", "peers=[{id: 0}, {id: 2}, {id: 3}]", *inprocess]) == 0
    assert "peers: removed peer1 after epoch 2; peers now peer0, peer2, peer3" in capsys.readouterr().out
    metrics = pd.read_parquet(Path(run_dir) / "metrics.parquet")
    assert metrics.groupby("model")["epoch"].apply(sorted).to_dict() == {
        "peer0": [1, 2, 3], "peer1": [1, 2], "peer2": [1, 2, 3], "peer3": [2, 3], "ensemble": [1, 2, 3]}
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert [(p["name"], p.get("removed_at_epoch")) for p in summary["peers"]] == \
        [("peer0", None), ("peer2", None), ("peer3", None), ("peer1", 2)]

    pcl = write_config(tmp_path / "pcl.yaml", tiny_dml(**{"train.epochs": 2, "method.name": "pcl",
                                                          "method.ensemble": "learned_head"}))
    pcl_dir = str(tmp_path / "pcl")
    assert main(["train", pcl, "--output", pcl_dir, "--stop-after-epoch", "1", *inprocess]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", pcl_dir, "--set", "peers=2", *inprocess]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        "raydistill: error: method.ensemble='learned_head': a learned ensemble head is as wide as the peer set")


def test_a_run_resumed_after_a_live_change_goes_on_with_its_new_peers(tmp_path):
    run_dir = tmp_path / "run"

    def add_after_epoch_1(report, checkpoint):
        if report["epoch"] == 1:
            control.submit(run_dir, {"action": "add", "init": "scratch"})

    raydistill.train(tiny_dml(**{"train.epochs": 3}), run_dir, runtime="inprocess", stop_after_epoch=2,
                     on_epoch=add_after_epoch_1, progress=False)
    result = raydistill.train(resume=run_dir, runtime="inprocess", progress=False)
    assert [p["name"] for p in result.summary["peers"]] == ["peer0", "peer1", "peer2", "peer3"]
    assert load_checkpoint(latest_checkpoint(run_dir), 0)["loop"]["peers"] == ["peer0", "peer1", "peer2", "peer3"]
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(metrics[metrics.model == "peer3"]["epoch"]) == [2, 3]


def test_an_added_peer_that_does_not_fit_is_refused_and_the_run_goes_on_as_without_the_request(ray_session,
                                                                                                 tmp_path):
    # 3 peers of 2.5 CPUs on the session's 8: workers of 2 and 1 peers (7.5 CPUs); 4 peers would need 10
    config = tiny_dml(**{"train.epochs": 3, "resources.cpus_per_peer": 2.5, "resources.peers_per_worker": 2})
    run_dir = tmp_path / "live"

    def add_after_epoch_1(report, checkpoint):
        if report["epoch"] == 1:
            control.submit(run_dir, {"action": "add", "init": "scratch"})

    raydistill.train(config, run_dir, on_epoch=add_after_epoch_1, progress=False)
    refused = [json.loads(p.read_text()) for p in (run_dir / "control").glob("*.refused")]
    assert [r["message"] for r in refused] == \
        ["refused: resources.cpus_per_peer=2.5: the run needs 10 CPUs; the cluster has 8"]
    reference = tmp_path / "reference"
    raydistill.train(config, reference, runtime="inprocess", progress=False)
    live, expected = final_parameters_by_name(run_dir), final_parameters_by_name(reference)
    assert sorted(live) == sorted(expected) == ["peer0", "peer1", "peer2"]
    assert_same_parameters([live[n] for n in sorted(live)], [expected[n] for n in sorted(live)])


def test_a_peer_that_joins_from_the_ensemble_agrees_with_it_more_than_one_from_scratch(tmp_path):
    import torch

    from raydistill.data.views import to_float
    from raydistill.engine.data import load_run_data
    from raydistill.engine.elastic import change_peers
    from raydistill.models import build_model

    run_dir = tmp_path / "run"
    raydistill.train(tiny_dml(**{"train.epochs": 5}), run_dir, runtime="inprocess", progress=False)
    old = raydistill.load_config(run_dir)
    state = load_checkpoint(latest_checkpoint(run_dir), 0)
    spec, arrays = load_run_data(old)
    x = to_float(arrays["val_x"])

    def probabilities(settings, model_state):
        model = build_model(settings.arch, spec, **settings.options)
        model.load_state_dict(model_state)
        with torch.no_grad():
            return model.eval()(x).softmax(1)

    ensemble = torch.stack([probabilities(s, p["model"]) for s, p in zip(old.peers, state["peers"])]).mean(0)
    disagreement = {}
    for init in ("scratch", "ensemble"):
        new = raydistill.load_config(run_dir, {"peers.3.init": init})
        changed, _, events = change_peers(old, new, state, spec, arrays)
        assert events == [{"epoch": 5, "action": "add", "peer": "peer3", "arch": "mlp", "init": init}]
        joined = probabilities(new.peers[3], changed["peers"][3]["model"])
        disagreement[init] = torch.nn.functional.kl_div(joined.log(), ensemble, reduction="batchmean").item()
    assert disagreement["ensemble"] < 0.25 * disagreement["scratch"], disagreement


def test_a_peer_that_cannot_train_and_malformed_requests_are_refused_and_the_run_goes_on(ray_session, tmp_path):
    """On Ray: `peers add --arch alexnet` on the 8x8 digits (its poolings shrink them below 1x1) is refused in one line
    before anything stops, as are a request whose options are not a mapping and a file that is not JSON; a folder
    named like a request is left alone. The run ends with the parameters of a run without the requests, and no
    checkpoint or config.yaml ever names alexnet."""
    config = tiny_dml(**{"train.epochs": 3})
    run_dir = tmp_path / "live"

    def requests(report, checkpoint):
        if report["epoch"] == 1:
            control.submit(run_dir, {"action": "add", "arch": "alexnet"})
            control.submit(run_dir, {"action": "add", "options": "zz"})
            (run_dir / "control" / "x.json").mkdir()
            (run_dir / "control" / "9-garbage.json").write_text("{not json")

    raydistill.train(config, run_dir, on_epoch=requests, progress=False)
    refused = sorted(json.loads(p.read_text())["message"] for p in (run_dir / "control").glob("*.refused"))
    assert len(refused) == 3, refused
    assert refused[0] == "refused: options='zz': a mapping of the architecture's options"
    assert refused[1].startswith("refused: peers.3.arch='alexnet': cannot train on this data set's inputs [1, 8, 8] "
                                 "with options {} (RuntimeError: "), refused[1]
    assert refused[2] == "refused: request='9-garbage.json': is not a JSON object"
    assert (run_dir / "control" / "x.json").is_dir()
    assert "alexnet" not in (run_dir / "config.yaml").read_text()
    reference = raydistill.train(config, tmp_path / "reference", runtime="inprocess", progress=False)
    live, expected = final_parameters_by_name(run_dir), final_parameters_by_name(reference.run_dir)
    assert sorted(live) == sorted(expected) == ["peer0", "peer1", "peer2"]
    assert_same_parameters([live[n] for n in sorted(live)], [expected[n] for n in sorted(live)])


class FailsInItsFirstCall(InProcessWorkers):
    """The workers of a peer set that passes the driver's check but fails in its first call of steps, as a peer that
    cannot train on its device does (an error raised in the worker)."""

    def run_steps(self, epoch, first, count, replay=0, on_step=None):
        raise RuntimeError("CUDA out of memory (drill)")


def test_a_new_peer_set_that_fails_in_its_first_epoch_is_undone_and_no_checkpoint_holds_it(tmp_path, capsys):
    """The change is on trial until the new set has trained an epoch: its failure starts the set before the change
    again from its state, refuses the request, and the run ends as one without it. (The error raised in a Ray worker
    reaches the same handler: test_a_peer_that_cannot_train... and the CLI's one-line cause,
    tests/test_failures.py.)"""
    from raydistill.engine.checkpoint import list_checkpoints
    from raydistill.engine.data import load_run_data
    from raydistill.runtime.console import Console
    from raydistill.runtime.loop import Run

    config = raydistill.load_config(tiny_dml(**{"train.epochs": 3}))
    spec, arrays = load_run_data(config)
    run_dir = tmp_path / "run"

    def add_after_epoch_1(report, checkpoint):
        if report["epoch"] == 1:
            control.submit(run_dir, {"action": "add", "init": "scratch"})

    def rebuild(changed):
        return (FailsInItsFirstCall if changed.num_peers == 4 else InProcessWorkers)(changed, spec, arrays)

    run = Run(config, spec, arrays, InProcessWorkers(config, spec, arrays), run_dir, "inprocess", Console(True),
              on_epoch=add_after_epoch_1, rebuild=rebuild)
    summary = run.train().summary
    out = capsys.readouterr().out
    message = ("refused: the new peer set failed in its first epoch (RuntimeError: CUDA out of memory (drill)); the "
               "run goes on with peers peer0, peer1, peer2")
    assert f"peers: {message}" in out
    assert [json.loads(p.read_text())["message"] for p in (run_dir / "control").glob("*.refused")] == [message]
    assert [p["name"] for p in summary["peers"]] == ["peer0", "peer1", "peer2"] and "peer_changes" not in summary
    for checkpoint in list_checkpoints(run_dir):
        assert load_checkpoint(checkpoint, 0)["loop"]["peers"] == ["peer0", "peer1", "peer2"], checkpoint
    assert not (run_dir / "config.yaml").exists()            # the change never wrote its config (Run alone here)
    reference = raydistill.train(config, tmp_path / "reference", runtime="inprocess", progress=False)
    live, expected = final_parameters_by_name(run_dir), final_parameters_by_name(reference.run_dir)
    assert_same_parameters([live[n] for n in sorted(live)], [expected[n] for n in sorted(live)])
    assert pd.read_parquet(run_dir / "metrics.parquet").groupby("model")["epoch"].apply(list).to_dict()["peer0"] == \
        [1, 2, 3]


def test_after_a_removal_peer_k_copies_peerk_and_each_peer_keeps_the_view_of_its_id(ray_session, tmp_path):
    """kdcl gives each peer its own augmented view, seeded by its stable id (README "Views"). On Ray: peer0 leaves
    after epoch 1; after epoch 2 a peer joins with init peer:1, which copies peer1 (now at place 0), not the peer at
    place 1 (peer2): the checkpoint of the change holds peer3 with peer1's model and optimizer state. Every peer of
    the new set draws the view of its id, as the docs promise, not of its place. The shared-memory folder of the
    first workers' group goes with them, although the set in between needs no group."""
    from raydistill.data.views import make_view
    from raydistill.engine.checkpoint import checkpoint_path
    from raydistill.engine.data import load_run_data

    config = tiny_dml(**{"train.epochs": 3, "method.name": "kdcl", "train.keep_checkpoints": 5,
                         "resources.peers_per_worker": 2})
    run_dir = tmp_path / "live"
    shm = set(Path("/dev/shm").glob("raydistill-*"))

    def changes(report, checkpoint):
        if report["epoch"] == 1:                        # 2 workers (2 peers + 1) -> 1 worker of 2 peers
            control.submit(run_dir, {"action": "remove", "peer": 0})
        if report["epoch"] == 2:
            control.submit(run_dir, {"action": "add", "init": "peer:1"})

    raydistill.train(config, run_dir, on_epoch=changes, progress=False)
    assert set(Path("/dev/shm").glob("raydistill-*")) <= shm      # every group's shared memory went with it
    state = load_checkpoint(checkpoint_path(run_dir, 2), 0)
    names = state["loop"]["peers"]
    assert names == ["peer1", "peer2", "peer3"]
    copy, source, other = (state["peers"][names.index(n)] for n in ("peer3", "peer1", "peer2"))
    assert_same_parameters([copy["model"]], [source["model"]])
    with pytest.raises(AssertionError):
        assert_same_parameters([copy["model"]], [other["model"]])
    changed = raydistill.load_config(run_dir)
    assert [p.id for p in changed.peers] == [1, 2, 3]
    spec, arrays = load_run_data(changed)
    worker = InProcessWorkers(changed, spec, arrays).worker          # the engine object each Ray worker runs
    for place, peer in enumerate(worker.peers):
        assert peer.view_index == peer.method.view_index(peer.id) != peer.method.view_index(place)
        idx = peer.data.indices(0, 0)
        expected = make_view(torch.from_numpy(arrays["train_x"])[idx], changed.seed, 0, 0,
                             peer.method.view_index(peer.id), changed.data.crop_pad, changed.data.flip,
                             changed.data.pad_mode)
        assert torch.equal(peer.data.view(0, 0, peer.view_index), expected)
