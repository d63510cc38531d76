"""train(): one run from a config to its run directory, on the Ray runtime or in this process.

Everything that can be refused is checked before Ray starts and before the run directory is written. Ray is imported
only for ``runtime="ray"``: the in-process runtime (the reference, and what a machine without Ray runs) needs none.
"""
from __future__ import annotations

import copy
import datetime
import fcntl
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.config import Config, check_data_fits, check_written, dump_config, load_config
from raydistill.engine.checkpoint import LOOP, check_compatible, latest_checkpoint, load_latest_checkpoint
from raydistill.engine.data import check_digest, describe_sources, load_run_data
from raydistill.engine.grid import sync_bn_warning
from raydistill.engine.peer import check_trainable
from raydistill.engine.elastic import change_peers, check_inits, consumed, names_of, renumber, save_retired
from raydistill.engine.storage import resolve_storage
from raydistill.engine.teacher import check_teachers
from raydistill.errors import ConfigError
from raydistill.runtime.inprocess import InProcessWorkers
from raydistill.runtime.console import Console
from raydistill.runtime.interrupts import interrupts_kept, interrupts_kept_again, terminated
from raydistill.runtime.loop import Run, RunResult

RUNTIMES = ("ray", "inprocess")


def default_run_dir(config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.name}-{stamp}"


def check_writable(run_dir: Path) -> None:
    """The run directory, or the nearest folder above it that exists, must be writable: found before Ray starts."""
    probe = Path(run_dir).resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("--output", str(run_dir), f"cannot be written ({probe} is not a writable folder)")


def _resume_state(run_dir: Path, config, console: Console):
    """The newest readable checkpoint of a run directory (an unreadable one is skipped, and said so), or None."""
    state, skipped = load_latest_checkpoint(run_dir, config.num_peers)
    for path, reason in skipped:
        console.line(f"checkpoint {path.name} cannot be read ({reason}); using an earlier one")
    return state


@dataclass
class Plan:
    """A run, checked whole before anything starts: its config, directory, data and the state it goes on from."""
    config: Config
    run_dir: Path
    spec: object
    data: object                           # the run's data set (engine/data.py): in memory, or a prepared set
    resume_state: dict | None = None
    restart: bool = False                  # a run directory with no checkpoint yet, started again from its beginning
    retired: dict = field(default_factory=dict)   # the models of peers a --resume --set peers=... removes


def train(config=None, output=None, *, overrides=None, runtime: str = "ray", resume=None,
          stop_after_epoch: int | None = None, progress: bool = True, from_checkpoint=None, on_epoch=None,
          placement_group=None, verbose: bool = False) -> RunResult:
    """Trains a run and returns its summary.

    config: a Config, a preset name, a YAML/JSON path or a dict (None: the default job, DML on digits);
    output: the run directory (default runs/NAME-TIMESTAMP); resume: a run directory to continue from its last readable
    checkpoint (overrides may change it, e.g. extend train.epochs or lower train.lr; a directory with no checkpoint yet
    starts again from the beginning); stop_after_epoch: stop (with a checkpoint) after that many epochs in all.
    For Tune: from_checkpoint continues a checkpoint directory under this (possibly mutated) config in a new run
    directory; on_epoch(record, checkpoint_dir) is called after every epoch; placement_group is the trial's group,
    laid out as placement.bundles(config, driver_cpus=1). verbose: show Ray's own log lines.

    In four steps: ``plan`` checks everything that can be refused (nothing started, nothing written); the run
    directory is claimed (``RunDirectory``: one run at a time); ``start_workers`` starts them (Ray, or this process);
    ``Run.train`` trains. SIGINT and SIGTERM stop it with the last checkpoint kept (``stopped``).
    """
    if runtime not in RUNTIMES:
        raise ConfigError("--runtime", runtime, f"one of: {', '.join(RUNTIMES)}")
    console = Console(progress)
    with interrupts_kept():
        return _train(console, config, output, overrides, resume, from_checkpoint, stop_after_epoch, runtime,
                      placement_group, verbose, on_epoch)


