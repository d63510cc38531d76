"""The trial of a changed peer set: a new set that fails in its first epoch is undone."""
from __future__ import annotations

from raydistill.errors import one_line
from raydistill.policies.decisions import Action, Decision
from raydistill.policies.failures import Unhealthy


class PeerChangeTrialPolicy:
    """A peer set changed while the run trains (``raydistill peers add|remove``) is on trial for one epoch: anything
    that goes wrong in it but a lost worker (an error raised in a worker, a non-finite loss, an unhealthy epoch) undoes
    the change; a lost worker is recovered as any other."""

    def decide(self, failure: BaseException | Decision) -> Decision:
        if isinstance(failure, Decision):                    # the health watch's verdict on the trial epoch
            reason = failure.reason
        elif isinstance(failure, Unhealthy):
            reason = failure.decision.reason
        else:
            reason = one_line(failure)
        return Decision(Action.UNDO, "peer_change", reason)
