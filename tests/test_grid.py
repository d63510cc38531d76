"""Peers of several ranks (engine/grid.py): a peer as k data-parallel ranks, each on its rows of every step's batch.

This test covers, on the session's Ray (CPU workers, gloo groups):
- 2 MLP peers of 2 ranks each train the function of 2 one-rank peers at the full batch (within 1e-5: the only
  difference is the order of a gradient sum), for dml and for kdcl (a view per peer, so each rank slices the whole
  batch's augmentation draws); and the run on Ray equals the in-process runtime's grid exactly;
- a rank killed mid-epoch: the grid re-forms, rolls back, and ends with the uninterrupted run's parameters;
- a peer of 2 ranks added to a running run (raydistill peers add --ranks 2), equal to the same change made offline;
- a Tune search whose trials' peers have 2 ranks;
- the views a rank draws are its rows of the whole batch's views, bit for bit; the ranks' gradient average is the
  hand-summed mean in rank order; sync_bn on peers without batch norm is a warning, not an error.
Runs are tiny (digits, a 32-unit MLP, batch 128: 10 steps an epoch).
"""
import copy
import json
import signal
import threading

import pytest
import torch

import raydistill
from raydistill.engine import grid
from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint
from raydistill.runtime import control
from tests.conftest import tiny_dml
from tests.test_failures import Watcher, signal_during_a_call, worker_pid
from tests.test_runtime import assert_same_parameters


def grid_run(**overrides) -> dict:
    return tiny_dml(**{"name": "grid", "peers": 2, "resources.ranks_per_peer": 2, "train.epochs": 1,
                       **overrides})


def models(run_dir, peers: int = 2) -> list:
    return [p["model"] for p in load_checkpoint(latest_checkpoint(run_dir), peers)["peers"]]


@pytest.mark.parametrize("method", ["dml", "kdcl"])
def test_two_rank_peers_train_as_one_rank_peers_at_the_full_batch_and_ray_equals_the_in_process_grid(
        ray_session, tmp_path, method):
    config = grid_run(**{"method.name": method})
    on_ray = raydistill.train(copy.deepcopy(config), tmp_path / "ray", progress=False)
    assert on_ray.summary["worker_nodes"] and len(on_ray.summary["worker_nodes"]) == 4     # a worker per rank
    in_process = raydistill.train(copy.deepcopy(config), tmp_path / "grid", runtime="inprocess", progress=False)
    assert_same_parameters(models(on_ray.run_dir), models(in_process.run_dir))             # tolerance 0
    one_rank = copy.deepcopy(config)
    one_rank["resources"]["ranks_per_peer"] = 1
    whole = raydistill.train(one_rank, tmp_path / "one-rank", runtime="inprocess", progress=False)
    assert_same_parameters(models(on_ray.run_dir), models(whole.run_dir), tol=1e-5)
    with pytest.raises(AssertionError):                       # the grid is not the one-rank run by accident
        assert_same_parameters(models(on_ray.run_dir), models(whole.run_dir), tol=0.0)


@pytest.mark.timeout(300)
def test_a_rank_killed_mid_epoch_recovers_to_the_uninterrupted_runs_parameters(ray_session, tmp_path):
    config = grid_run(**{"name": "gridkill", "train.epochs": 2, "resources.node_wait_s": 60,
                         "resources.collective_timeout_s": 10})
    driver = threading.current_thread()
    killer = Watcher(lambda: signal_during_a_call(worker_pid(config, "worker1"), signal.SIGKILL, driver))
    result = raydistill.train(copy.deepcopy(config), tmp_path / "killed", progress=False)
    killer.finish()
    assert result.summary["restarts"] >= 1
    reference = raydistill.train(copy.deepcopy(config), tmp_path / "reference", runtime="inprocess", progress=False)
    assert_same_parameters(models(result.run_dir), models(reference.run_dir))


def test_a_peer_of_two_ranks_joins_a_running_run_as_it_would_offline(ray_session, tmp_path):
    config = tiny_dml(**{"name": "gridadd", "peers": 2, "train.epochs": 3})
    run_dir = tmp_path / "live"

    def add(report, checkpoint):
        if report["epoch"] == 1:
            control.submit(run_dir, {"action": "add", "ranks": 2})

    result = raydistill.train(copy.deepcopy(config), run_dir, on_epoch=add, progress=False)
    assert [p["name"] for p in result.summary["peers"]] == ["peer0", "peer1", "peer2"]
    assert [c["peer"] for c in result.summary["peer_changes"]] == ["peer2"]
    assert raydistill.load_config(run_dir).peers[2].ranks == 2
    offline = tmp_path / "offline"
    raydistill.train(copy.deepcopy(config), offline, runtime="inprocess", stop_after_epoch=1, progress=False)
    raydistill.train(resume=offline, overrides={"peers.2": {"ranks": 2}}, runtime="inprocess", progress=False)
    assert_same_parameters(models(run_dir, 3), models(offline, 3))


@pytest.mark.timeout(300)
def test_a_tune_search_runs_trials_whose_peers_have_two_ranks(ray_session, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("metric: val_acc\nmode: max\nmethod.temperature: {grid: [2.0]}\n")
    best = raydistill.tune(grid_run(**{"name": "gridtune"}), str(space), samples=1, output=tmp_path / "search",
                           progress=False)
    assert best["complete"] and best["statuses"] == {"completed": 1}, best
    trial = json.loads((tmp_path / "search" / "best.json").read_text())
    assert trial["config"]["resources"]["ranks_per_peer"] == 2


def test_a_ranks_view_is_its_rows_of_the_whole_batchs_view_and_the_gradient_is_the_rank_order_mean():
    from raydistill.data.views import make_view

    x = torch.randint(0, 256, (128, 1, 8, 8), dtype=torch.uint8)
    whole = make_view(x, 3, 0, 5, 1, 1, True)
    for rank in range(4):
        rows = grid.rows(128, rank, 4)
        part = make_view(x[rows], 3, 0, 5, 1, 1, True, rows=rows, batch_size=128)
        assert torch.equal(part, whole[rows])
    flats = [torch.randn(1000, dtype=torch.float32) for _ in range(3)]
    expected = ((flats[0] + flats[1]) + flats[2]) / 3
    assert torch.equal(grid.combine(flats), expected)


def test_sync_bn_on_peers_without_batch_norm_is_a_warning_not_an_error():
    from raydistill.config import load_config
    from raydistill.engine.data import load_run_data

    mlp = load_config(grid_run(), [])
    spec, _ = load_run_data(mlp)
    mlp.train.sync_bn = True                      # as a GPU run has it (on CPUs the config refuses it)
    assert grid.sync_bn_warning(mlp, spec) == ("warning: train.sync_bn: mlp has no batch norm layer; it trains as "
                                               "without sync_bn")
    cnn = load_config(grid_run(**{"model.arch": "cnn_small", "model.options": {}}), [])
    cnn.train.sync_bn = True
    assert grid.sync_bn_warning(cnn, spec) is None
