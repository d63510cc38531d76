"""Per-step time of every runtime and transport on the same run, side by side (default: 3-peer DML, tiny MLP, CPU).

    raydistill bench [CONFIG] [--steps 200] [--repeats 3] [--set KEY=VALUE ...]
    python -m raydistill.bench ...

In one run: the in-process runtime (every peer in this process, one after another), the Ray runtime with the
object-store transport (the driver drives every step: forward, the coordinator actor's targets, learn) and with the
collective transport (each worker runs whole calls of steps, exchanging outputs with one all-gather per step: shared
memory between workers on one node, and the same over gloo's all_gather as the "collective-gloo" row).
Steps are timed after a warm-up; evaluation, checkpoints and start-up are excluded. The exchange column is the
exchange alone, compute excluded: the outputs of one real forward exchanged and turned into targets, step after step.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections import deque

from raydistill.config import load_config

DEFAULT = {"name": "bench", "data": {"name": "synthetic", "options": {"num_train": 4096, "shape": [1, 8, 8]}},
           "model": {"arch": "mlp", "options": {"hidden": [64]}}, "peers": 3, "method": {"name": "dml"},
           "train": {"epochs": 1, "batch_size": 64}}
WARMUP = 10
SETUPS = (("inprocess", "inprocess"), ("ray", "object_store"), ("ray", "collective"), ("ray", "collective-gloo"))


def run_steps(workers, first: int, count: int, steps_per_epoch: int) -> None:
    """`count` steps from global step `first`, in calls that end at epoch boundaries."""
    step = first
    while step < first + count:
        epoch, index = divmod(step, steps_per_epoch)
        size = min(steps_per_epoch - index, first + count - step)
        workers.run_steps(epoch, index, size)
        step += size


def exchange_ms(workers, steps: int) -> float:
    """ms per step of the exchange (and targets) alone."""
    import ray

    if workers.transport == "inprocess":
        return workers.worker.exchange_only(0, steps) / steps * 1000
    if workers.transport.startswith("collective"):
        return max(ray.get([w.exchange_only.remote(0, steps) for w in workers.workers], timeout=600)) / steps * 1000
    learners = [w for w, m in zip(workers.workers, workers.members) if m.peers]
    ray.get([w.cached_outputs.remote(0) for w in workers.workers], timeout=600)
    pending, tic = deque(), time.perf_counter()
    for step in range(steps):
        outputs = [w.cached_outputs.remote(0) for w in workers.workers]
        targets = workers.coordinator.targets.options(num_returns=len(learners)).remote(0, 0, *outputs)
        targets = targets if len(learners) > 1 else [targets]
        pending.append([w.accept.remote(t) for w, t in zip(learners, targets)])
        while len(pending) > workers.config.train.steps_in_flight or (pending and step == steps - 1):
            ray.get(pending.popleft(), timeout=600)
    return (time.perf_counter() - tic) / steps * 1000


def measure(config, runtime: str, transport: str, steps: int, repeats: int) -> dict:
    from raydistill.data.views import num_steps
    from raydistill.engine.data import load_run_data

    config = copy.deepcopy(config)
    if runtime == "ray":
        config.resources.transport = transport.split("-")[0]
    spec, arrays = load_run_data(config)
    steps_per_epoch = num_steps(len(arrays["train_y"]), config.train.batch_size)
    if runtime == "ray":
        from raydistill.runtime.driver import RayWorkers
        from raydistill.runtime.loop import Console

        workers = RayWorkers(config, spec, arrays, console=Console(False), shared_memory=transport != "collective-gloo")
    else:
        from raydistill.runtime.inprocess import InProcessWorkers

        workers = InProcessWorkers(config, spec, arrays)
    try:
        run_steps(workers, 0, WARMUP, steps_per_epoch)
        samples = []
        for _ in range(repeats):
            tic = time.perf_counter()
            run_steps(workers, WARMUP, steps, steps_per_epoch)
            samples.append((time.perf_counter() - tic) / steps)
        ms = statistics.median(samples) * 1000
        return {"ms": ms, "exchange_ms": exchange_ms(workers, steps), "workers": workers.describe(),
                "peer_samples_per_s": config.num_peers * config.train.batch_size / (ms / 1000)}
    finally:
        workers.shutdown()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydistill bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="a preset or YAML (default: tiny 3-peer DML)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per repeat (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is shown (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    from raydistill.runtime import session
    from raydistill.runtime.driver import connect

    config = load_config(args.config if args.config else DEFAULT, args.overrides)
    results = {}
    widest = copy.deepcopy(config)          # room for the widest setup: the object store's coordinator too
    widest.resources.transport = "object_store"
    started = connect(widest)               # a Ray that was running already is left running
    try:
        for runtime, transport in SETUPS:
            results[transport] = measure(config, runtime, transport, args.steps, args.repeats)
    finally:
        if started:
            session.shutdown()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}; {config.num_peers} peers, {config.peers[0].arch}, "
          f"batch {config.train.batch_size}, {args.steps} steps x {args.repeats} (median)")
    print(f"{'runtime':<10}{'transport':<17}{'ms/step':>9}{'peer-samples/s':>16}{'ratio':>7}{'exchange ms':>13}"
          "  workers")
    base = results["inprocess"]["ms"]
    for runtime, transport in SETUPS:
        r = results[transport]
        print(f"{runtime:<10}{transport:<17}{r['ms']:>9.2f}{r['peer_samples_per_s']:>16.0f}{r['ms'] / base:>7.2f}"
              f"{r['exchange_ms']:>13.3f}  {r['workers']}")
    return 0


def main(argv=None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
