"""What a run records: TensorBoard event files, metrics.parquet (one row per epoch and model), summary.json."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _after_the_newest_event_file(folder: Path) -> None:
    """Waits (under a second) until a new event file would sort after every file already there. TensorBoard reads a
    folder's files in name order and applies a writer's purge to what it read before; a name holds the second of its
    creation, then the process id and a counter, whose digits do not sort as numbers within one second."""
    import time

    seconds = []
    for path in folder.glob("events.out.tfevents.*"):
        stamp = path.name.split(".")[3]
        if stamp.isdigit():
            seconds.append(int(stamp))
    if seconds:
        while int(time.time()) <= max(seconds):
            time.sleep(0.05)


class Recorder:
    def __init__(self, run_dir: Path, resume_epoch: int | None = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.parquet"
        self.rows: list[dict] = []
        if resume_epoch is not None and self.metrics_path.exists():
            self.rows = pq.read_table(self.metrics_path).to_pylist()
        self.writer = None
        self.rewind(resume_epoch)

    def rewind(self, epoch: int | None) -> None:
        """The records after ``epoch`` are dropped (a resumed or rolled-back run records those epochs again): from
        metrics.parquet's rows, and from TensorBoard, which drops what its files hold from the next step on."""
        from torch.utils.tensorboard import SummaryWriter   # tensorboard is a dependency; imported where used

        if epoch is not None:
            self.rows = [row for row in self.rows if row["epoch"] <= epoch]
        if self.writer is not None:
            self.writer.close()
        _after_the_newest_event_file(self.run_dir / "tb")
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=epoch + 1 if epoch is not None else None)

    def log_epoch(self, epoch: int, rows: list[dict], scalars: dict[str, float]) -> None:
        """epoch: numbered from 1; rows: one per model (peers, ensemble, teachers); scalars: TensorBoard tag -> value."""
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()
        self.rows.extend(rows)
        tmp = self.metrics_path.with_suffix(".parquet.tmp")
        columns = list(dict.fromkeys(key for row in self.rows for key in row))   # every key of any row, in order
        table = pa.table({key: [row.get(key) for row in self.rows] for key in columns})
        pq.write_table(table, tmp)             # pyarrow alone: pandas costs a second to import
        os.replace(tmp, self.metrics_path)

    def write_summary(self, summary: dict) -> None:
        write_json(self.run_dir / "summary.json", summary)

    def close(self) -> None:
        self.writer.close()


def write_json(path: Path, data: dict) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