def _train(console, config, output, overrides, resume, from_checkpoint, stop_after_epoch, runtime, placement_group,
           verbose, on_epoch) -> RunResult:
    plan = _plan(config, output, overrides, resume, from_checkpoint, stop_after_epoch, console)
    claim = RunDirectory(plan.run_dir, "--resume" if resume is not None else "--output")
    try:
        workers, rebuild, session = _start_workers(plan, runtime, placement_group, console, verbose)
    except KeyboardInterrupt as interrupt:
        _stopped(interrupt, plan.run_dir, claim, console)
        raise
    except BaseException:
        claim.release(discard=True)            # nothing of a run that never started stays behind
        raise
    restore_printer = _raylet_errors_to_log() if runtime == "ray" and not verbose else None
    run = None
    try:
        if plan.restart:
            console.line(f"{plan.run_dir} holds no checkpoint yet: starting it again from the beginning")
            _clear_records(plan.run_dir)
        dump_config(plan.config, plan.run_dir / "config.yaml")     # on --resume too: the values it trains with now
        save_retired(plan.run_dir, plan.retired)
        if session is not None:
            session.log_to(plan.run_dir)
        run = Run(plan.config, plan.spec, plan.data, workers, plan.run_dir, runtime, console,
                  on_epoch=on_epoch, rebuild=rebuild if placement_group is None else None)  # a trial's: fixed
        return run.train(plan.resume_state, stop_after_epoch)
    except KeyboardInterrupt as interrupt:
        _stopped(interrupt, plan.run_dir, claim, console)
        if terminated(interrupt):
            # the process ends now, within the seconds its sender waits before SIGKILL. Nothing more is asked of
            # Ray, whose processes may have had the signal too: the workers end with their owner (this process)
            # and a local cluster with its watcher (runtime/reaper.py).
            workers = session = None
        raise
    finally:
        if workers is not None:
            (run.workers if run is not None else workers).shutdown()     # the workers of its last peer set
        if session is not None:
            session.shutdown()
        if restore_printer is not None:
            restore_printer()
        claim.release()


def _plan(config, output, overrides, resume, from_checkpoint, stop_after_epoch, console: Console) -> Plan:
    """Everything that can be refused, checked before Ray starts and before the run directory is written."""
    resume_state, restart = None, False
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError("--resume", str(resume), "is not a run directory (no config.yaml)")
        check_written(run_dir / "config.yaml")
        config = load_config(run_dir, overrides)
        resume_state = _resume_state(run_dir, config, console)
        done = resume_state[LOOP]["epochs_completed"] if resume_state is not None else 0
        restart = resume_state is None
        if done >= config.train.epochs:
            raise ConfigError("train.epochs", config.train.epochs,
                              f"the run already completed {done} epochs; raise train.epochs to train further")
        if stop_after_epoch is not None and stop_after_epoch <= done:
            raise ConfigError("--stop-after-epoch", stop_after_epoch,
                              f"the run already completed {done} epochs; give a later epoch")
    else:
        if not isinstance(config, Config):
            config = load_config(config, overrides)
        run_dir = Path(output) if output is not None else default_run_dir(config)
        if run_dir.exists() and any(p.name != RunDirectory.LOCK for p in run_dir.iterdir()):
            raise ConfigError("--output", str(run_dir), "already holds files; choose a new directory or --resume it")
        if from_checkpoint is not None:
            resume_state, _ = load_latest_checkpoint(from_checkpoint, config.num_peers, single=True)
    if config.teacher_list:
        config = _absolute_teacher_paths(config, run_dir)
    check_writable(run_dir)
    if config.train.storage:
        resolve_storage(config.train.storage)
    spec, data = load_run_data(config)
    check_digest(config, data)                               # a resumed run goes on with the set it trained on
    if config.data.digest is None:
        config = copy.deepcopy(config)
        config.data.digest = data.digest                     # recorded in config.yaml
    check_data_fits(config, data.num_samples("train"))
    retired = {}
    if resume_state is not None and resume is not None:
        config, resume_state, retired = _changed_peers(run_dir, config, resume_state, spec, data, console)
    elif resume_state is None:
        check_inits(config, None)
    if resume_state is not None:
        check_compatible(config, spec, resume_state, str(resume or from_checkpoint))
    check_trainable(config, spec, data)                     # every peer architecture takes the data's inputs
    warning = sync_bn_warning(config, spec)
    if warning is not None:
        console.line(warning, force=True)
    check_teachers(config, spec)                            # every teacher's weights and hint layer
    return Plan(config, run_dir, spec, data, resume_state, restart, retired)


