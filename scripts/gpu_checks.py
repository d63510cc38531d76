"""What only a GPU can show of the device path, in one process (no Ray needed), printed one line per check:

1. host syncs: a call of the engine's training step (forward, gather, targets, learn, figures; engine/step.py) under
   ``torch.cuda.set_sync_debug_mode("error")``, for peers one after another (loop) and stacked: any host sync in a
   step raises there;
2. stacked against loop: the largest parameter difference after the same steps (bf16 autocast: not bitwise);
3. ``train.compile: graphs``, loop and stacked: ms per step against eager, and the parameter difference after the
   same steps.

    python scripts/gpu_checks.py [--steps 30] [--peers 3] [--arch resnet32]
"""
from __future__ import annotations

import argparse
import copy
import time
import traceback

import torch

from raydistill.bench.runtimes import DEFAULT_GPU
from raydistill.config import load_config
from raydistill.engine.data import load_run_data
from raydistill.engine.step import CallReport
from raydistill.engine.worker import Members, Worker


def build(args, *overrides) -> Worker:
    """One engine worker hosting every peer of the GPU setup, in this process."""
    raw = copy.deepcopy(DEFAULT_GPU)
    raw["data"]["options"]["num_train"] = 128 * (2 * args.steps + 10)
    config = load_config(raw, [f"peers={args.peers}", f"model.arch={args.arch}", *overrides])
    spec, arrays = load_run_data(config)
    return Worker(config, arrays, spec, Members.every(config))


def steps_without_syncs(worker: Worker, first: int, count: int) -> CallReport:
    """The worker's call of steps (what ``run_steps`` runs) with the CUDA sync check on for the steps, off for the
    call's end (which reads the figures)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        report = worker.training_step.call(0, first, count)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return report.finish()


def timed(worker: Worker, first: int, count: int) -> float:
    torch.cuda.synchronize()
    tic = time.perf_counter()
    worker.run_steps(0, first, count)
    torch.cuda.synchronize()
    return (time.perf_counter() - tic) / count * 1000


def difference(a: Worker, b: Worker) -> float:
    worst = 0.0
    peers_a, peers_b = a.state_dict()["peers"], b.state_dict()["peers"]
    for index, pa in peers_a.items():
        for key, value in pa["model"].items():
            worst = max(worst, (value.double() - peers_b[index]["model"][key].double()).abs().max().item())
    return worst


def check(name, fn):
    try:
        print(f"{name}: {fn()}", flush=True)
    except Exception as err:                                   # one line per check, whatever breaks
        print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
        traceback.print_exc(limit=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--arch", default="resnet32")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_checks.py: needs a CUDA device")
        return 2
    runs = {}

    def syncs(execution):
        def run():
            runs[execution] = worker = build(args, f"resources.peer_execution={execution}")
            worker.run_steps(0, 0, 2)                           # warm-up: cuDNN choices, optimizer state
            report = steps_without_syncs(worker, 2, args.steps)
            ms = timed(worker, 2 + args.steps, args.steps)
            return f"no host sync in {args.steps} steps; then {ms:.2f} ms/step; figures {report.peers[0].means()}"
        return run

    check("host syncs, loop", syncs("loop"))
    check("host syncs, stacked", syncs("stacked"))
    if {"loop", "stacked"} <= set(runs):
        check("stacked vs loop, largest parameter difference", lambda: f"{difference(runs['loop'], runs['stacked']):.3g}")

    def graphs(*overrides):
        def run():
            return compare_graphs(overrides)
        return run

    def compare_graphs(overrides):
        eager, compiled = build(args, *overrides), build(args, "train.compile=graphs", *overrides)
        tic = time.perf_counter()
        compiled.run_steps(0, 0, 3)
        torch.cuda.synchronize()
        warm = time.perf_counter() - tic
        eager.run_steps(0, 0, 3)
        ms = {name: timed(w, 3, args.steps) for name, w in (("eager", eager), ("graphs", compiled))}
        return (f"eager {ms['eager']:.2f} ms/step, graphs {ms['graphs']:.2f} ms/step (capture {warm:.1f} s); "
                f"largest parameter difference {difference(eager, compiled):.3g}")

    check("train.compile=graphs", graphs())
    check("train.compile=graphs, stacked", graphs("resources.peer_execution=stacked"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
