"""Codistillation (resources.transport=codistill): weights every k steps, the other peers' outputs from stale copies.

Its equivalence with the in-process run on Ray (several workers, calls that cross the exchanges) is in
test_equivalence.py (the codistill-* run shapes); here: what it is against the per-step exchange, and its state."""
import pytest
import torch

import raydistill
from raydistill.config import load_config
from tests.conftest import tiny_dml
from tests.test_equivalence import assert_identical, peer_states


def config(method: str, **overrides) -> dict:
    return tiny_dml(**{"method.name": method, "train.epochs": 2, "model.options": {"hidden": [16]},
                       "train.batch_size": 128, **overrides})


def codistill(k: int) -> dict:
    return {"resources.transport": "codistill", "method.codistill_every": k}


@pytest.mark.parametrize("method", ["dml", "pcl"])      # logits alone; logits and EMA teachers
def test_an_exchange_every_step_is_the_per_step_exchange_and_a_stale_one_is_not(method, tmp_path):
    """k = 1: every stale copy holds the weights its peer runs forward with, so the run equals the per-step exchange
    bit for bit (students and EMA teachers); k = 4 trains from outputs up to 3 steps old, and ends elsewhere."""
    outputs = raydistill.train(config(method), tmp_path / "outputs", runtime="inprocess", progress=False)
    every = raydistill.train(config(method, **codistill(1)), tmp_path / "k1", runtime="inprocess", progress=False)
    stale = raydistill.train(config(method, **codistill(4)), tmp_path / "k4", runtime="inprocess", progress=False)
    expected = peer_states(outputs.run_dir, 3)
    assert_identical(peer_states(every.run_dir, 3), expected)
    differences = [(a - b).abs().max().item() for got, want in zip(peer_states(stale.run_dir, 3)["peers"],
                                                                  expected["peers"])
                   for a, b in zip(got["model"].values(), want["model"].values()) if a.is_floating_point()]
    assert max(differences) > 1e-4


def test_the_run_states_its_exchange_interval_and_the_default_is_ten():
    assert load_config(config("dml", **{"resources.transport": "codistill"})).method.codistill_every == 10
    assert load_config(config("dml")).method.codistill_every is None


def test_a_codistilled_run_resumed_mid_interval_ends_as_the_uninterrupted_run(tmp_path):
    """10 steps per epoch, an exchange every 4 steps of an epoch: epoch 1's last at its step 8. The resumed run (no
    copies yet) exchanges at epoch 2's first step, and so does the uninterrupted one: an epoch starts with an
    exchange (counting steps over the run instead, epoch 2 would start mid-interval, and the two would differ)."""
    run = config("pcl", **codistill(4))
    whole = raydistill.train(run, tmp_path / "whole", runtime="inprocess", progress=False)
    stopped = tmp_path / "stopped"
    raydistill.train(run, stopped, runtime="inprocess", stop_after_epoch=1, progress=False)
    raydistill.train(resume=stopped, runtime="inprocess", progress=False)
    assert_identical(peer_states(stopped, 3), peer_states(whole.run_dir, 3))


def test_a_stale_copy_gives_its_peers_outputs_for_its_weights():
    """The copy's outputs on a step are the peer's forward outputs on it, when it holds the peer's weights."""
    from raydistill.engine.codistill import StaleCopy, weights_of
    from raydistill.engine.data import load_run_data
    from raydistill.engine.peer import Peer

    run = load_config(config("pcl", **codistill(3)))
    spec, arrays = load_run_data(run)
    peers = [Peer(i, run, arrays, spec) for i in range(2)]
    copy = StaleCopy(1, run, spec, peers[0].data, peers[0].method, peers[0].device)
    copy.load(weights_of(peers[1]))
    got = copy.outputs(0, 2, 0, peers[0].autocast)
    want = peers[1].forward(0, 2)
    assert sorted(got) == sorted(want) == ["ema_logits", "logits"]
    for key in got:
        assert torch.equal(got[key], want[key]), key



def test_a_peer_added_to_a_codistilled_run_trains_from_the_others_stale_copies(tmp_path):
    """Elastic peers and codistillation: a resume that adds a peer rebuilds every worker's copies for the new peer
    set (the new peer's view and dropout seed follow its id) and exchanges at the epoch's first step."""
    import pandas as pd

    run_dir = tmp_path / "run"
    raydistill.train(config("pcl", **codistill(3)), run_dir, runtime="inprocess", stop_after_epoch=1, progress=False)
    result = raydistill.train(resume=run_dir, overrides={"peers.3": {"arch": "mlp", "init": "peer:2"}},
                              runtime="inprocess", progress=False)
    assert [p["name"] for p in result.summary["peers"]] == ["peer0", "peer1", "peer2", "peer3"]
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(metrics[metrics.model == "peer3"]["epoch"]) == [2]
    states = peer_states(run_dir, 4)["peers"]
    # a copy of peer2 at epoch 1's end, then trained on its own view of epoch 2 (pcl: a view per peer id): it has
    # moved away from peer2
    moved = [(a - b).abs().max().item() for a, b in zip(states[3]["model"].values(), states[2]["model"].values())
             if a.is_floating_point()]
    assert max(moved) > 1e-4
