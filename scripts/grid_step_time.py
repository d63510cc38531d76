"""ms per step of 2 peers of 2 ranks against 2 peers of 1 rank, on this machine's Ray (CPU workers), alternating.

    python scripts/grid_step_time.py [--pairs 3] [--epochs 4] [--batch 128]

Both at the same batch (a rank of a 2-rank peer computes half of it); the steps' time is the run's own training
time (summary.json's train_samples_per_s), evaluation and start-up left out. On a 2-core machine the grid's 4 worker
processes oversubscribe the cores, so the ratio measures that too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def run(ranks: int, epochs: int, batch: int, folder: str) -> float:
    import raydistill

    config = {"name": f"grid{ranks}", "seed": 3, "data": {"name": "digits"},
              "model": {"arch": "mlp", "options": {"hidden": [256, 256]}}, "peers": 2, "method": {"name": "dml"},
              "train": {"epochs": epochs, "batch_size": batch, "lr": 0.05},
              "resources": {"ranks_per_peer": ranks, "peers_per_worker": 1}}
    summary = raydistill.train(config, os.path.join(folder, f"r{ranks}"), progress=False).summary
    return batch / summary["train_samples_per_s"] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    one, two = [], []
    for pair in range(args.pairs):
        with tempfile.TemporaryDirectory() as folder:
            one.append(run(1, args.epochs, args.batch, folder))
            two.append(run(2, args.epochs, args.batch, folder))
        print(f"pair {pair + 1}: 2x1 {one[-1]:.2f} ms/step, 2x2 {two[-1]:.2f} ms/step, ratio "
              f"{two[-1] / one[-1]:.2f}", flush=True)
    print(f"median: 2x1 {statistics.median(one):.2f} ms/step, 2x2 {statistics.median(two):.2f} ms/step, ratio "
          f"{statistics.median(t / o for t, o in zip(two, one)):.2f}")


if __name__ == "__main__":
    main()
