"""The online-distillation table of docs/results.md: independent, dml, kdcl, pcl and dkel with 3 peers on a CIFAR-10
folder, several seeds each; mean +- std over seeds of the last-epoch and best-epoch test accuracy of every peer, every
EMA teacher and the ensemble ("best epoch": chosen on the validation split carved from the training data).

    python scripts/online_results.py DATA_ROOT --out runs/online-results [--epochs 15 --arch resnet20 --jobs 2]
    python scripts/online_results.py DATA_ROOT --out runs/online-results --render   # the table of finished runs

Runs already finished in --out are kept, so an interrupted sweep continues where it stopped. Every run uses the
in-process runtime (one thread, peers in turn); --jobs runs that many runs side by side.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

METHODS = ("independent", "dml", "kdcl", "pcl", "dkel")


def run_config(args, method: str, seed: int) -> dict:
    return {"name": f"{method}-s{seed}", "seed": seed,
            "data": {"name": "cifar10", "root": args.data_root, "val_fraction": 0.1},
            "model": {"arch": args.arch, "options": json.loads(args.arch_options)}, "peers": 3,
            "method": {"name": method},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "schedule": "cosine",
                      "checkpoint_every": args.epochs, "keep_checkpoints": 1},
            "resources": {"threads_per_peer": 1}}


def train_one(job) -> str:
    args, method, seed = job
    import raydistill

    run_dir = Path(args.out) / f"{method}-s{seed}"
    if (run_dir / "summary.json").exists():
        return f"{run_dir.name}: already done"
    if run_dir.exists():                       # an interrupted run: start it again
        import shutil
        shutil.rmtree(run_dir)
    tic = time.perf_counter()
    raydistill.train(run_config(args, method, seed), run_dir, runtime="inprocess", progress=False)
    return f"{run_dir.name}: {time.perf_counter() - tic:.0f}s"


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def render(args) -> str:
    """The markdown tables of the finished runs in --out."""
    summaries = {}
    for method in args.methods:
        for seed in args.seeds:
            path = Path(args.out) / f"{method}-s{seed}" / "summary.json"
            if path.exists():
                summaries.setdefault(method, []).append(json.loads(path.read_text()))
    lines = ["| method | model | last-epoch test acc (%) | best-epoch test acc (%) | seeds |", "|---|---|---|---|---|"]
    overview = ["| method | peers, mean of 3 (%) | EMA teachers, mean of 3 (%) | ensemble (%) | deployed model (%) "
                "| wall time per run (s) |", "|---|---|---|---|---|---|"]
    for method, runs in summaries.items():
        models = [(f"peer{i}", lambda s, i=i: s["peers"][i]) for i in range(3)]
        if runs[0].get("ema_teachers"):
            models += [(f"peer{i}_ema", lambda s, i=i: s["ema_teachers"][i]) for i in range(3)]
        models.append(("ensemble", lambda s: {k[len("ensemble_"):]: v for k, v in s.items()
                                              if k.startswith("ensemble_")}))
        for name, pick in models:
            last = [pick(s)["test_acc"] for s in runs]
            best = [pick(s)["test_acc_at_best_epoch"] for s in runs]
            lines.append(f"| {method} | {name} | {mean_std(last)} | {mean_std(best)} | {len(runs)} |")

        def group_mean(key):
            return [statistics.mean(m["test_acc"] for m in s[key]) if s.get(key) else None for s in runs]

        deployed = []
        for s in runs:
            deploy = s["deploy"]
            group = s["ema_teachers"] if deploy["kind"] == "ema_teacher" else s["peers"]
            deployed.append(group[deploy["index"]]["test_acc"])
        wall = statistics.mean(s["wall_s"] for s in runs)
        overview.append(f"| {method} | {mean_std(group_mean('peers'))} | {mean_std(group_mean('ema_teachers'))} | "
                        f"{mean_std([s['ensemble_test_acc'] for s in runs])} | {mean_std(deployed)} | {wall:.0f} |")
    return "\n".join(overview + ["", *lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", help="a CIFAR-10 folder (cifar-10-batches-py or its parent)")
    parser.add_argument("--out", default="runs/online-results")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--arch-options", default="{}", help="model options as JSON, e.g. '{\"hidden\": [512]}'")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (each uses one thread)")
    parser.add_argument("--render", action="store_true", help="only print the table of the finished runs")
    args = parser.parse_args(argv)
    args.data_root = os.path.abspath(args.data_root)
    if not args.render:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        jobs = [(args, method, seed) for seed in args.seeds for method in args.methods]
        tic = time.perf_counter()
        # spawn: each run in a fresh process with its own torch threads
        with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for line in pool.imap_unordered(train_one, jobs):
                print(line, flush=True)
        print(f"sweep wall time: {time.perf_counter() - tic:.0f}s on {platform.machine()}, "
              f"{os.cpu_count()} CPUs, {args.jobs} jobs", flush=True)
    print(render(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
