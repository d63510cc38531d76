"""train(): one run from a config to its run directory, on the Ray runtime or in this process.

Everything that can be refused is checked before Ray starts and before the run directory is written. Ray is imported
only for ``runtime="ray"``: the in-process runtime (the reference, and what a machine without Ray runs) needs none.
"""
from __future__ import annotations

import copy
import datetime
import os
import shutil
from pathlib import Path

from raydistill.config import Config, check_data_fits, dump_config, load_config
from raydistill.engine.checkpoint import check_compatible, latest_checkpoint, load_latest_checkpoint
from raydistill.engine.data import load_run_data
from raydistill.engine.elastic import change_peers, check_inits, consumed, names_of, renumber, save_retired
from raydistill.engine.storage import resolve_storage
from raydistill.engine.teacher import check_teachers
from raydistill.errors import ConfigError, Terminated
from raydistill.runtime.inprocess import InProcessWorkers
from raydistill.runtime.loop import Console, Run, RunResult, interrupts_kept

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
    """
    if runtime not in RUNTIMES:
        raise ConfigError("--runtime", runtime, f"one of: {', '.join(RUNTIMES)}")
    console = Console(progress)
    resume_state, restart = None, False
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError("--resume", str(resume), "is not a run directory (no config.yaml)")
        config = load_config(run_dir, overrides)
        resume_state = _resume_state(run_dir, config, console)
        if resume_state is None:
            restart = True
        elif resume_state["loop"]["epochs_completed"] >= config.train.epochs:
            raise ConfigError("train.epochs", config.train.epochs,
                              f"the run already completed {resume_state['loop']['epochs_completed']} epochs; "
                              "raise train.epochs to train further")
    else:
        if not isinstance(config, Config):
            config = load_config(config, overrides)
        run_dir = Path(output) if output is not None else default_run_dir(config)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError("--output", str(run_dir), "already holds files; choose a new directory or --resume it")
        if from_checkpoint is not None:
            resume_state, _ = load_latest_checkpoint(from_checkpoint, config.num_peers, single=True)

    if config.teacher_list:
        config = _absolute_teacher_paths(config, run_dir)
    # everything that can be refused is checked before Ray starts and before the run directory is written
    check_writable(run_dir)
    if config.train.storage:
        resolve_storage(config.train.storage)
    spec, arrays = load_run_data(config)
    check_data_fits(config, len(arrays["train_y"]))
    retired = {}
    if resume_state is not None and resume is not None:
        config, resume_state, retired = _changed_peers(run_dir, config, resume_state, spec, arrays, console)
    elif resume_state is None:
        check_inits(config, None)
    if resume_state is not None:
        check_compatible(config, spec, resume_state, str(resume or from_checkpoint))
    check_teachers(config, spec)                            # every teacher's weights and hint layer
    started = False
    if runtime == "ray":
        from raydistill.runtime import session
        from raydistill.runtime.driver import RayWorkers, connect

        started = connect(config, console, verbose)
        generations = iter(range(1, 1 << 30))

        def rebuild(changed):                 # the workers of a changed peer set (elastic peers)
            return RayWorkers(changed, spec, arrays, console=console, generation=next(generations))

        try:
            workers = RayWorkers(config, spec, arrays, group=placement_group,
                                 driver_cpus=1.0 if placement_group is not None else 0.0, console=console)
        except BaseException:
            if started:
                session.shutdown()
            raise
    else:
        def rebuild(changed):
            return InProcessWorkers(changed, spec, arrays)

        workers = InProcessWorkers(config, spec, arrays)
    created = not run_dir.exists()
    run = None
    try:
        if restart:
            console.line(f"{run_dir} holds no checkpoint yet: starting it again from the beginning")
            _clear_records(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")       # on --resume too: the values it trains with now
        save_retired(run_dir, retired)
        if started:
            session.log_to(run_dir)
        with interrupts_kept():
            run = Run(config, spec, arrays, workers, run_dir, runtime, console, on_epoch=on_epoch,
                      rebuild=rebuild if placement_group is None else None)   # a Tune trial's group holds its peers
            return run.train(resume_state, stop_after_epoch)
    except KeyboardInterrupt as interrupt:
        what = "stopped by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
        latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if latest is None:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)      # nothing worth keeping yet
            console.line(f"{what} before the first checkpoint: nothing kept", force=True)
        else:
            console.line(f"{what}: the last checkpoint is {latest.name}; continue with "
                         f"`raydistill train --resume {run_dir}`", force=True)
        if isinstance(interrupt, Terminated):
            # the process ends now, within the seconds its sender waits before SIGKILL. Nothing more is asked of
            # Ray, whose processes may have had the signal too: the workers end with their owner (this process)
            # and a local cluster with its watcher (runtime/reaper.py).
            started, workers = False, None
        raise
    finally:
        if workers is not None:
            (run.workers if run is not None else workers).shutdown()     # the workers of its last peer set
        if started:
            session.shutdown()


def _changed_peers(run_dir: Path, config, state: dict, spec, arrays, console: Console):
    """``--resume DIR --set peers=...``: the checkpoint's peers matched to the config's by name (peer<id>); a peer
    that left keeps its records and export, a new one starts as its ``init`` says (elastic.change_peers, as a running
    run does it). Returns (config, state, the departing peers' deployable models)."""
    config = renumber(config, state)
    if names_of(state) == config.peer_names:
        check_inits(config, state)
        return config, state, {}
    previous = load_config(run_dir)                          # the peer set the checkpoint was written with
    state, retired, events = change_peers(previous, config, state, spec, arrays)
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
