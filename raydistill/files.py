"""Writing a run's files: whole or not at all (a temporary name, then renamed), and a full disk said in one line that
names the file (``DiskFull``), never a raw OSError or torch's "unexpected pos"."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TORCH_WRITE_FAILED = ("file write failed", "unexpected pos", "iostream error")   # torch.save's writer, disk full
NEARLY_FULL = 1 << 20            # a write error with less than this free where it wrote: the disk is full


class DiskFull(OSError):
    """A run's file could not be written because its filesystem is full (or over quota)."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(errno.ENOSPC, f"the disk is full: cannot write {self.path} ({_free(self.path)} free there)")

    def __reduce__(self):
        return (type(self), (self.path,))


def _free_bytes(path: Path) -> int | None:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _free(path: Path) -> str:
    free = _free_bytes(path)
    if free is None:
        return "unknown space"
    return f"{free / 2**20:.1f} MiB" if free >= 2**20 else f"{free} bytes"


def is_disk_full(err: BaseException, path=None) -> bool:
    """An OSError of a full disk or quota; or an error of torch's writer (which words ENOSPC in several ways) where
    the filesystem has next to nothing left."""
    if isinstance(err, OSError):
        return err.errno in FULL_ERRNOS
    if not isinstance(err, RuntimeError):
        return False
    if any(text in str(err) for text in TORCH_WRITE_FAILED):
        return True
    free = _free_bytes(path) if path is not None else None
    return free is not None and free < NEARLY_FULL


@contextlib.contextmanager
def disk_write(path):
    """Writes to ``path`` in the block: a full disk becomes DiskFull(path), which names it; other errors pass."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, RuntimeError) as err:
        if is_disk_full(err, path):
            raise DiskFull(path) from err
        raise


def write_text(path, text: str) -> None:
    """``path`` written whole or not at all: a temporary name in the same folder, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_write(path):
            tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
