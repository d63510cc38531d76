"""The run, top to bottom: epochs of calls of steps, evaluation, records, checkpoints, export. Runtime-agnostic.

The loop talks to a ``workers`` object (Ray actors, or the same engine objects in this process) on call boundaries
only: ``run_steps(epoch, first, count, replay)`` runs a call of steps and returns its figures (a CallReport);
``evaluate``, ``get_state``/``set_state`` and ``export`` happen between calls.

``Run`` keeps the epoch loop (``train``), one epoch's calls (``train_epoch``), checkpoints and the export. It decides
nothing about failures: the policies do (raydistill/policies/), and ``carry_out`` acts on their decisions:
- a lost worker: the lost-worker policy, and the way back to a rollback point (runtime/recovery.py);
- a non-finite loss, an unhealthy epoch: the health watch;
- a peer-set change asked for by ``raydistill peers``, and its trial epoch (runtime/changes.py).
What a run reports is runtime/reports.py's; what it prints, runtime/console.py's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from raydistill.data.views import num_steps
from raydistill.engine import elastic
from raydistill.engine.checkpoint import LOOP, checkpoint_epoch, latest_checkpoint, list_checkpoints, save_checkpoint
from raydistill.engine.recorder import Recorder
from raydistill.engine.storage import mirror
from raydistill.engine.worker import CallReport
from raydistill.files import DiskFull
from raydistill.methods import build_method
from raydistill.runtime import control
from raydistill.runtime.changes import PeerChanges
from raydistill.runtime.console import Console
from raydistill.policies.decisions import Action, Decision
from raydistill.policies.failures import TrainingError, Unhealthy, WorkerGivenUp, WorkerLost
from raydistill.policies.health import HealthWatch, replay_of
from raydistill.runtime.interrupts import check_interrupted
from raydistill.runtime.recovery import Recovery
from raydistill.runtime.reports import LoopState, Reports

__all__ = ["Console", "Run", "RunResult", "TrainingError", "WorkerGivenUp", "WorkerLost"]


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


class Run:
    def __init__(self, config, spec, arrays: dict, workers, run_dir: Path, runtime: str, console: Console,
                 on_epoch=None, rebuild=None):
        """rebuild(config) -> workers: starts the workers of another peer set (elastic peers); None: a run whose
        peer set cannot change while it runs (a Tune trial's), which refuses such requests."""
        self.spec, self.arrays = spec, arrays
        self.rebuild = rebuild
        self.on_epoch = on_epoch
        self.workers = workers
        self.run_dir = Path(run_dir)
        self.runtime = runtime
        self.console = console
        self.steps = num_steps(len(arrays["train_y"]), config.train.batch_size)
        self.has_val = len(arrays["val_y"]) > 0
        self.set_peer_config(config)
        self.health = HealthWatch(config.train.health)
        self.recovery = Recovery(self)
        self.changes = PeerChanges(self)
        self.state = LoopState()
        self.position = (0, 0)                 # (epoch, step) the workers reach with the current call

    def set_peer_config(self, config) -> None:
        """The config of the run's peer set (at the start, and after a change of it)."""
        self.config = config
        self.method = build_method(config)
        self.reports = Reports(config, self.method, self.spec, self.has_val)

    # ---- the epoch loop --------------------------------------------------------------------------------------------
    def train(self, resume_state: dict | None = None, stop_after_epoch: int | None = None) -> RunResult:
        epoch = self.begin(resume_state)
        try:
            try:
                summary = self.epochs(epoch, stop_after_epoch)
            except BaseException:
                self.close(quiet_disk_full=True)       # the error that stopped the run is the one to tell
                raise
            self.close()                               # the last rows and figures written
        except DiskFull as full:
            raise TrainingError(f"{full.strerror}; the run stopped: {self.kept()} once there is room") from None
        self.mirror()
        self.console.line(self.reports.final_table(summary, self.run_dir))
        return RunResult(self.run_dir, summary)

    def epochs(self, epoch: int, stop_after_epoch: int | None) -> dict:
        """The epochs from ``epoch`` on, each checkpointed when due; returns the run's summary."""
        epochs = self.config.train.epochs
        while epoch < epochs:
            last = epoch + 1 == epochs or (stop_after_epoch is not None and epoch + 1 >= stop_after_epoch)
            due = last or (epoch + 1) % self.config.train.checkpoint_every == 0
            try:                                   # every call to the workers of this epoch, nothing recorded yet
                figures, seconds = self.train_epoch(epoch)
                evaluation = {"val": self.workers.evaluate("val") if self.has_val else None,
                              "test": self.workers.evaluate("test")}
                worker_state = self.workers.get_state() if due else None
            except Exception as failure:  # noqa: BLE001 — a policy decides what it means (decide)
                epoch = self.carry_out(self.decide(failure))
                continue
            record = self.record(epoch, figures, evaluation, seconds)
            decision = self.health.after_epoch(self.state, self.checkpoint_epochs())
            if decision.action is not Action.CONTINUE:     # the epoch's checkpoint is not written
                epoch = self.carry_out(self.changes.policy.decide(decision) if self.changes.trial else decision)
                continue
            if self.changes.trial is not None:
                self.changes.confirm()
            checkpoint = None
            if due:
                checkpoint = self.save(epoch + 1, worker_state)
                self.recovery.mark(epoch + 1, 0, worker_state)
                self.mirror()
            if self.on_epoch is not None:
                self.on_epoch(self.reports.epoch_report(record), checkpoint)
            check_interrupted()
            if last:
                break
            try:
                self.changes.carry_out_requests(epoch + 1, worker_state)
            except WorkerLost as lost:                 # the new set's rollback point if the change was made
                epoch = self.carry_out(self.decide(lost))
                continue
            epoch += 1
        return self.finish()

    def begin(self, resume_state: dict | None) -> int:
        """The run's starting point: its loop state (resumed, or new), its records, the workers' state (loaded, or
        fetched) as the first rollback point. Returns the first epoch to train."""
        self.started = time.perf_counter()
        if resume_state is not None:
            self.state = LoopState.from_dict(resume_state[LOOP], self.observe)
        first = self.state.epochs_completed
        self.recorder = Recorder(self.run_dir, resume_epoch=first if resume_state is not None else None)
        self.wall_before = self.state.wall_s
        self.state.peers = self.config.peer_names
        self.recovery.mark(first, 0, self.start(resume_state))
        self.save_start()
        control.mark_running(self.run_dir)
        return first

    def record(self, epoch: int, figures: CallReport, evaluation: dict, seconds: float) -> dict:
        """An epoch's figures as its record: into the loop state, metrics, TensorBoard and the console."""
        train = [figures.peers[i].means() for i in range(self.config.num_peers)]
        samples = self.steps * self.config.train.batch_size
        record = self.reports.epoch_record(epoch, train, evaluation, seconds, samples, self.state.last,
                                           replay_of(self.state.rollbacks, epoch), len(self.state.rollbacks))
        self.observe(self.state, record)
        self.state.epochs_completed = epoch + 1
        self.state.wall_s = self.wall_before + time.perf_counter() - self.started
        self.recorder.log_epoch(epoch + 1, *self.reports.rows_and_scalars(record))
        self.console.line(self.reports.epoch_line(record))
        return record

    def finish(self) -> dict:
        """The summary, and the export when every epoch is done (a worker lost during it is recovered first)."""
        exported = self.export_states() if self.state.epochs_completed == self.config.train.epochs else None
        summary = self.summary()
        if exported is not None:                     # the summary counts a worker lost during the export
            summary["deploy"] = self.reports.deploy(self.state.last)
            removed = [c["peer"] for c in self.state.changes if c["action"] == "remove"]
            exported = {**elastic.load_retired(self.run_dir, removed), **exported}
            self.reports.write_export(self.run_dir, exported, summary["deploy"])
        self.recorder.write_summary(summary)
        return summary

    def close(self, quiet_disk_full: bool = False) -> None:
        """However the run ends: no longer marked running, its requests answered, its records closed."""
        control.clear_running(self.run_dir)
        self.changes.end()
        try:
            self.recorder.close()
        except DiskFull:
            if not quiet_disk_full:                      # else the stop line says it already
                raise

    def summary(self) -> dict:
        return self.reports.summary(self.state, self.runtime, self.workers.transport_name, self.workers.nodes())

    def observe(self, state: LoopState, record: dict) -> None:
        """An epoch's record joins the loop state: the reports' last and best figures, the health watch's streak."""
        self.reports.observe(state, record)
        state.streak = self.health.streak(state.streak, record)

    # ---- decisions --------------------------------------------------------------------------------------------------
    def decide(self, failure: Exception) -> Decision:
        """What a failure during an epoch's calls means, by the policy that owns it: a lost worker (recovery), a
        non-finite loss (the health watch's decision, raised as Unhealthy), anything else during a peer-set
        change's trial epoch (the trial's: undo); anything else is raised as it is."""
        if isinstance(failure, WorkerLost):
            return self.recovery.policy.decide(failure)
        if self.changes.trial is not None:
            return self.changes.policy.decide(failure)
        if isinstance(failure, Unhealthy):
            return failure.decision
        raise failure

    def carry_out(self, decision: Decision) -> int:
        """Acts on a decision; returns the epoch to continue from, or raises TrainingError (stop)."""
        if decision.action is Action.RESTART:
            return self.recovery.recover(WorkerLost(decision.reason))
        if decision.action is Action.ROLLBACK:
            return self.recovery.roll_back(decision)
        if decision.action is Action.UNDO:
            return self.changes.undo(decision)
        raise self.stop(decision) from None

    def stop(self, decision: Decision) -> TrainingError:
        """The error that ends the run, naming the rule that fired and the command that goes on; with train.health,
        summary.json says so too (its rollbacks among the rest), also when no epoch has ended yet."""
        if self.config.train.health is None and decision.rule == "non_finite":   # the stop it has always been
            return TrainingError(f"{decision.reason}; the run stopped. Lower train.lr or method.temperature: "
                                 f"{self.kept()}, e.g. with --set train.lr=...")
        summary = self.summary()
        summary["stopped"] = {"rule": decision.rule, "reason": decision.reason, "epoch": decision.epoch}
        self.recorder.write_summary(summary)
        return TrainingError(f"train.health ({decision.rule}): {decision.reason}; the run stopped: {self.kept()}")

    def check_finite(self, report: CallReport) -> None:
        if report.nonfinite:
            raise Unhealthy(self.health.after_nonfinite(report.nonfinite, self.state, self.checkpoint_epochs()))

    def kept(self) -> str:
        """What the run directory keeps, and the command that goes on from it."""
        checkpoint = latest_checkpoint(self.run_dir)
        where = (f"from its checkpoint {checkpoint.name}" if checkpoint is not None
                 else "from the beginning (no checkpoint yet)")
        return f"`raydistill train --resume {self.run_dir}` goes on {where}"

    # ---- calls of steps ---------------------------------------------------------------------------------------------
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
                self.recovery.restart(lost)

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
        point = self.recovery.point
        if point.epoch == epoch and point.step > 0:
            start_step, figures = point.step, point.figures.copy()
        self.position = (epoch, start_step)
        self.workers.prepare_epoch(epoch)
        every = self.config.train.checkpoint_every_steps
        replay = replay_of(self.state.rollbacks, epoch)    # 0 unless a health rollback replays this epoch
        with self.console.epoch_bar(epoch, self.config.train.epochs, self.steps, start_step,
                                    self.config.train.batch_size) as bar:
            for first, count in self.calls(start_step):
                self.position = (epoch, first + count)     # a call lost midway is counted as redone whole
                report = self.workers.run_steps(epoch, first, count, replay,
                                                on_step=(lambda done, first=first: bar.at(first + done)) if bar.bar
                                                else None)
                check_interrupted()                         # a Ctrl-C that Python dropped is not lost
                self.check_finite(report)
                figures.merge(report)
                bar.at(first + count)
                if every is not None and (first + count) % every == 0 and first + count < self.steps:
                    self.recovery.mark(epoch, first + count, self.workers.get_state(), figures)   # in memory
        seconds = time.perf_counter() - tic
        self.state.train_s += seconds
        self.state.samples += (self.steps - start_step) * self.config.train.batch_size
        return figures, seconds

    def export_states(self) -> dict:
        """The workers' deployable models; a worker lost at this point is recovered and asked again (the weights
        are the last checkpoint's, which the run has just written)."""
        while True:
            try:
                return self.workers.export()
            except WorkerLost as lost:
                self.recovery.recover(lost)

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def save(self, epochs_completed: int, worker_state: dict) -> Path:
        """The checkpoint after ``epochs_completed`` epochs, with the loop state; pruned to train.keep_checkpoints
        except the health watch's possible rollback targets."""
        return self.save_state(epochs_completed, worker_state, self.state.to_dict())

    def save_state(self, epochs_completed: int, worker_state: dict, loop: dict) -> Path:
        keep_from = None
        if self.health.rolls_back:
            keep_from = self.health.keep_from(self.state, [*self.checkpoint_epochs(), epochs_completed])
        return save_checkpoint(self.run_dir, epochs_completed, {**worker_state, LOOP: loop},
                               self.config.train.keep_checkpoints, keep_from)

    def save_start(self) -> None:
        """With health rollbacks, the run's starting point is on disk too (epoch_0000 for a new run), so that an
        unhealthy stretch from the first epoch on has a checkpoint to roll back to, after a resume as well."""
        if self.health.rolls_back and self.state.epochs_completed not in self.checkpoint_epochs():
            self.save(self.state.epochs_completed, self.recovery.point.workers)

    def checkpoint_epochs(self) -> list[int]:
        return [checkpoint_epoch(path) for path in list_checkpoints(self.run_dir)]

    def mirror(self) -> None:
        if self.config.train.storage:
            mirror(self.run_dir, self.config.train.storage)
