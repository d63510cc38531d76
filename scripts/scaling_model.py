"""Scaling to N GPUs: a model (not a measurement) of peer-samples/s for N peers, one peer per GPU.

On one node or on several nodes. Every input is an option; the defaults are the reference figures measured on a GPU
(marked measured, with where and when) and stated assumptions (marked assumed). Pass the figures measured on a GPU to
replace them:

    python scripts/scaling_model.py
    python scripts/scaling_model.py --step-ms 4.65            # a CUDA-graph step instead of an eager one

One training step of a peer, as the runtime runs it (a call of many steps inside the worker, no driver round trip):

    step = compute + overhead + exchange * (1 - overlap) + targets + straggler

- compute: one peer's standalone step (forward, backward, optimizer step), ``--step-ms``.
- overhead: the runtime's own per-step cost besides the terms below (0 by default: no per-step round trip).
- exchange: one all-gather of every peer's logits ([batch, classes] of ``--bytes-per-element`` each). It sits between
  forward and backward, and the loss needs every peer's logits, so nothing in the step hides it (``--overlap`` 0).
  ring: (N-1) steps, each one message per rank over the slowest link of the ring;
  tree (recursive doubling): ceil(log2 N) rounds, round k exchanges 2**k messages with the rank 2**k away, over the
  inter-node link once that distance reaches a node's GPUs.
- targets: each peer's KD terms against the N-1 others, ``--pair-us`` per pair.
- straggler: the all-gather waits for the slowest of N ranks; with per-step times normal with coefficient of
  variation ``--cv``, the expected slowest is compute * (1 + cv * E[max of N standard normals]).

With one peer there is no exchange, no targets and no straggler: the prediction is the standalone throughput.
"""
from __future__ import annotations

import argparse
import math
import sys

H200 = "measured: one H200, 2026-11-30, ResNet-32 CIFAR, batch 128, bf16, channels_last"
H100 = "measured: one H100, earlier"
# name: (default, source). A value given on the command line that differs from its default is marked "given".
INPUTS = {
    "step_ms": (14.7, f"{H200}: one model alone, eager (8,730 images/s)"),
    "graph_step_ms": (4.65, f"{H100}: one model with CUDA graphs, torch.compile reduce-overhead (27,500 images/s)"),
    "batch": (128, "measured setting: the batch of the figures above"),
    "classes": (100, "CIFAR-100 (10 for CIFAR-10)"),
    "bytes_per_element": (4, "float32 logits"),
    "intra_latency_us": (20.0, "assumed: NCCL all-gather of small messages over NVLink 4, ~10-30 us per step"),
    "intra_gbytes_s": (450.0, "assumed: NVLink 4 (H100/H200 SXM), ~450 GB/s per direction per GPU"),
    "inter_latency_us": (20.0, "assumed: NCCL between nodes over InfiniBand / RoCE (~5-20 us), upper end"),
    "inter_gbytes_s": (25.0, "assumed: 200 Gb/s per GPU between nodes"),
    "algorithm": ("ring", "assumed: NCCL's ring all-gather"),
    "pair_us": (30.0, "assumed: one KD term on [batch, classes], ~6 small launch-bound kernels"),
    "cv": (0.02, "assumed: per-step coefficient of variation of a rank's step"),
    "overlap": (0.0, "by construction: the loss needs every peer's logits, nothing in the step hides the exchange"),
    "overhead_ms": (0.0, "assumed, supported by the H200 3-peer figures: Ray runtime 38.9 ms vs plain PyTorch 41.8"),
    "gpus_per_node": (8, "assumed: an 8-GPU node (HGX)"),
}
DEFAULTS = {name: value for name, (value, _) in INPUTS.items()}
PEERS = (1, 2, 3, 4, 8, 16, 32)
TARGET = 0.90
# what-if cases of the sensitivity table: (label, changes to the inputs; "graph" puts in the CUDA-graph step)
CASES = (
    ("as given", {}),
    ("intra 100 us", {"intra_latency_us": 100.0}),
    ("graph step", {"graph": True}),
    ("graph step, intra 100 us", {"graph": True, "intra_latency_us": 100.0}),
    ("cloud TCP between nodes", {"inter_latency_us": 50.0, "inter_gbytes_s": 3.125}),
    ("gloo between nodes", {"inter_latency_us": 143.0, "inter_gbytes_s": 3.125}),
    ("graph step, gloo between nodes", {"graph": True, "inter_latency_us": 143.0, "inter_gbytes_s": 3.125}),
    ("cv 0.05", {"cv": 0.05}),
)
CASE_NOTES = ("cloud TCP: 50 us, 25 Gb/s (assumed); gloo: 143 us per ring step = the 0.43 ms all_gather of [128, 100] "
              f"among 4 gloo ranks ({H100}) over its 3 ring steps, 25 Gb/s (assumed)")


