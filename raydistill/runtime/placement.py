"""Workers, bundles and strategies: one placement group per run; which worker hosts which peers and teachers.

A worker is one process on one device bundle. Members (peers 0..N-1, then teachers) go to workers in contiguous runs,
so the workers' outputs, concatenated in rank order, are in member order. How many members share a worker:
``resources.peers_per_worker``, or automatically: peers that share one GPU (a fractional ``gpus_per_peer``) share a
worker (NCCL refuses two ranks on one GPU, and in one process they exchange without a copy); on CPUs, no more workers
than the machine has cores, because more busy processes than cores make every collective slow (a gloo all_gather
among 3 processes on 2 cores costs ~4x what it costs between 2).

Bundles: an optional head bundle (the coordinator actor of the object-store transport, and a Tune trial's driver),
then one bundle per worker. Under STRICT_SPREAD (one bundle per node) the head shares worker 0's bundle instead, so N
workers need N nodes, not N + 1.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from raydistill.engine.worker import Members
from raydistill.errors import ConfigError
from raydistill.transports import transport_of


@dataclass(frozen=True)
class Layout:
    bundles: list              # resource dicts, in placement-group order
    head: int | None           # bundle of the coordinator actor (object-store transport) and a Tune trial's driver
    workers: list              # bundle index of each worker
    members: list              # Members of each worker


def local_cores() -> int:
    """Cores this process may use (the machine a local Ray runs on)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                      # not on Linux
        return max(1, os.cpu_count() or 1)


def members_per_worker(config) -> int:
    r = config.resources
    total = config.num_peers + config.num_teachers
    if r.peers_per_worker is not None:
        return r.peers_per_worker
    if r.gpus_per_peer > 0:
        return max(1, math.floor(1.0 / r.gpus_per_peer + 1e-6)) if r.gpus_per_peer < 1 else 1
    if r.address:                                # a cluster: its nodes' cores are not this machine's
        return 1
    return math.ceil(total / min(total, local_cores()))


def worker_members(config) -> list[Members]:
    """Contiguous runs of members, in member order. GPU peers never share a worker with a teacher (each teacher has
    its own GPU share, ``gpus_per_teacher``, and its own worker). A peer of k ranks is k workers of its own, one per
    rank, in rank order (engine/grid.py)."""
    per = members_per_worker(config)
    ranks = [peer.ranks for peer in config.peer_list]
    teachers = list(range(config.num_teachers))
    gpu = config.resources.gpus_per_peer > 0 or (config.resources.gpus_per_teacher or 0) > 0
    apart = gpu and config.resources.peers_per_worker is None          # teachers in workers of their own
    everyone = [("peer", i) for i in range(config.num_peers)] + ([] if apart else [("teacher", t) for t in teachers])
    groups, chunk = [], []

    def flush():
        if chunk:
            groups.append(Members(tuple(i for kind, i in chunk if kind == "peer"),
                                  tuple(i for kind, i in chunk if kind == "teacher")))
            chunk.clear()

    for kind, i in everyone:
        if kind == "peer" and ranks[i] > 1:
            flush()
            groups.extend(Members((i,), (), rank, ranks[i]) for rank in range(ranks[i]))
            continue
        chunk.append((kind, i))
        if len(chunk) == per:
            flush()
    flush()
    return groups + ([Members((), (t,)) for t in teachers] if apart else [])


def worker_bundle(config, members: Members) -> dict:
    r = config.resources
    cpus = r.cpus_per_peer * (len(members.peers) + len(members.teachers))
    gpus = r.gpus_per_peer * len(members.peers) + (r.gpus_per_teacher or 0.0) * len(members.teachers)
    return {"CPU": cpus, **({"GPU": round(gpus, 6)} if gpus > 0 else {})}


def layout(config, driver_cpus: float = 0.0) -> Layout:
    """driver_cpus: what a Tune trial's driver reserves (in the head bundle, with the transport's own head)."""
    r = config.resources
    members = worker_members(config)
    bundles = [worker_bundle(config, m) for m in members]
    head = transport_of(config).head_cpus(config) + driver_cpus
    if head == 0:
        return Layout(bundles, None, list(range(len(bundles))), members)
    if r.strategy == "STRICT_SPREAD":
        bundles[0]["CPU"] += head
        return Layout(bundles, 0, list(range(len(bundles))), members)
    return Layout([{"CPU": head}] + bundles, 0, list(range(1, len(bundles) + 1)), members)


def bundles(config, driver_cpus: float = 0.0) -> list[dict]:
    return layout(config, driver_cpus).bundles


def required(config, driver_cpus: float = 0.0) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles(config, driver_cpus):
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def check_capacity(config, cluster: dict[str, float], nodes: list[dict] | None = None) -> None:
    """Fails before anything starts when the cluster cannot hold the run; says what is missing."""
    need = required(config)
    r = config.resources
    found = bundles(config)
    if need.get("GPU", 0) > cluster.get("GPU", 0) + 1e-9:
        holders = config.num_peers + config.num_teachers
        teacher_gpus = (r.gpus_per_teacher or 0) if config.num_teachers else 0
        asking = [name for name, value in (("gpus_per_peer", r.gpus_per_peer), ("gpus_per_teacher", teacher_gpus))
                  if value > 0 and not (name == "gpus_per_teacher" and value == r.gpus_per_peer)]
        raise ConfigError(f"resources.{asking[0]}", getattr(r, asking[0]),
                          f"the run needs {need['GPU']:g} GPUs ({holders} peers and teachers); the cluster has "
                          f"{cluster.get('GPU', 0):g}; to train on CPUs: "
                          + " ".join(f"--set resources.{name}=0" for name in asking))
    if need["CPU"] > cluster.get("CPU", 0) + 1e-9:
        raise ConfigError("resources.cpus_per_peer", r.cpus_per_peer,
                          f"the run needs {need['CPU']:g} CPUs; the cluster has {cluster.get('CPU', 0):g}")
    if nodes is not None and r.strategy == "STRICT_SPREAD" and len(found) > len(nodes):
        raise ConfigError("resources.strategy", r.strategy,
                          f"puts each of {len(found)} bundles on its own node; the cluster has "
                          f"{len(nodes)} alive nodes")
    if nodes is not None:
        for bundle in found:
            if not any(all(n["Resources"].get(k, 0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
                raise ConfigError("resources", bundle, "no node of the cluster can hold this bundle "
                                  f"(nodes offer {[_offer(n) for n in nodes]})")


def _offer(node: dict) -> dict:
    return {k: v for k, v in node["Resources"].items() if k in ("CPU", "GPU")}


def local_cpus_needed(config) -> int:
    return math.ceil(required(config)["CPU"])
