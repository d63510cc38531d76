"""Requests to a running run, through its run directory: RUN/control/. No Ray.

``raydistill peers add|remove RUN`` writes a request (``<time>-<pid>.json``, under a temporary name and renamed);
the run's loop reads the pending requests on its next epoch boundary, carries each out or refuses it, and answers by
writing ``<request>.done`` or ``<request>.refused`` (the request and a one-line message) and removing the request.
A running run marks itself with ``running.json`` (its host and pid), removed when it ends. ``requested_config`` turns
a request into the config of the new peer set (engine/elastic.py carries the state over to it).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from raydistill.config import load_config
from raydistill.engine.elastic import check_elastic
from raydistill.errors import ConfigError
from raydistill.files import write_text
from raydistill.names import peer_id, peer_name

CONTROL_DIR = "control"
RUNNING = "running.json"
OUTCOMES = ("done", "refused")


def control_dir(run_dir) -> Path:
    return Path(run_dir) / CONTROL_DIR


def _write(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data))


def mark_running(run_dir) -> None:
    folder = control_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / RUNNING, {"host": socket.gethostname(), "pid": os.getpid()})


def clear_running(run_dir) -> None:
    (control_dir(run_dir) / RUNNING).unlink(missing_ok=True)


def running(run_dir) -> bool:
    """Whether the run directory shows a running run (on this host: its process is alive)."""
    try:
        mark = json.loads((control_dir(run_dir) / RUNNING).read_text())
    except (OSError, ValueError):
        return False
    if mark.get("host") != socket.gethostname():
        return True                        # another host's run: its marker is all there is to go by
    try:
        os.kill(int(mark["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def submit(run_dir, request: dict) -> Path:
    path = control_dir(run_dir) / f"{time.time_ns()}-{os.getpid()}.json"
    _write(path, request)
    return path


def pending(run_dir) -> list[Path]:
    """The requests not yet answered, oldest first."""
    folder = control_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.json")
                   if p.name != RUNNING and not p.name.startswith(".") and p.is_file()),   # a folder is no request
                  key=lambda p: p.name)


def take(path: Path) -> tuple[Path, dict | None] | None:
    """Claims a pending request (renamed to ``.taken``, so it can no longer be withdrawn): (its new path, the
    request, or None if unreadable); None when it is gone (withdrawn)."""
    taken = path.with_suffix(".taken")
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return None
    try:
        request = json.loads(taken.read_text())
    except (OSError, ValueError):
        request = None
    return taken, request if isinstance(request, dict) else None


def withdraw(path: Path) -> bool:
    """Takes back a request the run has not claimed yet; False when the run has claimed it."""
    try:
        os.replace(path, path.with_suffix(".withdrawn"))
        return True
    except FileNotFoundError:
        return False


def answer(taken: Path, outcome: str, message: str, request: dict | None = None) -> None:
    _write(taken.with_suffix(f".{outcome}"), {"request": request, "outcome": outcome, "message": message})
    taken.unlink(missing_ok=True)


def wait_answer(path: Path, timeout: float, poll_s: float = 0.2) -> tuple[str, str] | None:
    """(outcome, message) once the run has answered the request at ``path``; None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for outcome in OUTCOMES:
            done = path.with_suffix(f".{outcome}")
            if done.is_file():
                return outcome, json.loads(done.read_text())["message"]
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def requested_config(config, request: dict, loop: dict):
    """The config after a control request ({action: add, arch, init} or {action: remove, peer}); bad requests
    raise a ConfigError (an unknown peer, the last peer, an unknown arch or init)."""
    check_elastic(config)
    data = config.to_dict()
    names = config.peer_names
    action = request.get("action")
    for key, kind, what in (("arch", str, "an architecture name"), ("init", str, "scratch, ensemble or peer:K"),
                            ("options", dict, "a mapping of the architecture's options"),
                            ("ranks", int, "an integer >= 1 (the new peer's data-parallel ranks)")):
        if request.get(key) is not None and not isinstance(request[key], kind):
            raise ConfigError(key, request[key], what)
    if action == "add":
        arch = request.get("arch") or config.model.arch
        used = {peer_id(n) for n in [*names, *(c["peer"] for c in loop.get("changes", []))]}
        entry = {"arch": arch, "id": max(used) + 1, "init": request.get("init") or "scratch"}
        if request.get("ranks") is not None:
            entry["ranks"] = request["ranks"]
        if arch != config.model.arch:
            entry["options"] = dict(request.get("options") or {})
        data["peers"] = [*data["peers"], entry]
    elif action == "remove":
        if isinstance(request.get("peer"), bool) or not isinstance(request.get("peer"), int):
            raise ConfigError("--peer", request.get("peer"), "a peer's number K (peerK)")
        name = peer_name(request.get("peer"))
        if name not in names:
            raise ConfigError("--peer", request.get("peer"), f"not a peer of the run (its peers: {', '.join(names)})")
        if len(names) == 1:
            raise ConfigError("--peer", request.get("peer"), "is the run's last peer; a run keeps at least one")
        data["peers"] = [p for p, n in zip(data["peers"], names) if n != name]
    else:
        raise ConfigError("action", action, "one of: add, remove")
    return load_config(data)
