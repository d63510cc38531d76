"""Workers spread across nodes, and runs that survive a killed worker process and a lost node, on a real multi-node
Ray on this machine (ray.cluster_utils.Cluster with fake GPUs: the peers see no CUDA device and train on the CPU).

This test covers:
- STRICT_SPREAD: three GPU peers, one per worker, on three distinct nodes; the collective exchange runs across those
  nodes and the run ends with the in-process run's parameters (tolerance 0);
- SPREAD: four CPU peers in two workers use both kinds of node (the CPU-only head and a GPU node);
- an over-subscribed STRICT_SPREAD is refused in one line before anything starts;
- a worker process SIGKILLed during a call of steps, on both transports: Ray restarts it, every worker rolls back, and
  the run ends with the uninterrupted run's parameters;
- a lost node: its worker (every GPU taken) can only come back on a replacement node; the run waits for one, finishes
  with that worker there, and ends with the uninterrupted run's parameters.
"""
import os
import signal
import threading

import pytest
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

import raydistill
from raydistill.runtime.driver import find_actor
from tests.conftest import start_session_ray
from tests.test_failures import Watcher, in_call, parameters, tiny, wait_for
from tests.test_runtime import assert_same_parameters

pytestmark = pytest.mark.slow
NODE = {"num_cpus": 2, "object_store_memory": 80 * 1024 * 1024}
# a node whose raylet is gone is declared dead after ~5 failed checks a second apart (Ray's default: ~15-50 s)
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_timeout_ms": 5000,
          "health_check_failure_threshold": 5}


@pytest.fixture(scope="module")
def cluster():
    """A CPU-only head (the driver's) and three 1-GPU nodes."""
    ray.shutdown()                                  # leave the session's one-node Ray for this module's cluster
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 3, "num_gpus": 0,
                                                            "_system_config": HEALTH})
    cluster.gpu_nodes = [cluster.add_node(**NODE, num_gpus=1) for _ in range(3)]
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes(timeout=120)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    start_session_ray()                             # the session Ray, for the modules after this one


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted in-process run that every run here must end with."""
    return raydistill.train(tiny(), tmp_path_factory.mktemp("reference") / "run", runtime="inprocess",
                            progress=False)


def gpu_node_ids(cluster) -> set:
    return {node.node_id for node in cluster.gpu_nodes}


@pytest.mark.timeout(300)
def test_strict_spread_puts_each_gpu_peer_on_its_own_node_and_the_collective_runs_across_them(cluster, reference,
                                                                                              tmp_path):
    config = tiny(**{"name": "strict", "resources.strategy": "STRICT_SPREAD", "resources.gpus_per_peer": 1})
    summary = raydistill.train(config, tmp_path / "run", progress=False).summary
    assert summary["transport"] == "collective"
    assert [p["node"] for p in summary["peers"]] == summary["worker_nodes"]          # one peer per worker
    assert len(set(summary["worker_nodes"])) == 3 and set(summary["worker_nodes"]) == gpu_node_ids(cluster)
    assert_same_parameters(parameters(tmp_path / "run"), parameters(reference.run_dir))


@pytest.mark.timeout(300)
def test_spread_puts_four_cpu_peers_on_both_kinds_of_node(cluster, tmp_path):
    config = tiny(**{"name": "spread", "peers": 4, "resources.strategy": "SPREAD", "train.epochs": 1,
                     "train.batch_size": 256})
    summary = raydistill.train(config, tmp_path / "run", progress=False).summary
    workers = summary["worker_nodes"]
    assert len(workers) == 2 and len(set(workers)) == 2, workers                  # two workers of two peers
    assert cluster.head_node.node_id in workers and set(workers) & gpu_node_ids(cluster), workers
    assert summary["epochs_completed"] == 1


def test_strict_spread_over_more_workers_than_nodes_is_refused_before_anything_starts(cluster, tmp_path, capsys):
    from raydistill.cli import main

    groups_before = len(ray.util.placement_group_table())
    code = main(["train", "--set", "peers=5", "--set", "resources.strategy=STRICT_SPREAD",
                 "--set", f"resources.address={cluster.address}", "--output", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("raydistill: error: resources.strategy='STRICT_SPREAD': puts each of 5 bundles on its own "
                      "node; the cluster has 4 alive nodes")
    assert not (tmp_path / "x").exists() and len(ray.util.placement_group_table()) == groups_before


def kill_during_epoch_2(config: dict, driver: threading.Thread, role: str = "worker1") -> tuple[dict, callable]:
    """An on_epoch callback: after epoch 1, looks up the worker's process (between calls, while it answers), and
    SIGKILLs it as soon as the driver waits for epoch 2's call of steps. Returns (what happened, the callback)."""
    drill = {}

    def on_epoch(record, checkpoint):
        if record["epoch"] != 1:
            return
        actor = find_actor(raydistill.load_config(config), role)
        pid = ray.get(actor.pid.remote(), timeout=60)

        def kill():
            wait_for(lambda: in_call(driver), 120, "epoch 2's call of steps")
            os.kill(pid, signal.SIGKILL)
        drill["watcher"] = Watcher(kill)

    return drill, on_epoch


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["collective", "object_store"])
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(cluster, reference, tmp_path,
                                                                               transport):
    config = tiny(**{"name": f"kill-{transport}", "resources.transport": transport, "resources.node_wait_s": 60})
    drill, on_epoch = kill_during_epoch_2(config, threading.current_thread())
    summary = raydistill.train(config, tmp_path / "run", progress=False, on_epoch=on_epoch).summary
    drill["watcher"].finish()
    assert summary["transport"] == transport
    assert (summary["epochs_completed"], summary["restarts"], summary["steps_redone"]) == (2, 1, 20)
    assert_same_parameters(parameters(tmp_path / "run"), parameters(reference.run_dir))


