"""The lost-worker policy: what a worker that died or hangs means for the run."""
from __future__ import annotations

from raydistill.policies.decisions import Action, Decision
from raydistill.policies.failures import WorkerGivenUp


class LostWorkerPolicy:
    """What a lost worker means for the run. Ray restarts a worker (on a replacement node if its node is gone) at
    most ``resources.max_restarts`` times: while it does, restart (wait for it, form the group again, go back to the
    last rollback point); once Ray has given it up, or no node takes it within ``resources.node_wait_s``, stop."""

    def decide(self, failure: BaseException) -> Decision:
        if isinstance(failure, WorkerGivenUp):
            return Decision(Action.STOP, "lost_worker", f"lost a worker: {failure}; the run stopped")
        if isinstance(failure, TimeoutError):
            return Decision(Action.STOP, "node_wait", f"{failure}; add capacity, then")
        return Decision(Action.RESTART, "lost_worker", str(failure))
