"""The memory of a run's workers training on a prepared set: 1, 2 and 3 workers (one peer each) on a local Ray,
measured after epoch 1 (every train sample read once), while the workers still hold their maps: each worker's PSS
and RSS (/proc/PID/smaps_rollup) and the PSS of the set's files (PSS shares each page out among the processes that
map it: one copy per node sums to the set's size). docs/benchmarks.md, "The data path", has the figures.

    python scripts/prepared_run_memory.py DIR [--images 3000] [--size 128]

DIR keeps the generated JPEGs and the prepared set (made once, reused by a later call).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")          # a local Ray of this script's own
os.environ["RAYDISTILL_KEEP_WORKERS"] = "0"                  # each run's own workers, measured while it trains

MIB = 1024.0                                                  # /proc reports kB


def run_config(dest: Path, workers: int) -> dict:
    """``workers`` peers (a 16-unit MLP on 32 x 32 views), one per worker, one epoch of batches of 256."""
    return {"name": f"memory-{workers}", "seed": 0,
            "data": {"name": "prepared", "root": str(dest), "options": {"crop_size": 32}},
            "model": {"arch": "mlp", "options": {"hidden": [16]}}, "peers": workers,
            "method": {"name": "dml" if workers > 1 else "independent"},
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.05}, "resources": {"peers_per_worker": 1}}


def measure(dest: Path, workers: int, run_dir: Path) -> list[dict]:
    """Each worker's figures in MiB, read by the run's epoch callback (between calls: every worker answers)."""
    import ray

    import raydistill
    from raydistill.bench.data import _memory_fields, set_pss_kb
    from raydistill.runtime.driver import actor_name

    config = run_config(dest, workers)
    figures = []

    def on_epoch(record, checkpoint):
        resolved = raydistill.load_config(config)
        for rank in range(workers):
            pid = ray.get(ray.get_actor(actor_name(resolved, f"worker{rank}")).pid.remote())
            rollup = _memory_fields(f"/proc/{pid}/smaps_rollup")
            figures.append({"pss": rollup["Pss"] / MIB, "rss": rollup["Rss"] / MIB,
                            "set_pss": set_pss_kb(pid, dest) / MIB})

    raydistill.train(config, run_dir, progress=False, on_epoch=on_epoch)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    import ray

    from raydistill.bench.data import generate
    from raydistill.data.prepare import Progress, prepare

    dest = args.dir / f"prepared-{args.size}"
    if not (dest / "index.json").is_file():
        source = generate(args.dir / "jpegs", args.images, os.cpu_count())
        prepare(str(source), dest, size=args.size, workers=os.cpu_count(), progress=Progress(echo=lambda line: None))
    index = json.loads((dest / "index.json").read_text())
    files_mib = sum(entry["bytes"] for split in index["splits"].values() for entry in split["shards"]) / 2**20
    ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    print(f"the set's shards: {files_mib:.1f} MiB ({index['splits']['train']['count']:,} train images at "
          f"{args.size} px)")
    print("| workers | PSS of the set's files, per worker | summed over the workers | PSS per worker "
          "| RSS per worker |")
    print("|---|---|---|---|---|")
    for workers in (1, 2, 3):
        figures = measure(dest, workers, args.dir / f"run-{workers}-{os.getpid()}")
        mean = {key: sum(f[key] for f in figures) / workers for key in figures[0]}
        print(f"| {workers} | {mean['set_pss']:.1f} MiB | {mean['set_pss'] * workers:.1f} MiB | {mean['pss']:.0f} MiB "
              f"| {mean['rss']:.0f} MiB |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
