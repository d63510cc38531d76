"""Stacked peers against the loop, in one process: ms per step of each, and the largest parameter difference after
each of the first steps (how far a batched model's float order takes the run from the loop's).

    python scripts/stacked_vs_loop.py [CONFIG] [--steps 12] [--set KEY=VALUE ...]

CONFIG: a preset or YAML (default: dml-digits). Both runs train the same steps of epoch 0 from the same start; the
times are medians of the steps after the first (which sets up the optimizer state).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from raydistill.config import load_config
from raydistill.data.views import num_steps
from raydistill.engine.data import load_run_data
from raydistill.runtime.inprocess import InProcessWorkers


def difference(a: InProcessWorkers, b: InProcessWorkers) -> float:
    worst = 0.0
    for pa, pb in zip(a.get_state()["peers"], b.get_state()["peers"]):
        for x, y in zip(pa["model"].values(), pb["model"].values()):
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="dml-digits")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    runs, times = {}, {}
    for execution in ("loop", "stacked"):
        config = load_config(args.config, [*args.overrides, f"resources.peer_execution={execution}"])
        spec, arrays = load_run_data(config)
        runs[execution], times[execution] = InProcessWorkers(config, spec, arrays), []
    config = runs["loop"].config
    steps = min(args.steps, num_steps(len(arrays["train_y"]), config.train.batch_size))
    print(f"{config.num_peers} peers, {config.peers[0].arch}, batch {config.train.batch_size}, "
          f"{torch.get_num_threads()} thread(s), {steps} steps")
    print("step  loop ms  stacked ms  largest parameter difference")
    for step in range(steps):
        for execution, runner in runs.items():
            tic = time.perf_counter()
            runner.run_steps(0, step, 1)
            times[execution].append((time.perf_counter() - tic) * 1000)
        print(f"{step:>4} {times['loop'][-1]:>8.1f} {times['stacked'][-1]:>11.1f}  {difference(*runs.values()):.3g}")
    loop, stacked = (statistics.median(times[e][1:] or times[e]) for e in ("loop", "stacked"))
    print(f"median ms/step after the first: loop {loop:.1f}, stacked {stacked:.1f} ({stacked / loop:.2f}x the loop)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
