"""The run, top to bottom: epochs of calls of steps, evaluation, records, checkpoints, export. Runtime-agnostic.

The loop talks to a ``workers`` object (Ray actors, or the same engine objects in this process) on call boundaries
only: ``run_steps(epoch, first, count)`` runs a call of steps and returns its figures (a CallReport);
``evaluate``, ``get_state``/``set_state`` and ``export`` happen between calls. Rollback points, checkpoints and the
finiteness check fall on those boundaries.

Responsibilities, each a method: the epoch loop (``train``), one epoch's calls (``train_epoch``), rollback points
and recovery from a lost worker (``mark_rollback``, ``recover``), carrying out the health watch's decisions on a
non-finite loss or an unhealthy stretch (``check_finite``, ``carry_out``: ``roll_back`` or ``stop``). What a run
reports is ``reports.Reports``'s job; what is healthy is ``health.HealthWatch``'s.
"""
from __future__ import annotations

import contextlib
import copy
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.config import dump_config
from raydistill.data.views import num_steps
from raydistill.engine import elastic
from raydistill.engine.checkpoint import (checkpoint_epoch, checkpoint_path, discard_after, latest_checkpoint,
                                          list_checkpoints, load_checkpoint, save_checkpoint)
from raydistill.engine.recorder import Recorder
from raydistill.engine.storage import mirror
from raydistill.engine.worker import CallReport
from raydistill.engine.peer import check_trainable
from raydistill.errors import ConfigError, Terminated, one_line
from raydistill.files import DiskFull
from raydistill.methods import build_method
from raydistill.runtime import control
from raydistill.runtime.health import Action, Decision, HealthWatch, replay_of
from raydistill.runtime.reports import LoopState, Reports


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a lost actor past its restarts); the message says what to do."""


class WorkerLost(RuntimeError):
    """A worker or the coordinator died (its process or its node), or the group broke; the runtime recovers."""


class WorkerGivenUp(RuntimeError):
    """Ray will not restart a lost worker: it has been restarted resources.max_restarts times already."""


_INTERRUPTED: list[int] = []                 # the signals received during the run, in order


def _interruption(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_interrupt(signum, frame):
    _INTERRUPTED.append(signum)
    raise _interruption(signum)


@contextlib.contextmanager
def interrupts_kept():
    """Ctrl-C (SIGINT) or SIGTERM during a run: KeyboardInterrupt (``Terminated`` for SIGTERM), and remembered,
    because Python drops an exception raised while it runs a callback (an import lock's, a weakref's): the loop
    raises it again at the next call boundary (``check_interrupted``). Only in the main thread, where signal
    handlers live."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _INTERRUPTED.clear()
    previous = {sig: signal.signal(sig, _on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _INTERRUPTED.clear()


def interrupts_kept_again() -> None:
    """Inside ``interrupts_kept``: its handlers again, after something replaced them (``ray.init`` installs a SIGTERM
    handler of its own that ends the process without a word)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _on_interrupt:
        signal.signal(signal.SIGTERM, _on_interrupt)


def check_interrupted() -> None:
    if _INTERRUPTED:
        raise _interruption(_INTERRUPTED[0])


class Unhealthy(Exception):
    """A call of steps ended unhealthy (a non-finite loss): the epoch stops, and the loop carries out the decision."""

    def __init__(self, decision: Decision):
        super().__init__(decision.reason)
        self.decision = decision


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


@dataclass
class PeerChange:
    """A change of the peer set on trial: what it replaced (config, the workers' state, the loop state at the epoch
    boundary), the requests that asked for it, and what it made."""
    config: object
    workers: dict
    loop: LoopState
    requests: list                                       # (taken request path, request)
    message: str = ""
    retired: dict = field(default_factory=dict)
    epoch: int = 0
    new_workers: dict = field(default_factory=dict)
    new_loop: dict = field(default_factory=dict)


@dataclass
class RollbackPoint:
    """Where a lost worker rolls the run back to: an epoch checkpoint (kept in memory too) or a mid-epoch point."""
    epoch: int
    step: int
    workers: dict                                        # the workers' state (get_state)
    figures: CallReport = field(default_factory=CallReport)   # the epoch's figures up to `step`
    loop: LoopState = field(default_factory=LoopState)


class Console:
    """A progress bar per epoch (when stderr is a terminal), a line per epoch, a final table."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = enabled and sys.stderr.isatty()

    def progress(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        if self.bar:
            filled = int(30 * step / steps)
            sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}")
            sys.stderr.flush()

    def line(self, text: str, force: bool = False) -> None:
        """force: printed under --quiet too (how a run ended, and how to go on)."""
        if self.enabled or force:
            if self.bar:
                sys.stderr.write("\r" + " " * 60 + "\r")
            print(text, flush=True)


class Run:
    def __init__(self, config, spec, arrays: dict, workers, run_dir: Path, runtime: str, console: Console,
                 on_epoch=None, rebuild=None):
        """rebuild(config) -> workers: starts the workers of another peer set (elastic peers); None: a run whose
        peer set cannot change while it runs (a Tune trial's), which refuses such requests."""
        self.config = config
        self.spec, self.arrays = spec, arrays
        self.rebuild = rebuild
        self.on_epoch = on_epoch
        self.workers = workers
        self.run_dir = Path(run_dir)
        self.runtime = runtime
        self.console = console
        self.method = build_method(config)
        self.steps = num_steps(len(arrays["train_y"]), config.train.batch_size)
        self.reports = Reports(config, self.method, spec, len(arrays["val_y"]) > 0)
        self.health = HealthWatch(config.train.health)
        self.state = LoopState()
        self.position = (0, 0)                 # (epoch, step) the workers reach with the current call
        self.trial: PeerChange | None = None   # a peer-set change on trial: until the new set trains an epoch

    # ---- the epoch loop --------------------------------------------------------------------------------------------
    def train(self, resume_state: dict | None = None, stop_after_epoch: int | None = None) -> RunResult:
        start = time.perf_counter()
        if resume_state is not None:
            self.state = LoopState.from_dict(resume_state["loop"], self.observe)
        first = self.state.epochs_completed
        recorder = self.recorder = Recorder(self.run_dir, resume_epoch=first if resume_state is not None else None)
        epochs = self.config.train.epochs
        wall_before = self.state.wall_s
        self.state.peers = self.config.peer_names
        self.mark_rollback(first, 0, self.start(resume_state), CallReport())
        self.save_start()
        epoch = first
        control.mark_running(self.run_dir)
        disk_full = False
        try:
            while epoch < epochs:
                last = epoch + 1 == epochs or (stop_after_epoch is not None and epoch + 1 >= stop_after_epoch)
                due = last or (epoch + 1) % self.config.train.checkpoint_every == 0
                try:                                   # every call to the workers of this epoch, nothing recorded yet
                    figures, seconds = self.train_epoch(epoch)
                    evaluation = {"val": self.workers.evaluate("val") if self.reports.has_val else None,
                                  "test": self.workers.evaluate("test")}
                    worker_state = self.workers.get_state() if due else None
                except WorkerLost as lost:
                    epoch = self.recover(lost)
                    continue
                except Unhealthy as unhealthy:
                    epoch = (self.undo_change(unhealthy.decision.reason) if self.trial is not None
                             else self.carry_out(unhealthy.decision))
                    continue
                except Exception as err:
                    if self.trial is None:
                        raise
                    epoch = self.undo_change(one_line(err))   # a new peer set that cannot train
                    continue
                train = [figures.peers[i].means() for i in range(self.config.num_peers)]
                samples = self.steps * self.config.train.batch_size
                record = self.reports.epoch_record(epoch, train, evaluation, seconds, samples, self.state.last,
                                                   replay_of(self.state.rollbacks, epoch), len(self.state.rollbacks))
                self.observe(self.state, record)
                self.state.epochs_completed = epoch + 1
                self.state.wall_s = wall_before + time.perf_counter() - start
                recorder.log_epoch(epoch + 1, *self.reports.rows_and_scalars(record))
                self.console.line(self.reports.epoch_line(record))
                decision = self.health.after_epoch(self.state, self.checkpoint_epochs())
                if decision.action is not Action.CONTINUE:     # the epoch's checkpoint is not written
                    epoch = self.undo_change(decision.reason) if self.trial is not None else self.carry_out(decision)
                    continue
                if self.trial is not None:
                    self.confirm_change()
                checkpoint = None
                if due:
                    checkpoint = self.save(epoch + 1, worker_state)
                    self.mark_rollback(epoch + 1, 0, worker_state, CallReport())
                    self.mirror()
                if self.on_epoch is not None:
                    self.on_epoch(self.reports.epoch_report(record), checkpoint)
                check_interrupted()
                if last:
                    break
                try:
                    self.carry_out_requests(epoch + 1, worker_state)
                except WorkerLost as lost:                 # the new set's rollback point if the change was made
                    epoch = self.recover(lost)
                    continue
                epoch += 1
            exported = self.export_states() if self.state.epochs_completed == epochs else None
            summary = self.reports.summary(self.state, self.runtime, self.workers.transport_name, self.workers.nodes())
            if exported is not None:                     # the summary counts a worker lost during the export
                summary["deploy"] = self.reports.deploy(self.state.last)
                removed = [c["peer"] for c in self.state.changes if c["action"] == "remove"]
                exported = {**elastic.load_retired(self.run_dir, removed), **exported}
                self.reports.write_export(self.run_dir, exported, summary["deploy"])
            recorder.write_summary(summary)
        except DiskFull as full:
            disk_full = True
            raise TrainingError(f"{full.strerror}; the run stopped: {self.kept()} once there is room") from None
        finally:
            control.clear_running(self.run_dir)
            if self.trial is not None:                   # the checkpoints hold the peer set before the change
                for taken, request in self.trial.requests:
                    control.answer(taken, "refused", "refused: the run ended before the new peer set trained an "
                                   "epoch; its checkpoints hold the peers before the change", request)
            self.refuse_requests("the run has ended")
            try:
                recorder.close()
            except DiskFull:
                if not disk_full:                        # else the line above says it already
                    raise
        self.mirror()
        self.console.line(self.reports.final_table(summary, self.run_dir))
        return RunResult(self.run_dir, summary)

    def observe(self, state: LoopState, record: dict) -> None:
        """An epoch's record joins the loop state: the reports' last and best figures, the health watch's streak."""
        self.reports.observe(state, record)
        state.streak = self.health.streak(state.streak, record)

    def export_states(self) -> dict:
        """The workers' deployable models; a worker lost at this point is recovered and asked again (the weights
        are the last checkpoint's, which the run has just written)."""
        while True:
            try:
                return self.workers.export()
            except WorkerLost as lost:
                self.recover(lost)

    def calls(self, start_step: int) -> list[tuple[int, int]]:
        """(first step, count) of each call of an epoch from start_step: train.steps_per_call steps (default: to the
        epoch's end), never across a train.checkpoint_every_steps rollback point."""
        every = self.config.train.checkpoint_every_steps
        per_call = self.config.train.steps_per_call or self.steps
        calls, step = [], start_step
        while step < self.steps:
            end = min(self.steps, step + per_call)
            if every is not None:
                end = min(end, (step // every + 1) * every)
            calls.append((step, end - step))
            step = end
        return calls

    def train_epoch(self, epoch: int) -> tuple[CallReport, float]:
        """The epoch's calls of steps, from its start or from the mid-epoch rollback point it was rolled back to."""
        tic = time.perf_counter()
        start_step, figures = 0, CallReport()
        if self.rollback.epoch == epoch and self.rollback.step > 0:
            start_step, figures = self.rollback.step, self.rollback.figures.copy()
        self.position = (epoch, start_step)
        self.workers.prepare_epoch(epoch)
        every = self.config.train.checkpoint_every_steps
        replay = replay_of(self.state.rollbacks, epoch)    # 0 unless a health rollback replays this epoch
        for first, count in self.calls(start_step):
            self.position = (epoch, first + count)         # a call lost midway is counted as redone whole
            report = self.workers.run_steps(epoch, first, count, replay)
            check_interrupted()                             # a Ctrl-C that Python dropped is not lost
            self.check_finite(report)
            figures.merge(report)
            self.console.progress(epoch, self.config.train.epochs, first + count, self.steps)
            if every is not None and (first + count) % every == 0 and first + count < self.steps:
                self.mark_rollback(epoch, first + count, self.workers.get_state(), figures)   # in memory
        seconds = time.perf_counter() - tic
        self.state.train_s += seconds
        self.state.samples += (self.steps - start_step) * self.config.train.batch_size
        return figures, seconds

    def mirror(self) -> None:
        if self.config.train.storage:
            mirror(self.run_dir, self.config.train.storage)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save(self, epochs_completed: int, worker_state: dict) -> Path:
        """The checkpoint after ``epochs_completed`` epochs, with the loop state; pruned to train.keep_checkpoints
        except the health watch's possible rollback targets."""
        return self.save_state(epochs_completed, worker_state, self.state.to_dict())

    def save_state(self, epochs_completed: int, worker_state: dict, loop: dict) -> Path:
        keep_from = None
        if self.health.rolls_back:
            keep_from = self.health.keep_from(self.state, [*self.checkpoint_epochs(), epochs_completed])
        return save_checkpoint(self.run_dir, epochs_completed, {**worker_state, "loop": loop},
                               self.config.train.keep_checkpoints, keep_from)

    def save_start(self) -> None:
        """With health rollbacks, the run's starting point is on disk too (epoch_0000 for a new run), so that an
        unhealthy stretch from the first epoch on has a checkpoint to roll back to, after a resume as well."""
        if self.health.rolls_back and self.state.epochs_completed not in self.checkpoint_epochs():
            self.save(self.state.epochs_completed, self.rollback.workers)

    def checkpoint_epochs(self) -> list[int]:
        return [checkpoint_epoch(path) for path in list_checkpoints(self.run_dir)]

    # ---- elastic peers ------------------------------------------------------------------------------------------
    def carry_out_requests(self, epochs_completed: int, worker_state: dict | None) -> None:
        """The control requests written since the last epoch boundary (``raydistill peers add|remove``), oldest
        first: each is checked and refused in one line, or joins the new peer set; the new set then replaces the
        workers at once (``change_peers``) and is on trial until it has trained an epoch (``confirm_change``, or
        ``undo_change`` if it fails): only then are the requests answered and a checkpoint written with it."""
        config, accepted = self.config, []
        for path in control.pending(self.run_dir):
            claimed = control.take(path)
            if claimed is None:                                # withdrawn meanwhile
                continue
            taken, request = claimed
            try:
                if request is None:
                    raise ConfigError("request", path.name, "is not a JSON object")
                if self.rebuild is None:
                    raise ConfigError("peers", self.config.num_peers, "this run's peers cannot change while it runs "
                                      "(a Tune trial's)")
                changed = control.requested_config(config, request, self.state.to_dict())
                check_trainable(changed, self.spec, self.arrays, set(changed.peer_names) - set(config.peer_names))
            except Exception as err:  # noqa: BLE001 — a request never ends the run: any fault is refused
                message = f"refused: {err if isinstance(err, ConfigError) else one_line(err)}"
                self.console.line(f"peers: {message}")
                control.answer(taken, "refused", message, request)
                continue
            config = changed
            accepted.append((taken, request))
        if not accepted:
            return
        try:
            self.change_peers(config, epochs_completed, worker_state, accepted)
        except WorkerLost as lost:
            changed = self.config.peer_names == config.peer_names
            for taken, request in accepted:
                control.answer(taken, "done" if changed else "refused",
                               f"{'changed the peers' if changed else 'refused'}: a worker was lost ({lost}); "
                               f"the run recovers{'' if changed else ', ask again'}", request)
            self.trial = None
            raise
        except Exception as err:  # noqa: BLE001 — refused, the old peer set goes on (change_peers restored it)
            message = f"refused: {err if isinstance(err, ConfigError) else one_line(err)}"
            self.console.line(f"peers: {message}")
            for taken, request in accepted:
                control.answer(taken, "refused", message, request)

    def refuse_requests(self, reason: str) -> None:
        for path in control.pending(self.run_dir):
            claimed = control.take(path)
            if claimed is not None:
                control.answer(claimed[0], "refused", f"refused: {reason}", claimed[1])

    def change_peers(self, config, epochs_completed: int, worker_state: dict | None, requests: list) -> None:
        """Carries the run over to the peer set of ``config`` after ``epochs_completed`` epochs, as a resume with
        that set would (``elastic.change_peers`` on the same state): the workers (and their placement group) are
        torn down and started again for the new set and the new state loaded. The change is then on trial: nothing
        on disk holds it until the new set has trained an epoch (``confirm_change``)."""
        state = {**(worker_state or self.workers.get_state()), "loop": self.state.to_dict()}
        new_state, retired, events = elastic.change_peers(self.config, config, state, self.spec, self.arrays)
        self.workers.check_room(config)                # a set the cluster cannot hold: refused, nothing stopped
        before = PeerChange(self.config, {"peers": state["peers"], "coordinator": state["coordinator"]},
                            copy.deepcopy(self.state), requests)
        self.workers.shutdown()
        try:
            self.workers = self.rebuild(config)
        except Exception:                              # e.g. no room for the new set: the old one goes on
            self.workers = self.rebuild(self.config)
            self.workers.set_state(before.workers)
            raise
        workers_state = {"peers": new_state["peers"], "coordinator": new_state["coordinator"]}
        self.set_peer_config(elastic.consumed(config))
        self.state = LoopState.from_dict(new_state["loop"], self.observe)
        self.mark_rollback(epochs_completed, 0, workers_state, CallReport())   # a worker lost from here: this point
        self.workers.set_state(workers_state)
        done = "; ".join(f"added {e['peer']} ({e['arch']}, init {e['init']})" if e["action"] == "add"
                         else f"removed {e['peer']}" for e in events)
        before.message = (f"{done} after epoch {epochs_completed}; peers now {', '.join(self.config.peer_names)} "
                          f"({self.workers.describe()})")
        before.retired, before.epoch, before.new_workers = retired, epochs_completed, workers_state
        before.new_loop = self.state.to_dict()
        self.trial = before
        self.console.line(f"peers: {before.message}")

    def set_peer_config(self, config) -> None:
        self.config = config
        self.method = build_method(config)
        self.reports = Reports(config, self.method, self.spec, self.reports.has_val)

    def confirm_change(self) -> None:
        """The new peer set has trained an epoch: the change is kept. The checkpoint of the epoch it was made after
        is written again with the new set (a resume goes on from it), with its config.yaml; the requests are
        answered."""
        trial, self.trial = self.trial, None
        elastic.save_retired(self.run_dir, trial.retired)
        dump_config(self.config, self.run_dir / "config.yaml")
        self.save_state(trial.epoch, trial.new_workers, trial.new_loop)
        for taken, request in trial.requests:
            control.answer(taken, "done", trial.message, request)

    def undo_change(self, reason: str) -> int:
        """The new peer set failed in its first epoch: the workers of the set before the change are started again
        from its state, the records of the failed epoch dropped, and the requests refused. Returns the epoch to
        continue from (the one the change was made before)."""
        trial, self.trial = self.trial, None
        self.workers.shutdown()
        self.workers = self.rebuild(trial.config)
        self.set_peer_config(trial.config)
        if self.state.epochs_completed > trial.epoch:
            self.recorder.rewind(trial.epoch)
        restarts, steps_redone = self.state.restarts, self.state.steps_redone
        self.state = trial.loop
        self.state.restarts, self.state.steps_redone = restarts, steps_redone
        self.workers.set_state(trial.workers)
        self.mark_rollback(trial.epoch, 0, trial.workers, CallReport())
        message = (f"refused: the new peer set failed in its first epoch ({reason}); the run goes on with peers "
                   f"{', '.join(self.config.peer_names)}")
        self.console.line(f"peers: {message}")
        for taken, request in trial.requests:
            control.answer(taken, "refused", message, request)
        return trial.epoch

    # ---- failures ----------------------------------------------------------------------------------------------
    def mark_rollback(self, epoch: int, step: int, worker_state: dict, figures: CallReport) -> None:
        self.rollback = RollbackPoint(epoch, step, worker_state, figures.copy(), copy.deepcopy(self.state))

    def start(self, resume_state: dict | None) -> dict:
        """The workers at the run's starting point (the resumed state loaded, or their initial state fetched), as the
        first rollback point's state. A worker lost on the way is restarted (it is built again as it was) and the
        start done again."""
        self.position = (self.state.epochs_completed, 0)
        while True:
            try:
                if resume_state is not None:
                    self.workers.set_state(resume_state)
                    return resume_state
                return self.workers.get_state()
            except WorkerLost as lost:
                self.restart(lost)

    def restart(self, lost: WorkerLost) -> None:
        """Waits for Ray to restart a lost worker (on this node or a replacement) and forms the group again; a worker
        lost again meanwhile is waited for too. The budget is Ray's: each worker (and the object-store coordinator)
        may be restarted ``resources.max_restarts`` times; once Ray gives one up, the run stops at once."""
        wait = self.config.resources.node_wait_s
        while True:
            self.state.restarts += 1
            self.console.line(f"lost a worker at epoch {self.position[0] + 1} step {self.position[1]} ({lost}); "
                              f"waiting up to {wait:.0f}s for it to come back")
            try:
                self.workers.recover(wait)
                return
            except WorkerGivenUp as err:
                raise TrainingError(f"lost a worker: {err}; the run stopped: {self.kept()}") from None
            except TimeoutError as err:
                raise TrainingError(f"{err}; add capacity, then: {self.kept()}") from None
            except WorkerLost as again:
                lost = again

    def recover(self, lost: WorkerLost) -> int:
        """A worker died: restart it (``restart``), roll every worker and the coordinator back to the last common
        rollback point, and go on. Returns the epoch to continue."""
        point = self.rollback
        while True:
            self.restart(lost)
            try:
                self.workers.set_state(point.workers)
                break
            except WorkerLost as again:
                lost = again
        restarts = self.state.restarts
        redone = max((self.position[0] - point.epoch) * self.steps + self.position[1] - point.step, 0)
        steps_redone = self.state.steps_redone + redone
        if self.state.epochs_completed > point.epoch:    # epochs recorded since the rollback point run again
            self.recorder.rewind(point.epoch)
        self.state = copy.deepcopy(point.loop)
        self.state.restarts, self.state.steps_redone = restarts, steps_redone
        point.loop.restarts, point.loop.steps_redone = restarts, steps_redone
        self.position = (point.epoch, point.step)
        self.console.line(f"rolled back to epoch {point.epoch + 1} step {point.step} ({redone} steps to redo); "
                          f"restarts so far: {restarts}")
        return point.epoch

    def kept(self) -> str:
        """What the run directory keeps, and the command that goes on from it."""
        checkpoint = latest_checkpoint(self.run_dir)
        where = (f"from its checkpoint {checkpoint.name}" if checkpoint is not None
                 else "from the beginning (no checkpoint yet)")
        return f"`raydistill train --resume {self.run_dir}` goes on {where}"

    # ---- the health watch's decisions --------------------------------------------------------------------------
    def check_finite(self, report: CallReport) -> None:
        if report.nonfinite:
            raise Unhealthy(self.health.after_nonfinite(report.nonfinite, self.state, self.checkpoint_epochs()))

    def carry_out(self, decision: Decision) -> int:
        """Rolls back (returns the epoch to continue from) or stops (raises TrainingError)."""
        if decision.action is Action.ROLLBACK:
            return self.roll_back(decision)
        raise self.stop(decision) from None

    def stop(self, decision: Decision) -> TrainingError:
        """The error that ends the run, naming the rule that fired and the command that goes on; with train.health,
        summary.json says so too (its rollbacks among the rest)."""
        if self.config.train.health is None:            # the stop a non-finite loss has always been
            return TrainingError(f"{decision.reason}; the run stopped. Lower train.lr or method.temperature: "
                                 f"{self.kept()}, e.g. with --set train.lr=...")
        summary = self.reports.summary(self.state, self.runtime, self.workers.transport_name, self.workers.nodes())
        summary["stopped"] = {"rule": decision.rule, "reason": decision.reason, "epoch": decision.epoch}
        self.recorder.write_summary(summary)          # also when no epoch has ended yet
        return TrainingError(f"train.health ({decision.rule}): {decision.reason}; the run stopped: {self.kept()}")

    def roll_back(self, decision: Decision) -> int:
        """Rolls every worker back to the health watch's target checkpoint and replays from there in a new data order
        (the rollback joins the loop state, so ``replay_of`` gives the replayed epochs their next replay number).
        The records of the abandoned epochs are rewound, its checkpoints removed, and the target written again with
        the new loop state, so a resumed run replays the same way. Returns the epoch to continue from."""
        point = self.health_point(decision.back_to)
        rollbacks = [*self.state.rollbacks, decision.event()]
        self.position = (point.epoch, 0)
        while True:
            try:
                self.workers.set_state(point.workers)
                break
            except WorkerLost as lost:
                self.restart(lost)
        if self.state.epochs_completed > point.epoch:
            self.recorder.rewind(point.epoch)
        restarts, steps_redone = self.state.restarts, self.state.steps_redone
        self.state = copy.deepcopy(point.loop)
        self.state.restarts, self.state.steps_redone, self.state.rollbacks = restarts, steps_redone, rollbacks
        discard_after(self.run_dir, point.epoch)
        self.save(point.epoch, point.workers)
        self.mark_rollback(point.epoch, 0, point.workers, CallReport())
        self.mirror()
        limit = self.config.train.health.max_rollbacks
        where = "the run's start" if point.epoch == 0 else f"the end of epoch {point.epoch}"
        self.console.line(f"train.health ({decision.rule}): {decision.reason}; rolled back to checkpoint "
                          f"epoch_{point.epoch:04d} ({where}), replaying from epoch {point.epoch + 1} in a new data "
                          f"order (rollback {len(rollbacks)} of at most {limit})")
        return point.epoch

    def health_point(self, epoch: int) -> RollbackPoint:
        """The rollback point of an epoch checkpoint: the one in memory when it is that one, else read from disk."""
        if (self.rollback.epoch, self.rollback.step) == (epoch, 0):
            return self.rollback
        state = load_checkpoint(checkpoint_path(self.run_dir, epoch), self.config.num_peers)
        if state["loop"].get("peers", self.config.peer_names) != self.config.peer_names:
            raise TrainingError(f"train.health: the rollback target epoch_{epoch:04d} holds another peer set "
                                f"({', '.join(state['loop']['peers'])}); the run stopped: {self.kept()}")
        return RollbackPoint(epoch, 0, {"peers": state["peers"], "coordinator": state["coordinator"]},
                             loop=LoopState.from_dict(state["loop"], self.observe))
