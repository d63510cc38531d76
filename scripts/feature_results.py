"""The diabetes table of docs/results.md: independent vs dml vs self vs kd on scikit-learn's diabetes regression set,
five seeds each; mean +- std over seeds of the test MSE (standardized targets: predicting the mean scores about 1) of
the last epoch and of the best epoch (chosen on the validation split carved from the training data).

    python scripts/feature_results.py --out runs/feature-results [--seeds 0 1 2 3 4 --epochs 60]
    python scripts/feature_results.py --out runs/feature-results --render      # the table of finished runs
    python scripts/feature_results.py --out runs/feature-results --cifar DATA_ROOT --seeds 0 [--cifar-epochs 6]
        [--cifar-train 5000 --cifar-test 2000 --jobs 3 --teacher-threads 2]

Every student is the same small MLP (10-32-32-1, Adam, lr 0.003, 60 epochs). kd's teacher is a wide MLP
(10-256-256-1) trained by raydistill first (method independent, seed 0, lr 0.001, weight decay 0.05: the
teacher-diabetes preset); kd uses alpha 0.5 with ce_weight complement (the kd-diabetes preset). dml trains two
students together (both are reported); self is one student with an EMA teacher of itself (T = 1, alpha = 1).
Runs already finished in --out are kept. Every run uses the in-process runtime (one thread).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

METHODS = ("independent", "dml", "self", "kd")
STUDENT = {"arch": "mlp", "options": {"hidden": [32, 32]}}
TEACHER = {"arch": "mlp", "options": {"hidden": [256, 256]}}


def base_config(args, name: str, seed: int) -> dict:
    return {"name": name, "seed": seed, "task": "regression",
            "data": {"name": "diabetes", "val_fraction": 0.15},
            "model": dict(STUDENT), "peers": 1,
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": args.lr, "optimizer": "adam",
                      "weight_decay": 0.0, "schedule": "cosine", "checkpoint_every": args.epochs,
                      "keep_checkpoints": 1},
            "resources": {"threads_per_peer": 1}}


def run_config(args, method: str, seed: int) -> dict:
    config = base_config(args, f"{method}-s{seed}", seed)
    config["method"] = {"name": method}
    if method == "dml":
        config["peers"] = 2
    if method == "kd":
        config["method"].update(alpha=0.5, ce_weight="complement")
        config["teacher"] = {**TEACHER, "checkpoint": str(Path(args.out) / "teacher")}
    return config


def train(config: dict, run_dir: Path) -> str:
    import raydistill

    if (run_dir / "summary.json").exists():
        return f"{run_dir.name}: already done"
    if run_dir.exists():                       # an interrupted run: start it again
        import shutil
        shutil.rmtree(run_dir)
    tic = time.perf_counter()
    raydistill.train(config, run_dir, runtime="inprocess", progress=False)
    return f"{run_dir.name}: {time.perf_counter() - tic:.0f}s"


def sweep(args) -> None:
    out = Path(args.out)
    teacher = base_config(args, "teacher", 0) | {"model": dict(TEACHER), "method": {"name": "independent"}}
    teacher["train"].update(lr=0.001, weight_decay=0.05)     # the wide MLP overfits 354 samples without it
    print(train(teacher, out / "teacher"), flush=True)
    for seed in args.seeds:
        for method in METHODS:
            print(train(run_config(args, method, seed), out / f"{method}-s{seed}"), flush=True)


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def render(args) -> str:
    out = Path(args.out)
    teacher = json.loads((out / "teacher" / "summary.json").read_text())["peers"][0]
    lines = ["| method | students per run | seeds | test MSE, last epoch | test MSE, best epoch |",
             "|---|---|---|---|---|"]
    for method in METHODS:
        summaries = [json.loads(p.read_text()) for p in sorted(out.glob(f"{method}-s*/summary.json"))]
        last = [peer["test_mse"] for s in summaries for peer in s["peers"]]
        best = [peer["test_mse_at_best_epoch"] for s in summaries for peer in s["peers"]]
        students = len(summaries[0]["peers"]) if summaries else 0
        lines.append(f"| {method} | {students} | {len(summaries)} | {mean_std(last)} | {mean_std(best)} |")
    lines.append(f"\nkd's teacher (MLP 10-256-256-1, seed 0): test MSE {teacher['test_mse']:.3f} (last epoch, the one "
                 "kd distils from).")
    return "\n".join(lines)


# ---- CIFAR-10: kd and fitnet from a resnet56 teacher into resnet20 students, against the student alone ---------------
CIFAR_STUDENTS = ("independent", "kd", "fitnet")


def cifar_subset(source: str, folder: Path, train: int, test: int) -> Path:
    """The first ``train`` / ``test`` images of a CIFAR-10 python-batch folder, written as one batch each."""
    import pickle

    import numpy as np

    from raydistill.data import load_dataset

    if (folder / "test_batch").is_file():
        return folder
    full = load_dataset("cifar10", source)
    folder.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("data_batch_1", full.train_x[:train], full.train_y[:train]),
                       ("test_batch", full.test_x[:test], full.test_y[:test])):
        batch = {"data": np.ascontiguousarray(x.reshape(len(x), -1)), "labels": [int(v) for v in y]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return folder


def cifar_config(args, root: Path, method: str, seed: int) -> dict:
    config = {"name": f"cifar-{method}-s{seed}", "seed": seed, "data": {"name": "cifar10", "root": str(root)},
              "model": {"arch": "resnet20"}, "peers": 1, "method": {"name": method},
              "train": {"epochs": args.cifar_epochs, "batch_size": 64, "lr": 0.05, "schedule": "cosine",
                        "checkpoint_every": args.cifar_epochs, "keep_checkpoints": 1},
              "resources": {"threads_per_peer": 1, "gpus_per_peer": args.gpus_per_peer}}
    if method != "independent":
        config["teacher"] = {"arch": "resnet56", "checkpoint": str(Path(args.out) / "cifar-teacher")}
    return config


def cifar_sweep(args) -> None:
    import multiprocessing

    out = Path(args.out)
    root = cifar_subset(args.cifar, out / "cifar10-subset", args.cifar_train, args.cifar_test)
    teacher = cifar_config(args, root, "independent", 0) | {"model": {"arch": "resnet56"}, "name": "cifar-teacher"}
    teacher["resources"] = {**teacher["resources"], "threads_per_peer": args.teacher_threads}    # it runs alone
    print(train(teacher, out / "cifar-teacher"), flush=True)
    jobs = [(cifar_config(args, root, method, seed), out / f"cifar-{method}-s{seed}")
            for seed in args.seeds for method in CIFAR_STUDENTS]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for line in pool.starmap(train, jobs):
            print(line, flush=True)


def cifar_render(args) -> str:
    out = Path(args.out)
    teacher = json.loads((out / "cifar-teacher" / "summary.json").read_text())["peers"][0]
    lines = ["| student (resnet20) | seeds | test acc, last epoch | test acc, best epoch |", "|---|---|---|---|"]
    for method in CIFAR_STUDENTS:
        summaries = [json.loads(p.read_text()) for p in sorted(out.glob(f"cifar-{method}-s*/summary.json"))]
        last = [100 * s["peers"][0]["test_acc"] for s in summaries]
        best = [100 * s["peers"][0]["test_acc_at_best_epoch"] for s in summaries]
        label = {"independent": "alone", "kd": "kd (T 4, alpha 0.9)", "fitnet": "fitnet (one-stage, hint 100)"}
        lines.append(f"| {label[method]} | {len(summaries)} | {mean_std(last)} | {mean_std(best)} |")
    lines.append(f"\nThe resnet56 teacher (seed 0): test accuracy {100 * teacher['test_acc']:.2f}% (last epoch).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/feature-results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--render", action="store_true", help="print the table of the finished runs")
    parser.add_argument("--cifar", metavar="DATA_ROOT", help="the CIFAR-10 part instead: a CIFAR-10 batch folder")
    parser.add_argument("--cifar-train", type=int, default=2000, help="first N training images")
    parser.add_argument("--cifar-test", type=int, default=1000, help="first N test images")
    parser.add_argument("--cifar-epochs", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2, help="CIFAR student runs side by side")
    parser.add_argument("--teacher-threads", type=int, default=1, help="torch threads of the teacher's run (alone)")
    parser.add_argument("--gpus-per-peer", type=float, default=0.0, help="CIFAR runs on a GPU where one is at hand")
    args = parser.parse_args(argv)
    if args.cifar:
        if not args.render:
            cifar_sweep(args)
        print(cifar_render(args))
        return 0
    if not args.render:
        sweep(args)
    print(render(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
