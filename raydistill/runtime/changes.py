"""Elastic peers on a running run: the requests of ``raydistill peers add|remove`` (RUN/control/) carried out on an
epoch boundary. A decision, then its execution: each request is checked and refused in one line, or joins the new
peer set (``decide``); the new set then replaces the workers (``change``) and is on trial until it has trained an
epoch: kept (``confirm``) or undone (``undo``). Only a kept change reaches
the disk, so no checkpoint ever holds a peer set that has not trained (policies/peer_change.py decides). No Ray.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from raydistill.config import dump_config
from raydistill.engine import elastic
from raydistill.engine.checkpoint import LOOP, members
from raydistill.engine.peer import check_trainable
from raydistill.errors import ConfigError, one_line
from raydistill.runtime import control
from raydistill.policies.decisions import Decision
from raydistill.policies.failures import WorkerLost
from raydistill.policies.peer_change import PeerChangeTrialPolicy
from raydistill.runtime.recovery import RollbackPoint
from raydistill.runtime.reports import LoopState


@dataclass
class PeerChange:
    """A change of the peer set: the config it asks for and the requests that asked (the decision); once made, what
    it replaced (the config, the workers' and the loop's state at the boundary) and what it made."""
    config: object
    requests: list                                       # (taken request path, request)
    epoch: int = 0                                       # the epochs completed at the boundary
    before: RollbackPoint | None = None                  # the old set at the boundary
    before_config: object = None
    after: RollbackPoint | None = None                   # the new set at the boundary
    retired: dict = field(default_factory=dict)          # the departing peers' deployable models
    message: str = ""


class PeerChanges:
    """The peer-set changes of ``run`` (loop.Run): its workers, config and state are what they change."""

    def __init__(self, run):
        self.run = run
        self.policy = PeerChangeTrialPolicy()
        self.trial: PeerChange | None = None

    # ---- the decision -----------------------------------------------------------------------------------------------
    def decide(self) -> PeerChange | None:
        """The pending requests, oldest first: each checked (and refused in one line, answered at once) or taken
        into the new peer set. None when no request was accepted."""
        run = self.run
        config, accepted = run.config, []
        for path in control.pending(run.run_dir):
            claimed = control.take(path)
            if claimed is None:                                # withdrawn meanwhile
                continue
            taken, request = claimed
            try:
                if request is None:
                    raise ConfigError("request", path.name, "is not a JSON object")
                if run.rebuild is None:
                    raise ConfigError("peers", run.config.num_peers, "this run's peers cannot change while it runs "
                                      "(a Tune trial's)")
                changed = control.requested_config(config, request, run.state.to_dict())
                check_trainable(changed, run.spec, run.arrays, set(changed.peer_names) - set(config.peer_names))
            except Exception as err:  # noqa: BLE001 — a request never ends the run: any fault is refused
                self.answer([(taken, request)], "refused", f"refused: {_said(err)}")
                continue
            config = changed
            accepted.append((taken, request))
        return PeerChange(config, accepted) if accepted else None

    # ---- its execution ----------------------------------------------------------------------------------------------
    def carry_out_requests(self, epochs_completed: int, worker_state: dict | None) -> None:
        change = self.decide()
        if change is None:
            return
        try:
            self.change(change, epochs_completed, worker_state)
        except WorkerLost as lost:
            made = self.run.config.peer_names == change.config.peer_names
            self.answer(change.requests, "done" if made else "refused",
                        f"{'changed the peers' if made else 'refused'}: a worker was lost ({lost}); the run "
                        f"recovers{'' if made else ', ask again'}")
            self.trial = None
            raise
        except Exception as err:  # noqa: BLE001 — refused, the old peer set goes on (change restored it)
            self.answer(change.requests, "refused", f"refused: {_said(err)}")

    def change(self, change: PeerChange, epochs_completed: int, worker_state: dict | None) -> None:
        """Carries the run over to the new peer set as a resume with that set would (``elastic.change_peers`` on the
        same state): the workers (and their placement group) are torn down and started again for the new set, and
        the new state loaded. The change is then on trial."""
        run = self.run
        state = {**(worker_state or run.workers.get_state()), LOOP: run.state.to_dict()}
        new_state, change.retired, events = elastic.change_peers(run.config, change.config, state, run.spec,
                                                                 run.arrays)
        run.workers.check_room(change.config)          # a set the cluster cannot hold: refused, nothing stopped
        change.epoch, change.before_config = epochs_completed, run.config
        change.before = RollbackPoint(epochs_completed, 0, members(state), loop=copy.deepcopy(run.state))
        run.workers.shutdown()
        try:
            run.workers = run.rebuild(change.config)
        except Exception:                              # e.g. no room for the new set: the old one goes on
            run.workers = run.rebuild(run.config)
            run.workers.set_state(change.before.workers)
            raise
        run.set_peer_config(elastic.consumed(change.config))
        change.after = RollbackPoint(epochs_completed, 0, members(new_state),
                                     loop=LoopState.from_dict(new_state[LOOP], run.observe))
        run.recovery.restore(change.after)             # a worker lost from here: this point
        done = "; ".join(f"added {e['peer']} ({e['arch']}, init {e['init']})" if e["action"] == "add"
                         else f"removed {e['peer']}" for e in events)
        change.message = (f"{done} after epoch {epochs_completed}; peers now {', '.join(run.config.peer_names)} "
                          f"({run.workers.describe()})")
        self.trial = change
        run.console.line(f"peers: {change.message}")

    def confirm(self) -> None:
        """The new peer set has trained an epoch: the change is kept. The checkpoint of the boundary is written again
        with the new set (a resume goes on from it), with its config.yaml; the requests are answered."""
        run, change, self.trial = self.run, self.trial, None
        elastic.save_retired(run.run_dir, change.retired)
        dump_config(run.config, run.run_dir / "config.yaml")
        run.save_state(change.epoch, change.after.workers, change.after.loop.to_dict())
        self.answer(change.requests, "done", change.message, echo=False)

    def undo(self, decision: Decision) -> int:
        """The workers of the set before the change started again from its state at the boundary, the failed
        epoch's records dropped, the requests refused. Returns the epoch to continue from (the boundary's)."""
        run, change, self.trial = self.run, self.trial, None
        run.workers.shutdown()
        run.workers = run.rebuild(change.before_config)
        run.set_peer_config(change.before_config)
        run.recovery.restore(change.before)
        self.answer(change.requests, "refused", f"refused: the new peer set failed in its first epoch "
                    f"({decision.reason}); the run goes on with peers {', '.join(run.config.peer_names)}")
        return change.epoch

    def end(self) -> None:
        """The run ends: a change still on trial is refused (the checkpoints hold the peers before it), and so is
        every request still pending."""
        if self.trial is not None:
            self.answer(self.trial.requests, "refused", "refused: the run ended before the new peer set trained "
                        "an epoch; its checkpoints hold the peers before the change", echo=False)
            self.trial = None
        for path in control.pending(self.run.run_dir):
            claimed = control.take(path)
            if claimed is not None:
                control.answer(claimed[0], "refused", "refused: the run has ended", claimed[1])

    def answer(self, requests: list, outcome: str, message: str, echo: bool = True) -> None:
        if echo:
            self.run.console.line(f"peers: {message}")
        for taken, request in requests:
            control.answer(taken, outcome, message, request)


def _said(err: BaseException) -> str:
    return str(err) if isinstance(err, ConfigError) else one_line(err)