def _start_workers(plan: Plan, runtime: str, placement_group, console: Console, verbose: bool):
    """(the workers, rebuild(config) -> the workers of another peer set, the Ray session this call started or None)."""
    config, spec, data = plan.config, plan.spec, plan.data
    if runtime != "ray":
        workers = InProcessWorkers(config, spec, data)
        if not data.resident:
            console.line(describe_sources(data, ["local"], [workers.worker.data_source()]))
        return workers, lambda changed: InProcessWorkers(changed, spec, data), None
    from raydistill.runtime import session
    from raydistill.runtime.driver import RayWorkers, connect

    started = connect(config, console, verbose)
    interrupts_kept_again()                # ray.init put its own SIGTERM handler in place of ours
    generations = iter(range(1, 1 << 30))

    def rebuild(changed):                 # the workers of a changed peer set (elastic peers)
        return RayWorkers(changed, spec, data, console=console, generation=next(generations))

    try:
        workers = RayWorkers(config, spec, data, group=placement_group,
                             driver_cpus=1.0 if placement_group is not None else 0.0, console=console)
    except KeyboardInterrupt as interrupt:
        if terminated(interrupt):
            raise                              # the process ends now: nothing more is asked of Ray
        if started:
            session.shutdown()
        raise
    except BaseException:
        if started:
            session.shutdown()
        raise
    return workers, rebuild, session if started else None


def _raylet_errors_to_log():
    from raydistill.runtime import session

    return session.raylet_errors_to_log()


def _stopped(interrupt: KeyboardInterrupt, run_dir: Path, claim: "RunDirectory", console: Console) -> None:
    """Ctrl-C or SIGTERM: the line that says what is kept and how to go on (under --quiet too); a new run directory
    with no checkpoint yet goes."""
    what = "stopped by SIGTERM" if terminated(interrupt) else "interrupted"
    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is None:
        claim.release(discard=True)                         # nothing worth keeping yet
        console.line(f"{what} before the first checkpoint: nothing kept", force=True)
    else:
        console.line(f"{what}: the last checkpoint is {latest.name}; continue with "
                     f"`raydistill train --resume {run_dir}`", force=True)


class RunDirectory:
    """A run directory held by one run at a time: an exclusive lock on RUN/.lock (``flock``), taken before anything
    starts and released by the kernel however the process ends, so a dead run's claim is never stale. Two runs
    started on one --output: the second is refused in one line."""
    LOCK = ".lock"

    def __init__(self, run_dir: Path, field: str):
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            self.created = False
        self.handle = open(self.run_dir / self.LOCK, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise ConfigError(field, str(run_dir), f"is in use by another run ({holder}); wait for it to end, "
                              "or choose another directory") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self, discard: bool = False) -> None:
        """Lets the directory go; discard: and removes it, if this run created it and it holds no checkpoint."""
        if self.handle.closed:
            return
        if discard and self.created and latest_checkpoint(self.run_dir) is None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.handle.close()


def _changed_peers(run_dir: Path, config, state: dict, spec, data, console: Console):
    """``--resume DIR --set peers=...``: the checkpoint's peers matched to the config's by name (peer<id>); a peer
    that left keeps its records and export, a new one starts as its ``init`` says (elastic.change_peers, as a running
    run does it). Returns (config, state, the departing peers' deployable models)."""
    config = renumber(config, state)
    if names_of(state) == config.peer_names:
        check_inits(config, state)
        return config, state, {}
    previous = load_config(run_dir)                          # the peer set the checkpoint was written with
    state, retired, events = change_peers(previous, config, state, spec, data)
    done = "; ".join(f"added {e['peer']} ({e['arch']}, init {e['init']})" if e["action"] == "add"
                     else f"removed {e['peer']}" for e in events)
    console.line(f"peers: {done} after epoch {state['loop']['epochs_completed']}; peers now "
                 f"{', '.join(config.peer_names)}")
    return consumed(config), state, retired


def _absolute_teacher_paths(config, run_dir: Path):
    """The actors read the teachers' checkpoints and caches, and they run in the folder their cluster was started in,
    not in this one: the paths become absolute here (as Tune's trials do). ``cache: true`` is the run's own folder
    (each teacher j writes its own ``teacher_cache/teacher{j}``)."""
    config = copy.deepcopy(config)
    for teacher in config.teacher_list:
        teacher.checkpoint = os.path.abspath(teacher.checkpoint)
        if teacher.cache is True:
            teacher.cache = str(run_dir.resolve() / "teacher_cache")
        elif isinstance(teacher.cache, str) and teacher.cache:
            teacher.cache = os.path.abspath(teacher.cache)
    return config


def _clear_records(run_dir: Path) -> None:
    """A run started again in its own directory: the records of the attempt that left no checkpoint go."""
    for name in ("tb", "metrics.parquet", "summary.json", "export"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