@pytest.mark.timeout(400)
def test_a_lost_node_is_replaced_and_the_run_finishes_there(cluster, reference, tmp_path):
    config = tiny(**{"name": "nodeloss", "resources.gpus_per_peer": 1, "resources.node_wait_s": 120})
    run_dir, outcome, drill, epoch_1 = tmp_path / "run", {}, {}, threading.Event()

    def note_worker1(record, checkpoint):
        if record["epoch"] == 1:                      # between calls, while worker 1 answers
            actor = find_actor(raydistill.load_config(config), "worker1")
            drill["node"] = ray.get(actor.node.remote(), timeout=60)
            drill["pid"] = ray.get(actor.pid.remote(), timeout=60)
            epoch_1.set()

    trainer = threading.Thread(target=lambda: outcome.update(run=_train(config, run_dir, note_worker1)),
                               daemon=True)
    # phase 1: the run trains on the three GPU nodes (every GPU taken: worker 1 can only come back on a new node)
    trainer.start()
    wait_for(lambda: epoch_1.is_set() or not trainer.is_alive(), 240, "epoch 1")
    assert trainer.is_alive(), outcome
    wait_for(lambda: in_call(trainer) or not trainer.is_alive(), 60, "epoch 2's call of steps")
    # phase 2: worker 1's node dies in the middle of the call: its raylet and worker 1 at once (Cluster.remove_node
    # alone kills the raylet, and the worker follows only when it notices: the run could end before), then the rest
    # of the node's processes (the main thread: Cluster needs it)
    victim = next(node for node in cluster.gpu_nodes if node.node_id == drill["node"])
    for pid in (victim.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, drill["pid"]):
        os.kill(pid, signal.SIGKILL)
    cluster.remove_node(victim, allow_graceful=False)
    cluster.gpu_nodes.remove(victim)
    # phase 3: Ray notices, and the run's placement group waits for room for the lost bundle
    group = ray.util.get_placement_group(f"raydistill-nodeloss-{os.getpid()}")
    wait_for(lambda: ray.util.placement_group_table(group)["state"] == "RESCHEDULING" or not trainer.is_alive(),
             120, lambda: f"the run's placement group rescheduling the lost node's bundle (it is "
                          f"{ray.util.placement_group_table(group)}; the run: {outcome or 'training'})", poll_s=0.2)
    assert trainer.is_alive(), outcome
    # phase 4: a replacement node; the worker comes back there and the run finishes
    replacement = cluster.add_node(**NODE, num_gpus=1)
    cluster.gpu_nodes.append(replacement)
    trainer.join(timeout=300)
    assert not trainer.is_alive(), "the run did not finish within 300s of the replacement node"
    assert "error" not in outcome.get("run", {}), outcome["run"]["error"]
    summary = outcome["run"]["summary"]
    assert (summary["epochs_completed"], summary["restarts"]) == (2, 1)
    assert summary["peers"][1]["node"] == summary["worker_nodes"][1] == replacement.node_id
    assert_same_parameters(parameters(run_dir), parameters(reference.run_dir))


def _train(config, run_dir, on_epoch) -> dict:
    """A run in a thread: its summary, or the error that ended it."""
    try:
        return {"summary": raydistill.train(config, run_dir, progress=False, on_epoch=on_epoch).summary}
    except Exception as err:  # noqa: BLE001 — reported by the test's assertions
        return {"error": err}
