"""What a policy returns and the loop carries out: Ray Train's failure-policy shape (the policy decides, the
controller acts). The policies of this package return these; runtime/loop.py's ``Run.carry_out`` acts on each."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    CONTINUE = "continue"
    RESTART = "restart"            # a lost worker: wait for Ray to restart it, then back to the last rollback point
    ROLLBACK = "rollback"          # the health watch: back to an epoch checkpoint, replayed in a new data order
    UNDO = "undo"                  # a new peer set failed on trial: back to the set before the change
    STOP = "stop"                  # the run cannot go on: one line, and the command that resumes it


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str = ""                  # the rule that fired, e.g. "max_consistency", "non_finite", "lost_worker"
    reason: str = ""                # what was seen, in one line
    epoch: int = 0                  # the epoch it fired at (from 1, as the console counts)
    back_to: int | None = None      # a rollback's target: the epochs completed at that checkpoint

    def event(self) -> dict:
        """A rollback as the loop state, the checkpoint and summary.json keep it."""
        return {"epoch": self.epoch, "rule": self.rule, "reason": self.reason, "back_to": self.back_to}


CONTINUE = Decision(Action.CONTINUE)
