"""The N-GPU scaling model (scripts/scaling_model.py): pure arithmetic, no torch, no Ray."""
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scaling_model.py"


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("scaling_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_peer_is_the_standalone_throughput(model):
    for step_ms in (14.7, 4.65):
        r = model.predict(1, step_ms, cv=0.1, pair_us=500.0, intra_latency_us=1000.0, overhead_ms=3.0)
        assert r["step_ms"] == step_ms and r["fraction"] == 1.0
        assert r["peer_samples_s"] == pytest.approx(128 / step_ms * 1e3)


def test_more_latency_lowers_the_prediction(model):
    base = model.predict(8, 14.7, intra_latency_us=20.0)["peer_samples_s"]
    assert model.predict(8, 14.7, intra_latency_us=100.0)["peer_samples_s"] < base
    assert model.predict(16, 14.7, inter_latency_us=50.0)["peer_samples_s"] < model.predict(16, 14.7)["peer_samples_s"]
    # a faster step makes the same exchange cost a larger share
    assert model.predict(8, 4.65)["fraction"] < model.predict(8, 14.7)["fraction"]


def test_ring_cost_grows_with_peers_and_tree_with_log(model):
    nbytes = model.message_bytes(128, 100, 4)
    assert nbytes == 51_200
    ring = [model.allgather_ms(n, nbytes, algorithm="ring") for n in (1, 2, 3, 4, 8)]
    assert ring[0] == 0.0 and all(a < b for a, b in zip(ring, ring[1:]))
    assert ring[-1] == pytest.approx(7 * (20e-3 + nbytes / 450e9 * 1e3))
    tree = model.allgather_ms(8, nbytes, algorithm="tree")
    assert tree == pytest.approx(3 * 20e-3 + 7 * nbytes / 450e9 * 1e3) and tree < ring[-1]
    with pytest.raises(ValueError):
        model.allgather_ms(4, nbytes, algorithm="star")


def test_several_nodes_below_one_node_with_a_slower_link(model):
    slow = {"inter_latency_us": 50.0, "inter_gbytes_s": 3.125}
    one_node = model.predict(16, 14.7, gpus_per_node=16, **slow)
    two_nodes = model.predict(16, 14.7, gpus_per_node=8, **slow)
    assert two_nodes["nodes"] == 2 and one_node["nodes"] == 1
    assert two_nodes["fraction"] < one_node["fraction"]


def test_straggler_is_the_expected_max_of_normals(model):
    assert model.expected_max_normal(1) == 0.0
    assert model.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-4)
    assert model.expected_max_normal(8) == pytest.approx(1.4236, abs=1e-3)
    assert model.predict(8, 10.0, cv=0.0)["straggler_ms"] == 0.0


def test_cli_prints_inputs_table_and_verdict(model, capsys):
    model.main([])
    out = capsys.readouterr().out
    assert "| peers | GPUs (nodes) | compute ms |" in out and "| 8 | 8 (1) |" in out and "| 32 | 32 (4) |" in out
    assert "measured: one H200" in out and "assumed" in out
    verdict = [line for line in out.splitlines() if line.startswith("Verdict: 8 peers on 8 GPUs of one node")]
    assert len(verdict) == 1 and verdict[0].endswith(">= 90%: yes.")
    model.main(["--step-ms", "4.65", "--intra-latency-us", "300"])
    out = capsys.readouterr().out
    assert "step-ms = 4.65 (given)" in out
    assert ">= 90%: no." in out and "mostly the exchange" in out
