"""The failures a run's policies decide on, and the error that ends a run."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a lost actor past its restarts); the message says what to do."""


class WorkerLost(RuntimeError):
    """A worker or the coordinator died (its process or its node), or the group broke; the runtime recovers."""


class WorkerGivenUp(RuntimeError):
    """Ray will not restart a lost worker: it has been restarted resources.max_restarts times already."""


class Unhealthy(Exception):
    """A call of steps ended unhealthy (a non-finite loss): the epoch stops, and the loop carries out the decision."""

    def __init__(self, decision):
        super().__init__(decision.reason)
        self.decision = decision
