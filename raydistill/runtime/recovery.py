"""Getting a run back to a point it was at: after a lost worker (the lost-worker policy: restart while Ray will),
after the health watch's rollback, after a peer-set change or its undoing. One way back: ``Recovery.restore``.

A rollback point is where a lost worker takes the run back to: the last epoch checkpoint (kept in memory too), or a
``train.checkpoint_every_steps`` point within an epoch. No Ray: the workers object (Ray actors or this process's
engine) does the restarting.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from raydistill.engine.checkpoint import LOOP, checkpoint_path, discard_after, load_checkpoint, members
from raydistill.engine.elastic import names_of
from raydistill.engine.worker import CallReport
from raydistill.policies.decisions import Action, Decision
from raydistill.policies.failures import TrainingError, WorkerGivenUp, WorkerLost
from raydistill.policies.lost_worker import LostWorkerPolicy
from raydistill.runtime.reports import LoopState


@dataclass
class RollbackPoint:
    epoch: int
    step: int
    workers: dict                                        # the workers' state (get_state)
    figures: CallReport = field(default_factory=CallReport)   # the epoch's figures up to `step`
    loop: LoopState = field(default_factory=LoopState)


class Recovery:
    """The run's rollback point and the ways back to it; ``run`` is the loop (loop.Run) whose workers, state and
    records it restores."""

    def __init__(self, run):
        self.run = run
        self.policy = LostWorkerPolicy()
        self.point: RollbackPoint | None = None

    def mark(self, epoch: int, step: int, worker_state: dict, figures: CallReport | None = None) -> None:
        """The run's new rollback point (its loop state as it is now)."""
        self.point = RollbackPoint(epoch, step, worker_state, (figures or CallReport()).copy(),
                                   copy.deepcopy(self.run.state))

    def restore(self, point: RollbackPoint, rollbacks: list | None = None) -> None:
        """The one way back: every worker gets the point's state (a worker lost meanwhile is restarted and asked
        again), the records after it are rewound, the loop state is the point's (the run's restart counts and, for a
        health rollback, its rollbacks carried over), and the point is the run's rollback point."""
        run = self.run
        run.position = (point.epoch, point.step)
        while True:
            try:
                run.workers.set_state(point.workers)
                break
            except WorkerLost as lost:
                self.restart(lost)
        if run.state.epochs_completed > point.epoch:      # epochs recorded since the point run again
            run.recorder.rewind(point.epoch)
        restarts, steps_redone = run.state.restarts, run.state.steps_redone
        rollbacks = run.state.rollbacks if rollbacks is None else rollbacks
        run.state = copy.deepcopy(point.loop)
        run.state.restarts, run.state.steps_redone, run.state.rollbacks = restarts, steps_redone, rollbacks
        point.loop = copy.deepcopy(run.state)
        self.point = point

    def restart(self, failure: BaseException) -> None:
        """Carries out the lost-worker policy until the workers answer again: restart (Ray restarts the worker, the
        driver waits and forms the group again; a worker lost again meanwhile is waited for too) or stop."""
        run = self.run
        wait = run.config.resources.node_wait_s
        while True:
            decision = self.policy.decide(failure)
            if decision.action is Action.STOP:
                raise TrainingError(f"{decision.reason}: {run.kept()}") from None
            run.state.restarts += 1
            run.console.line(f"lost a worker at epoch {run.position[0] + 1} step {run.position[1]} ({failure}); "
                             f"waiting up to {wait:.0f}s for it to come back")
            try:
                run.workers.recover(wait)
                return
            except (WorkerGivenUp, TimeoutError, WorkerLost) as again:
                failure = again

    def recover(self, lost: WorkerLost) -> int:
        """A worker died: restart it and roll every worker back to the last rollback point. Returns the epoch to
        continue from."""
        run, point = self.run, self.point
        self.restart(lost)
        redone = max((run.position[0] - point.epoch) * run.steps + run.position[1] - point.step, 0)
        run.state.steps_redone += redone
        self.restore(point)
        run.console.line(f"rolled back to epoch {point.epoch + 1} step {point.step} ({redone} steps to redo); "
                         f"restarts so far: {run.state.restarts}")
        return point.epoch

    def roll_back(self, decision: Decision) -> int:
        """The health watch's rollback: every worker back to the target checkpoint, replayed from there in a new
        data order (the rollback joins the loop state, so ``replay_of`` gives the replayed epochs their next replay
        number). The abandoned attempt's checkpoints are removed and the target written again with the new loop
        state, so a resumed run replays the same way. Returns the epoch to continue from."""
        run = self.run
        point = self.health_point(decision.back_to)
        self.restore(point, rollbacks=[*run.state.rollbacks, decision.event()])
        discard_after(run.run_dir, point.epoch)
        run.save(point.epoch, point.workers)
        run.mirror()
        limit = run.config.train.health.max_rollbacks
        where = "the run's start" if point.epoch == 0 else f"the end of epoch {point.epoch}"
        run.console.line(f"train.health ({decision.rule}): {decision.reason}; rolled back to checkpoint "
                         f"epoch_{point.epoch:04d} ({where}), replaying from epoch {point.epoch + 1} in a new data "
                         f"order (rollback {len(run.state.rollbacks)} of at most {limit})")
        return point.epoch

    def health_point(self, epoch: int) -> RollbackPoint:
        """The rollback point of an epoch checkpoint: the one in memory when it is that one, else read from disk."""
        run = self.run
        if (self.point.epoch, self.point.step) == (epoch, 0):
            return self.point
        state = load_checkpoint(checkpoint_path(run.run_dir, epoch), run.config.num_peers)
        if names_of(state) != run.config.peer_names:
            raise TrainingError(f"train.health: the rollback target epoch_{epoch:04d} holds another peer set "
                                f"({', '.join(names_of(state))}); the run stopped: {run.kept()}")
        return RollbackPoint(epoch, 0, members(state), loop=LoopState.from_dict(state[LOOP], run.observe))
