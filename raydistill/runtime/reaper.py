"""Ends a dead driver's local Ray: ``python -m raydistill.runtime.reaper DRIVER_PID`` (started by runtime/session.py).

While the driver lives, the watcher notes every process below it (Ray's GCS, raylet, agents and workers) with its
start time; once the driver is gone, it ends those of them that still run (the same process, not a reused pid), so a
SIGKILLed ``raydistill train`` leaves nothing behind. A driver that shuts Ray down normally also stops the watcher.
Linux only (it reads /proc); elsewhere it exits at once.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

POLL_S = 1.0
GRACE_S = 3.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a process, or None when it is gone. A zombie (dead, not yet reaped by its
    parent: a killed driver whose parent has not waited for it yet) is gone: it runs nothing, and what it started
    must not wait for its parent to reap it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()       # after "pid (name) ": state, parent pid, ...
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None:
                children.setdefault(found[0], []).append(int(entry))
                starts[int(entry)] = found[1]
    result, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in starts:
            result[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return result


def _alive(known: dict[int, int]) -> list[int]:
    return [pid for pid, start in known.items() if (_stat(pid) or (None, None))[1] == start]


def main(driver: int) -> int:
    if not Path("/proc").is_dir():
        return 0
    me = os.getpid()
    known: dict[int, int] = {}
    while _stat(driver) is not None:
        known.update({pid: start for pid, start in descendants(driver).items() if pid != me})
        time.sleep(POLL_S)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        alive = _alive(known)
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = _alive(known)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