def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1; 0.564 for 2; 1.424 for 8), by numerical integration."""
    if n <= 1:
        return 0.0
    h, total = 0.01, 0.0
    for i in range(-1000, 1001):          # x in [-10, 10]: the density n phi(x) Phi(x)^(n-1) times x
        x = i * h
        phi = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        total += x * n * phi * cdf ** (n - 1) * h
    return total


def message_bytes(batch: int = 128, classes: int = 100, bytes_per_element: int = 4) -> int:
    """Bytes one rank sends per step: its peer's logits."""
    return batch * classes * bytes_per_element


def allgather_ms(n_peers: int, nbytes: int, gpus_per_node: int = 8, algorithm: str = "ring",
                 intra_latency_us: float = 20.0, intra_gbytes_s: float = 450.0,
                 inter_latency_us: float = 20.0, inter_gbytes_s: float = 25.0) -> float:
    """Milliseconds of one all-gather of ``nbytes`` per rank among ``n_peers`` ranks, one per GPU.

    ring: (N-1) steps of one message each; every step waits for the slowest link of the ring, the inter-node link as
    soon as the ring spans nodes. tree (recursive doubling): ceil(log2 N) rounds; round k exchanges min(2**k, N-2**k)
    messages with the rank 2**k away, over the inter-node link once 2**k reaches ``gpus_per_node``.
    """
    if n_peers <= 1:
        return 0.0

    def link(remote: bool, messages: int) -> float:
        latency, gbytes_s = (inter_latency_us, inter_gbytes_s) if remote else (intra_latency_us, intra_gbytes_s)
        return latency / 1e3 + messages * nbytes / (gbytes_s * 1e9) * 1e3

    if algorithm == "ring":
        return (n_peers - 1) * link(n_peers > gpus_per_node, 1)
    if algorithm == "tree":
        total, distance = 0.0, 1
        while distance < n_peers:
            total += link(distance >= gpus_per_node, min(distance, n_peers - distance))
            distance *= 2
        return total
    raise ValueError(f"algorithm must be ring or tree, not {algorithm!r}")


def predict(n_peers: int, step_ms: float = 14.7, gpus_per_node: int = 8, *, batch: int = 128, classes: int = 100,
            bytes_per_element: int = 4, intra_latency_us: float = 20.0, intra_gbytes_s: float = 450.0,
            inter_latency_us: float = 20.0, inter_gbytes_s: float = 25.0, algorithm: str = "ring",
            pair_us: float = 30.0, cv: float = 0.02, overlap: float = 0.0, overhead_ms: float = 0.0, **_) -> dict:
    """One peer's step for ``n_peers`` peers, one per GPU, ``gpus_per_node`` GPUs a node: its terms in ms, the step,
    peer-samples/s of all peers together, and ``fraction``: a peer's throughput over its standalone throughput."""
    n = n_peers
    nbytes = message_bytes(batch, classes, bytes_per_element)
    exchange = allgather_ms(n, nbytes, gpus_per_node, algorithm, intra_latency_us, intra_gbytes_s,
                            inter_latency_us, inter_gbytes_s) * (1 - overlap)
    targets = (n - 1) * pair_us / 1e3
    straggler = step_ms * cv * expected_max_normal(n)
    overhead = overhead_ms if n > 1 else 0.0
    step = step_ms + overhead + exchange + targets + straggler
    return {"peers": n, "gpus": n, "nodes": math.ceil(n / gpus_per_node), "compute_ms": step_ms,
            "overhead_ms": overhead, "exchange_ms": exchange, "targets_ms": targets, "straggler_ms": straggler,
            "step_ms": step, "peer_samples_s": n * batch / step * 1e3, "fraction": step_ms / step,
            "message_bytes": nbytes}


def case_inputs(inputs: dict, changes: dict) -> dict:
    """The inputs of a sensitivity case: ``inputs`` with ``changes``; "graph" puts the CUDA-graph step in."""
    out = dict(inputs, **{k: v for k, v in changes.items() if k != "graph"})
    if changes.get("graph"):
        out["step_ms"] = inputs["graph_step_ms"]
    return out


def table(inputs: dict, peers=PEERS) -> str:
    """The markdown table of ``predict`` for each number of peers."""
    lines = ["| peers | GPUs (nodes) | compute ms | exchange ms | targets ms | straggler ms | step ms "
             "| peer-samples/s | of standalone |", "|---|---|---|---|---|---|---|---|---|"]
    for n in peers:
        r = predict(n, **inputs)
        extra = f" + overhead {r['overhead_ms']:.3f}" if r["overhead_ms"] else ""
        lines.append(f"| {n} | {r['gpus']} ({r['nodes']}) | {r['compute_ms']:.2f}{extra} | {r['exchange_ms']:.3f} "
                     f"| {r['targets_ms']:.3f} | {r['straggler_ms']:.3f} | {r['step_ms']:.2f} "
                     f"| {r['peer_samples_s']:,.0f} | {r['fraction']:.1%} |")
    return "\n".join(lines)


