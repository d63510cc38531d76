"""Peers spread across nodes and surviving the loss of an actor or a node, on a real multi-node Ray on this machine
(ray.cluster_utils.Cluster with fake GPUs: the peers see no CUDA device and train on the CPU)."""
import os
import signal
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

import raydistill
from raydistill.runtime.driver import actor_name
from tests.conftest import start_session_ray, tiny_dml
from tests.test_runtime import assert_same_parameters, final_parameters

pytestmark = pytest.mark.slow
NODE = {"num_cpus": 3, "object_store_memory": 80 * 1024 * 1024}


@pytest.fixture(scope="module")
def cluster():
    """A CPU head (the driver's) and two 1-GPU workers; tests add more workers as they need them."""
    ray.shutdown()                                  # leave the session's one-node Ray for this module's cluster
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_gpus": 0})
    cluster.gpu_nodes = [cluster.add_node(**NODE, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    start_session_ray()                             # the session Ray, for the modules after this one


def node_ids(cluster):
    return {node.node_id for node in cluster.list_all_nodes()}


def gpu_nodes(cluster, count):
    """At least `count` 1-GPU workers in the cluster."""
    while len(cluster.gpu_nodes) < count:
        cluster.gpu_nodes.append(cluster.add_node(**NODE, num_gpus=1))
    cluster.wait_for_nodes()
    return cluster.gpu_nodes


def test_spread_puts_four_cpu_peers_on_both_kinds_of_node(cluster, tmp_path):
    config = tiny_dml(**{"peers": 4, "resources.strategy": "SPREAD", "train.batch_size": 256})
    summary = raydistill.train(config, tmp_path / "run", progress=False).summary
    peer_nodes = [p["node"] for p in summary["peers"]]
    assert set(peer_nodes) <= node_ids(cluster)
    assert len(set(peer_nodes)) >= 2, peer_nodes            # SPREAD: not all on one node
    assert summary["epochs_completed"] == 1


def test_strict_spread_puts_each_gpu_peer_on_its_own_node(cluster, tmp_path):
    gpu_nodes(cluster, 3)
    config = tiny_dml(**{"resources.strategy": "STRICT_SPREAD", "resources.gpus_per_peer": 1,
                         "train.batch_size": 256})
    summary = raydistill.train(config, tmp_path / "run", progress=False).summary
    peer_nodes = [p["node"] for p in summary["peers"]]
    assert len(set(peer_nodes)) == 3 and set(peer_nodes) == {n.node_id for n in cluster.gpu_nodes}
    assert summary["coordinator_node"] == peer_nodes[0]     # it shares peer 0's bundle under STRICT_SPREAD


def test_strict_spread_over_more_peers_than_nodes_is_refused_before_anything_starts(cluster, tmp_path, capsys):
    from raydistill.cli import main

    code = main(["train", "--set", "peers=5", "--set", "resources.strategy=STRICT_SPREAD",
                 "--set", f"resources.address={cluster.address}", "--output", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "resources.strategy='STRICT_SPREAD'" in err[0] and "alive nodes" in err[0]
    assert not (tmp_path / "x").exists()


def kill_when(run_dir, condition, action):
    """Runs `action` from a watcher thread as soon as `condition(run_dir)` holds (the training keeps the main one)."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not condition(run_dir):
            time.sleep(0.05)
        action()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_peer_is_restarted_and_the_run_ends_as_if_nothing_happened(cluster, tmp_path):
    config = tiny_dml(**{"name": "drill", "train.epochs": 3, "train.batch_size": 32})
    run_dir = tmp_path / "killed"

    def kill_peer1():
        pid = ray.get(ray.get_actor(actor_name(raydistill.load_config(config), "peer1")).pid.remote())
        os.kill(pid, signal.SIGKILL)

    watcher = kill_when(run_dir, lambda d: (d / "checkpoints" / "epoch_0001").exists(), kill_peer1)
    summary = raydistill.train(config, run_dir, progress=False).summary
    watcher.join()
    assert summary["epochs_completed"] == 3 and summary["restarts"] == 1
    reference = raydistill.train(config, tmp_path / "reference", runtime="inprocess", progress=False)
    assert_same_parameters(final_parameters(run_dir, 3), final_parameters(reference.run_dir, 3), tol=0.0)


def test_a_lost_node_is_replaced_and_the_run_finishes_there(cluster, tmp_path):
    config = tiny_dml(**{"name": "nodeloss", "train.epochs": 3, "train.batch_size": 32,
                         "resources.gpus_per_peer": 1, "resources.node_wait_s": 90,
                         "train.checkpoint_every_steps": 10})
    run_dir = tmp_path / "nodeloss"
    outcome = {}
    gpu_nodes(cluster, 3)                              # every GPU taken: peer 1 can only come back on a new node

    def run():                                         # the drill itself needs the main thread to add a node
        try:
            outcome["summary"] = raydistill.train(config, run_dir, progress=False).summary
        except Exception as err:  # noqa: BLE001
            outcome["error"] = err

    trainer = threading.Thread(target=run)
    trainer.start()
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "epoch_0001").exists() and time.monotonic() < deadline:
        assert trainer.is_alive(), outcome
        time.sleep(0.05)
    node_id = ray.get(ray.get_actor(actor_name(raydistill.load_config(config), "peer1")).node.remote())
    victim = next(n for n in cluster.gpu_nodes if n.node_id == node_id)
    cluster.remove_node(victim, allow_graceful=False)
    cluster.gpu_nodes.remove(victim)
    time.sleep(3)                                      # the run notices and waits for capacity
    replacement = cluster.add_node(**NODE, num_gpus=1)
    cluster.gpu_nodes.append(replacement)
    trainer.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["epochs_completed"] == 3 and summary["restarts"] >= 1
    assert summary["peers"][1]["node"] == replacement.node_id
    reference = raydistill.train(config, tmp_path / "reference", runtime="inprocess", progress=False)
    assert_same_parameters(final_parameters(run_dir, 3), final_parameters(reference.run_dir, 3), tol=0.0)
