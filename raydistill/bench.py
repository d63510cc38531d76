"""Per-step time of the Ray runtime against the in-process runtime for the same run (default: 3-peer DML, tiny MLP, CPU).

    python -m raydistill.bench [--steps 200] [--set KEY=VALUE ...]

Both runtimes drive the very same step protocol (forward -> coordinator targets -> learn); the difference is the cost of
the exchange through actors and the object store against plain calls. Steps are timed after a warm-up; evaluation,
checkpoints and actor start-up are not included.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import deque

from raydistill.config import load_config

DEFAULT = {"name": "bench", "data": {"name": "synthetic", "options": {"num_train": 4096, "shape": [1, 8, 8]}},
           "model": {"arch": "mlp", "options": {"hidden": [64]}}, "peers": 3, "method": {"name": "dml"},
           "train": {"epochs": 1, "batch_size": 64}}


def time_steps(workers, steps: int, warmup: int, in_flight: int, steps_per_epoch: int) -> list[float]:
    """Seconds per step, measured over blocks of steps with at most `in_flight` steps outstanding."""
    pending = deque()
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            tic = time.perf_counter()
        epoch, index = divmod(step, steps_per_epoch)
        pending.append(workers.submit_step(epoch, index))
        while len(pending) > in_flight:
            workers.collect(pending.popleft())
    while pending:
        workers.collect(pending.popleft())
    times.append((time.perf_counter() - tic) / steps)
    return times


def measure(config, runtime: str, steps: int, repeats: int) -> dict:
    from raydistill.data.views import num_steps
    from raydistill.engine.data import load_run_data

    spec, arrays = load_run_data(config)
    steps_per_epoch = num_steps(len(arrays["train_y"]), config.train.batch_size)
    if runtime == "ray":
        from raydistill.runtime.driver import RayWorkers, connect

        connect(config)
        workers = RayWorkers(config, spec, arrays)
    else:
        from raydistill.runtime.inprocess import InProcessWorkers

        workers = InProcessWorkers(config, spec, arrays)
    try:
        results = {}
        for in_flight in sorted({1, config.train.steps_in_flight}):
            samples = [time_steps(workers, steps, 10, in_flight, steps_per_epoch)[0] for _ in range(repeats)]
            results[in_flight] = statistics.median(samples) * 1000
        return results
    finally:
        workers.shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None, help="a preset or YAML (default: tiny 3-peer DML)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(args.config if args.config else DEFAULT, args.overrides)
    inprocess = measure(config, "inprocess", args.steps, args.repeats)
    ray_ms = measure(config, "ray", args.steps, args.repeats)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}; {config.num_peers} peers, {config.peers[0].arch}, "
          f"batch {config.train.batch_size}, {args.steps} steps x {args.repeats} (median)")
    print(f"{'runtime':<12}{'steps in flight':>16}{'ms/step':>10}{'ratio to in-process':>22}")
    for in_flight, ms in inprocess.items():
        print(f"{'inprocess':<12}{in_flight:>16}{ms:>10.2f}{1.0:>22.2f}")
    base = min(inprocess.values())
    for in_flight, ms in ray_ms.items():
        print(f"{'ray':<12}{in_flight:>16}{ms:>10.2f}{ms / base:>22.2f}")


if __name__ == "__main__":
    main()
