"""What a run records: TensorBoard event files, metrics.parquet (one row per epoch and model), summary.json."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.files import DiskFull, disk_write, write_text


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
    """Each epoch's rows are appended to ``metrics.jsonl`` as the epoch ends (a constant cost per epoch, however long
    the run); ``metrics.parquet``, the table tools read, is written from them at most every ``PARQUET_EVERY_S``
    seconds and when the run ends. A resume reads the rows from ``metrics.jsonl`` (``metrics.parquet`` for runs
    written before it)."""

    PARQUET_EVERY_S = 10.0

    def __init__(self, run_dir: Path, resume_epoch: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.parquet"
        self.lines_path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if resume_epoch is not None and self.lines_path.exists():
            self.rows = [json.loads(line) for line in self.lines_path.read_text().splitlines() if line.strip()]
        elif resume_epoch is not None and self.metrics_path.exists():
            self.rows = pq.read_table(self.metrics_path).to_pylist()
        self.writer = None
        self.written = -math.inf                  # when metrics.parquet was last written (time.monotonic)
        self.rewind(resume_epoch)

    def rewind(self, epoch: int | None) -> None:
        """The records after ``epoch`` are dropped (a resumed or rolled-back run records those epochs again): from
        the rows, and from TensorBoard, which drops what its files hold from the next step on."""
        from torch.utils.tensorboard import SummaryWriter   # tensorboard is a dependency; imported where used

        if epoch is not None:
            self.rows = [row for row in self.rows if row["epoch"] <= epoch]
        with disk_write(self.lines_path):
            write_text(self.lines_path, "".join(json.dumps(row) + "\n" for row in self.rows))
        if self.rows or self.metrics_path.exists():
            self.write_table()
        if self.writer is not None:
            self.writer.close()
        _after_the_newest_event_file(self.run_dir / "tb")
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=epoch + 1 if epoch is not None else None)

    def log_epoch(self, epoch: int, rows: list[dict], scalars: dict[str, float]) -> None:
        """epoch: numbered from 1; rows: one per model (peers, ensemble, teachers); scalars: TensorBoard tag -> value."""
        with disk_write(self.run_dir / "tb"):
            for tag, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, epoch)
            self.writer.flush()
        with disk_write(self.lines_path), open(self.lines_path, "a") as lines:
            lines.write("".join(json.dumps(row) + "\n" for row in rows))
        self.rows.extend(rows)
        if time.monotonic() - self.written >= self.PARQUET_EVERY_S:
            self.write_table()

    def write_table(self) -> None:
        """metrics.parquet from the rows: every key of any row a column, in order of appearance."""
        tmp = self.metrics_path.with_suffix(".parquet.tmp")
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        table = pa.table({key: [row.get(key) for row in self.rows] for key in columns})
        try:
            with disk_write(self.metrics_path):
                pq.write_table(table, tmp)             # pyarrow alone: pandas costs a second to import
        except DiskFull:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.metrics_path)
        self.written = time.monotonic()

    def write_summary(self, summary: dict) -> None:
        write_json(self.run_dir / "summary.json", summary)

    def close(self) -> None:
        """The run ends (or stops): metrics.parquet holds every row."""
        self.writer.close()
        if self.rows:
            self.write_table()


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=float))
