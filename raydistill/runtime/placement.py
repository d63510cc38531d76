"""Bundles and strategies: one placement group per run; which bundle holds the coordinator, each peer, each teacher.

Layout: bundle 0 holds the coordinator (and, in a Tune trial, the trainable itself), then one bundle per peer, then one
per teacher. Under STRICT_SPREAD (one bundle per node) the coordinator shares peer 0's bundle instead, so N peers need
N nodes, not N + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from raydistill.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    bundles: list
    coordinator: int
    peers: list
    teachers: list


def _peer_bundle(config) -> dict:
    r = config.resources
    return {"CPU": r.cpus_per_peer, **({"GPU": r.gpus_per_peer} if r.gpus_per_peer > 0 else {})}


def _teacher_bundle(config) -> dict:
    gpus = config.resources.gpus_per_teacher or 0.0
    return {"CPU": config.resources.cpus_per_peer, **({"GPU": gpus} if gpus > 0 else {})}


def layout(config, driver_cpus: float = 0.0) -> Layout:
    """driver_cpus: what the driver itself reserves in bundle 0 (a Tune trial's trainable runs there)."""
    r = config.resources
    peers = [_peer_bundle(config) for _ in range(config.num_peers)]
    teachers = [_teacher_bundle(config)] if config.teacher is not None else []
    head = r.cpus_per_coordinator + driver_cpus
    if r.strategy == "STRICT_SPREAD":
        peers[0]["CPU"] += head
        return Layout(peers + teachers, 0, list(range(len(peers))),
                      list(range(len(peers), len(peers) + len(teachers))))
    return Layout([{"CPU": head}] + peers + teachers, 0, list(range(1, len(peers) + 1)),
                  list(range(len(peers) + 1, len(peers) + 1 + len(teachers))))


def bundles(config, driver_cpus: float = 0.0) -> list[dict]:
    return layout(config, driver_cpus).bundles


def required(config) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles(config):
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def check_capacity(config, cluster: dict[str, float], nodes: list[dict] | None = None) -> None:
    """Fails before anything starts when the cluster cannot hold the run; says what is missing."""
    need = required(config)
    r = config.resources
    if need.get("GPU", 0) > cluster.get("GPU", 0) + 1e-9:
        holders = config.num_peers + (1 if config.teacher is not None else 0)
        raise ConfigError("resources.gpus_per_peer", r.gpus_per_peer,
                          f"the run needs {need['GPU']:g} GPUs ({holders} actors); the cluster has "
                          f"{cluster.get('GPU', 0):g}")
    if need["CPU"] > cluster.get("CPU", 0) + 1e-9:
        raise ConfigError("resources.cpus_per_peer", r.cpus_per_peer,
                          f"the run needs {need['CPU']:g} CPUs; the cluster has {cluster.get('CPU', 0):g}")
    if nodes is not None and r.strategy == "STRICT_SPREAD" and len(bundles(config)) > len(nodes):
        raise ConfigError("resources.strategy", r.strategy,
                          f"puts each of {len(bundles(config))} bundles on its own node; the cluster has "
                          f"{len(nodes)} alive nodes")
    if nodes is not None:
        for bundle in bundles(config):
            if not any(all(n["Resources"].get(k, 0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
                raise ConfigError("resources", bundle, "no node of the cluster can hold this bundle "
                                  f"(nodes offer {[_offer(n) for n in nodes]})")


def _offer(node: dict) -> dict:
    return {k: v for k, v in node["Resources"].items() if k in ("CPU", "GPU")}


def local_cpus_needed(config) -> int:
    return math.ceil(required(config)["CPU"])