def sensitivity(inputs: dict, peers=PEERS) -> str:
    """The fraction of standalone throughput for each number of peers under each what-if case of ``CASES``."""
    lines = ["| peers | GPUs (nodes) | " + " | ".join(label for label, _ in CASES) + " |",
             "|---|---|" + "---|" * len(CASES)]
    for n in peers:
        nodes = math.ceil(n / inputs["gpus_per_node"])
        cells = [f"{predict(n, **case_inputs(inputs, changes))['fraction']:.1%}" for _, changes in CASES]
        lines.append(f"| {n} | {n} ({nodes}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(inputs: dict) -> list[str]:
    """The done-when answer: 8 peers on 8 GPUs of one node against 90% of standalone; then each case below 90%
    among the table's sizes, with what stands in the way."""
    n = 8
    r = predict(n, **dict(inputs, gpus_per_node=max(n, inputs["gpus_per_node"])))
    ok = "yes" if r["fraction"] >= TARGET else "no"
    lines = [f"Verdict: 8 peers on 8 GPUs of one node: predicted {r['fraction']:.1%} of a peer's standalone "
             f"throughput; >= 90%: {ok}."]
    seen = set()
    for label, changes in CASES:
        for m in PEERS:
            c = predict(m, **case_inputs(inputs, changes))
            if c["fraction"] < TARGET:
                terms = {"exchange": c["exchange_ms"], "targets": c["targets_ms"], "straggler": c["straggler_ms"]}
                key = (m, round(c["fraction"], 6))
                if key not in seen:
                    seen.add(key)
                    largest = max(terms, key=terms.get)
                    lines.append(f"- below 90%: {label}, {m} peers on {m} GPUs ({c['nodes']} node"
                                 f"{'s' if c['nodes'] > 1 else ''}): {c['fraction']:.1%}; in the way: "
                                 + " + ".join(f"{k} {v:.3f}" for k, v in terms.items())
                                 + f" ms = {sum(terms.values()) / c['compute_ms']:.0%} of the "
                                 f"{c['compute_ms']:.2f} ms step, mostly the {largest}")
                break
    return lines


# ---- the grid: peers of several ranks (engine/grid.py) ---------------------------------------------------------------
GRID_INPUTS = {
    "grid_images_s": (2500.0, "cited: NVIDIA's ResNet-50 reference, ~2,500 images/s on one A100 (16,600 on 8)"),
    "grid_batch": (256, "assumed: a ResNet-50 step's batch (all of a peer's ranks together)"),
    "grid_classes": (1000, "ImageNet"),
    "grid_params": (25.6e6, "ResNet-50's parameters (float32 gradients: 102 MB a step)"),
    "grid_efficiency": (0.83, "cited: 16,600 / (8 x 2,500) images/s: a rank's compute at 1/k of the batch"),
}
GRID_CASES = (("2 ResNet-50 peers of 4 GPUs, one 8-GPU node", 2, 4),
              ("2 ResNet-50 peers of 1 GPU (6 GPUs idle)", 2, 1),
              ("8 peers of 4 GPUs on 4 nodes (a peer's ranks on one node)", 8, 4))


def allreduce_ms(ranks: int, nbytes: float, latency_us: float, gbytes_s: float, gather: bool) -> float:
    """A peer's gradient sync among its ranks on one node: as built, an all-gather summed in rank order on every rank
    (each rank receives (k-1) x the gradient: exact and deterministic); or DDP's ring all-reduce (2(k-1)/k x the
    gradient in 2(k-1) steps), the fast path a GPU run could take instead."""
    if ranks <= 1:
        return 0.0
    if gather:
        return (ranks - 1) * (latency_us / 1e3 + nbytes / (gbytes_s * 1e9) * 1e3)
    return 2 * (ranks - 1) * latency_us / 1e3 + 2 * (ranks - 1) / ranks * nbytes / (gbytes_s * 1e9) * 1e3


def predict_grid(peers: int, ranks: int, inputs: dict, gather: bool = True) -> dict:
    """One step of ``peers`` peers of ``ranks`` ranks each (one GPU a rank; a peer's ranks on one node; the peers on
    as many nodes as ``gpus_per_node`` needs): its terms in ms and the images/s of each peer."""
    batch, classes = inputs["grid_batch"], inputs["grid_classes"]
    full_ms = batch / inputs["grid_images_s"] * 1e3
    compute = full_ms / ranks / (inputs["grid_efficiency"] if ranks > 1 else 1.0)
    world = peers * ranks
    nodes = math.ceil(world / inputs["gpus_per_node"])
    # every rank sends its rows' logits to every rank (engine/grid.py): an all-gather among all ranks
    exchange = allgather_ms(world, batch // ranks * classes * inputs["bytes_per_element"], inputs["gpus_per_node"],
                            inputs["algorithm"], inputs["intra_latency_us"], inputs["intra_gbytes_s"],
                            inputs["inter_latency_us"], inputs["inter_gbytes_s"])
    sync = allreduce_ms(ranks, inputs["grid_params"] * 4, inputs["intra_latency_us"], inputs["intra_gbytes_s"], gather)
    targets = (peers - 1) * inputs["pair_us"] / 1e3
    straggler = compute * inputs["cv"] * expected_max_normal(world)
    step = compute + exchange + sync + targets + straggler
    return {"gpus": world, "nodes": nodes, "compute_ms": compute, "exchange_ms": exchange, "sync_ms": sync,
            "targets_ms": targets, "straggler_ms": straggler, "step_ms": step, "images_s": batch / step * 1e3}


def grid_table(inputs: dict) -> str:
    lines = ["| peers x ranks | GPUs (nodes) | compute ms | exchange ms | gradient sync ms (as built / ring) "
             "| step ms | images/s per peer | epoch of 1.28M images, per peer |", "|---|---|---|---|---|---|---|---|"]
    for label, peers, ranks in GRID_CASES:
        r, ring = predict_grid(peers, ranks, inputs), predict_grid(peers, ranks, inputs, gather=False)
        lines.append(f"| {label}: {peers} x {ranks} | {r['gpus']} ({r['nodes']}) | {r['compute_ms']:.1f} "
                     f"| {r['exchange_ms']:.2f} | {r['sync_ms']:.2f} / {ring['sync_ms']:.2f} | {r['step_ms']:.1f} "
                     f"| {r['images_s']:,.0f} | {1.28e6 / r['images_s'] / 60:.1f} min |")
    return "\n".join(lines)


def report(inputs: dict) -> str:
    """The whole printout: the inputs with their sources, the table, the sensitivity table, the verdict."""
    nbytes = message_bytes(inputs["batch"], inputs["classes"], inputs["bytes_per_element"])
    out = [f"Scaling to N GPUs: a model, not a measurement. One peer per GPU, {inputs['gpus_per_node']} GPUs a node; "
           f"{nbytes:,} B of logits per peer per step.", "", "Inputs:"]
    for name, (default, source) in INPUTS.items():
        value = inputs[name]
        out.append(f"- {name.replace('_', '-')} = {value} ({source if value == default else 'given'})")
    out += ["", table(inputs), "", f"Fraction of standalone throughput under other inputs ({CASE_NOTES}):", "",
            sensitivity(inputs), ""] + verdict(inputs)
    grid = {**inputs, **{name: value for name, (value, _) in GRID_INPUTS.items()}}
    out += ["", "Peers of several ranks (the grid): each rank on 1/k of the batch, every rank's logits to every "
            "rank, a peer's gradients gathered over its ranks and summed in rank order. Inputs:"]
    out += [f"- {name.replace('_', '-')} = {value} ({source})" for name, (value, source) in GRID_INPUTS.items()]
    out += ["", grid_table(grid)]
    return "\n".join(out)


def parse(argv=None) -> dict:
    """The inputs from the command line; every one has an option, defaults as in ``INPUTS``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    helps = {"step_ms": "a peer's standalone step, ms", "graph_step_ms": "the CUDA-graph step of the what-if cases",
             "intra_latency_us": "all-gather latency per step inside a node, us",
             "intra_gbytes_s": "bandwidth per GPU inside a node, GB/s",
             "inter_latency_us": "all-gather latency per step between nodes, us",
             "inter_gbytes_s": "bandwidth per GPU between nodes, GB/s (200 Gb/s = 25)",
             "pair_us": "targets: cost of one KD term (one peer against one other), us",
             "cv": "coefficient of variation of a rank's step (straggler)",
             "overlap": "fraction of the exchange hidden behind compute",
             "overhead_ms": "the runtime's own per-step cost with 2+ peers, ms"}
    for name, (default, source) in INPUTS.items():
        flag = "--" + name.replace("_", "-")
        if name == "algorithm":
            parser.add_argument(flag, choices=("ring", "tree"), default=default,
                                help=f"all-gather cost model ({source})")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"{helps.get(name, name)} ({source})")
    return vars(parser.parse_args(argv))


def main(argv=None) -> None:
    print(report(parse(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
