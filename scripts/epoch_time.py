"""Does a long run's per-epoch cost stay flat? Wall time between epoch ends, early against late, and loop.json's size.

    python scripts/epoch_time.py [--epochs 1000] [--runtime inprocess] [--window 50] [--preset dml-digits]

The clock is the run's own on_epoch callback: each interval holds the epoch's steps, its evaluation, its records and
its checkpoint. Prints the median interval over the first and the last `window` epochs, the last checkpoint's
loop.json size and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--runtime", default="inprocess", choices=["inprocess", "ray"])
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--preset", default="dml-digits")
    args = parser.parse_args()
    import raydistill

    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        raydistill.train(args.preset, run_dir, runtime=args.runtime, overrides=[f"train.epochs={args.epochs}"],
                         on_epoch=lambda report, checkpoint: stamps.append(time.perf_counter()), progress=False)
        last = sorted((run_dir / "checkpoints").iterdir())[-1]
        loop_bytes = (last / "loop.json").stat().st_size
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"runtime": args.runtime, "epochs": args.epochs,
                      "first_median_s": round(statistics.median(intervals[:args.window]), 4),
                      "last_median_s": round(statistics.median(intervals[-args.window:]), 4),
                      "loop_json_bytes": loop_bytes,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
