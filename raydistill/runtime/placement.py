"""Bundles and strategies: one placement group per run, bundle 0 for the coordinator, one per peer, one per teacher."""
from __future__ import annotations

import math

from raydistill.errors import ConfigError


def bundles(config, driver_cpus: float = 0.0) -> list[dict]:
    """driver_cpus: what the driver itself reserves in bundle 0 (a Tune trial's trainable runs there)."""
    r = config.resources
    coordinator = {"CPU": r.cpus_per_coordinator + driver_cpus}
    peer = {"CPU": r.cpus_per_peer, **({"GPU": r.gpus_per_peer} if r.gpus_per_peer > 0 else {})}
    teachers = []
    if config.teacher is not None:
        gpus = r.gpus_per_teacher or 0.0
        teachers = [{"CPU": r.cpus_per_peer, **({"GPU": gpus} if gpus > 0 else {})}]
    return [coordinator] + [dict(peer) for _ in range(config.num_peers)] + teachers


def peer_bundle(index: int) -> int:
    return 1 + index


def teacher_bundle(config, index: int) -> int:
    return 1 + config.num_peers + index


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
                          f"{len(nodes)} nodes")


def local_cpus_needed(config) -> int:
    return math.ceil(required(config)["CPU"])
