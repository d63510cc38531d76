"""The Ray session of a run: joining a cluster or starting a local one, quietly, and leaving nothing behind.

A local cluster that raydistill starts lives exactly as long as the run: a watcher process (``runtime/reaper.py``)
ends every process of it if the driver is killed outright, which Ray alone does not do (its agents outlive a
SIGKILLed driver). Ray's own log lines go to ``ray.log`` in the run directory; ``--verbose`` shows them.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import subprocess
import sys
from pathlib import Path

import ray

from raydistill.errors import ConfigError

AUTH_MODE = "RAY_AUTH_MODE"
CONNECT_PROBE_S = 5.0
_state: dict = {}


def _ray_logger() -> logging.Logger:
    return logging.getLogger("ray")


def connect(config, console, verbose: bool = False, cpus: int = 0) -> bool:
    """Connects to resources.address, or starts a local Ray for the run (with at least ``cpus`` logical CPUs: a Tune
    trial reserves one beside its run's). Returns True when this call started Ray."""
    if ray.is_initialized():
        return False
    _hold_ray_logs(verbose)
    try:
        _init(config, console, verbose, cpus)
    except BaseException:
        shutdown()             # Ray's logger as it was, nothing of a half-started local cluster left behind
        raise
    return True


def _init(config, console, verbose: bool, cpus: int = 0) -> None:
    from raydistill.runtime import placement

    # INFO either way: the records reach ray.log; only the console handlers differ (muted unless verbose)
    quiet = {"include_dashboard": False, "logging_level": logging.INFO, "log_to_driver": verbose}
    address = config.resources.address
    if address:
        console.line(f"connecting to Ray at {address}…")
        _check_listening(address)
        try:
            ray.init(address=address, **({} if address.startswith("ray://") else quiet))
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError("resources.address", address, f"cannot connect to a Ray cluster there ({err})") from None
        return
    # A local cluster for this run: enough logical CPUs for every bundle even on a small laptop.
    cpus = max(os.cpu_count() or 1, placement.local_cpus_needed(config), cpus)
    # Unset, Ray turns token authentication on itself (and says so in a log record, which goes to ray.log). Setting
    # the variable here instead is too late: this process's Ray config was read at import, so the driver would not
    # send the token its own cluster asks for.
    auth = os.environ.get(AUTH_MODE, "token")
    console.line(f"starting Ray (local, {cpus} CPUs, token authentication {'on' if auth == 'token' else auth})…")
    ray.init(address="local", num_cpus=cpus, **quiet)       # a new local cluster, never a stranger's
    _state["reaper"] = _start_reaper()


def _check_listening(address: str) -> None:
    """A HOST:PORT where nothing listens is refused at once: Ray itself retries for minutes, printing C++ warnings."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return                                   # auto, ray://...: Ray finds out quickly itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_PROBE_S).close()
    except OSError as err:
        raise ConfigError("resources.address", address, f"no Ray cluster listens there ({err.strerror or err}); "
                          "give the HOST:PORT of a running cluster's GCS, auto, or ray://HOST:10001") from None


def _hold_ray_logs(verbose: bool) -> None:
    """Ray's log records wait in memory until the run directory exists (``log_to``); on the console only if verbose."""
    logger = _ray_logger()
    _state["level"] = logger.level
    buffer = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    buffer.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(buffer)
    _state["buffer"] = buffer
    if not verbose:
        for handler in logger.handlers:
            if handler is not buffer and isinstance(handler, logging.StreamHandler):
                _state.setdefault("muted", []).append((handler, handler.level))
                handler.setLevel(logging.CRITICAL + 1)


def raylet_errors_to_log() -> callable:
    """The raylet's messages to the driver ("A worker died or was killed while executing a task...", one block per
    lost worker) go to Ray's logger (ray.log) instead of the console, where a run prints its own line for each loss;
    ``--verbose`` shows them. Returns the function that puts Ray's printer back."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        for line in data.get("lines", []):
            _ray_logger().warning("(raylet) %s", line)

    ray_worker.print_to_stdstream = print_to_stdstream

    def restore():
        ray_worker.print_to_stdstream = original

    return restore


def log_to(run_dir: Path) -> None:
    """From now on Ray's log records of this session go to RUN_DIR/ray.log (with what was held so far)."""
    buffer = _state.get("buffer")
    handler = logging.FileHandler(Path(run_dir) / "ray.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if buffer is not None:
        buffer.setTarget(handler)
        buffer.flush()
        _ray_logger().removeHandler(buffer)
    _ray_logger().addHandler(handler)
    _state["file"] = handler


def shutdown() -> None:
    """Ends the session this process started (and its watcher), and gives Ray's logger back its handlers."""
    ray.shutdown()
    reaper = _state.pop("reaper", None)
    if reaper is not None:
        reaper.terminate()
        try:
            reaper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            reaper.kill()
    logger = _ray_logger()
    for key in ("buffer", "file"):
        handler = _state.pop(key, None)
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
    for handler, level in _state.pop("muted", []):
        handler.setLevel(level)
    if "level" in _state:
        logger.setLevel(_state.pop("level"))


def _start_reaper() -> subprocess.Popen:
    """A watcher in its own session: when this process dies, it ends the processes this process started."""
    return subprocess.Popen([sys.executable, "-m", "raydistill.runtime.reaper", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
