"""The health watch (``train.health``): a policy that reads a run's epochs and its non-finite losses and returns a
decision the loop carries out: continue, roll back to the last good checkpoint, or stop. Ray Train's failure-policy
shape: the policy decides, the controller (``loop.Run``) acts. No Ray and no I/O: it sees the loop state and which
epoch checkpoints exist, so every runtime, and a resumed run, takes the same decisions.

Rules:
- ``max_consistency``: the peers' consistency on the validation split (mean pairwise KL between the peers' predictions,
  the figure every epoch records) above the bound for ``patience`` epochs in a row. Only the validation figure counts:
  without a validation split the config refuses the rule, and the test split never decides anything;
- a non-finite loss. Without ``train.health`` it stops the run, as it always has.
The rollback target is the newest epoch checkpoint written before the unhealthy stretch began (never one before the
previous rollback's target, so every target is still on disk: the loop keeps checkpoints from the target on out of
``keep_checkpoints``' pruning). An epoch replayed after a rollback draws its batches and views from
(seed, epoch, replay), replay = how many times the run has rolled back over that epoch (``replay_of``).
"""
from __future__ import annotations

import math

from raydistill.errors import ConfigError
from raydistill.policies.decisions import CONTINUE, Action, Decision

ACTIONS = ("rollback", "stop")


def check_config(config) -> None:
    """The rules of ``train.health`` (the config calls it): its ranges, and what the consistency rule needs."""
    h = config.train.health
    if h.action not in ACTIONS:
        raise ConfigError("train.health.action", h.action, f"one of: {', '.join(ACTIONS)}")
    if h.patience < 1:
        raise ConfigError("train.health.patience", h.patience, "must be >= 1 (epochs in a row)")
    if h.max_rollbacks < 0:
        raise ConfigError("train.health.max_rollbacks", h.max_rollbacks, "must be >= 0 (0: stop at the first)")
    if h.max_consistency is None:
        return
    if not (math.isfinite(h.max_consistency) and h.max_consistency > 0):
        raise ConfigError("train.health.max_consistency", h.max_consistency, "must be a finite number > 0, or null")
    if config.task != "classification" or config.num_peers < 2:
        raise ConfigError("train.health.max_consistency", h.max_consistency,
                          "needs 2 or more peers of a classification task (consistency is their mean pairwise KL)")
    if config.data.val_fraction == 0:
        raise ConfigError("train.health.max_consistency", h.max_consistency,
                          "needs a validation split (data.val_fraction > 0): the test split never decides a rollback")


def replay_of(rollbacks: list[dict], epoch: int) -> int:
    """How many times the run rolled back over ``epoch`` (from 0): 0 on a first attempt. A rollback fired at epoch F
    (from 1) back to B epochs completed replays epochs B..F-1 (from 0); each attempt of an epoch gets a new number."""
    return sum(1 for r in rollbacks if r["back_to"] <= epoch < r["epoch"])


class HealthWatch:
    def __init__(self, health):
        """health: the resolved ``train.health`` (a HealthConfig), or None (off)."""
        self.health = health

    @property
    def rolls_back(self) -> bool:
        return self.health is not None and self.health.action == "rollback"

    # ---- what the rules read -----------------------------------------------------------------------------------
    def unhealthy(self, record: dict) -> bool:
        """An epoch whose validation consistency is above the bound (a non-finite figure counts as above)."""
        bound = self.health.max_consistency if self.health is not None else None
        if bound is None:
            return False
        value = (record["val"] or {}).get("consistency", math.nan)
        return not value <= bound

    def streak(self, streak: int, record: dict) -> int:
        """The number of unhealthy epochs in a row once ``record`` (the newest epoch) joins a run that ended with
        ``streak`` of them."""
        return streak + 1 if self.unhealthy(record) else 0

    def target(self, state, checkpoints: list[int]) -> int | None:
        """The rollback target among the epoch checkpoints on disk: the newest written before the unhealthy stretch
        at the end of the history began, and not before the previous rollback's target. None: none is kept."""
        floor = state.rollbacks[-1]["back_to"] if state.rollbacks else 0
        start = max(state.epochs_completed - state.streak, floor)
        good = [k for k in checkpoints if k <= start]
        return max(good) if good else None

    def keep_from(self, state, checkpoints: list[int]) -> int | None:
        """The oldest checkpoint a later rollback may need (the loop keeps it and every newer one from pruning)."""
        return self.target(state, checkpoints) if self.rolls_back else None

    # ---- decisions ---------------------------------------------------------------------------------------------
    def after_epoch(self, state, checkpoints: list[int]) -> Decision:
        """After an epoch is recorded (its record is ``state.last``, ``state.streak`` counts it)."""
        if self.health is None or self.health.max_consistency is None:
            return CONTINUE
        streak = state.streak
        if streak < self.health.patience:
            return CONTINUE
        record = state.last
        last, first = record["epoch"] + 1, record["epoch"] + 2 - streak
        epochs = f"epoch {last}" if streak == 1 else f"epochs {first}-{last}"
        reason = (f"validation consistency {record['val'].get('consistency', math.nan):.4g} above "
                  f"train.health.max_consistency={self.health.max_consistency:g} for {streak} epoch(s) in a row "
                  f"({epochs})")
        return self.decide("max_consistency", reason, last, state, checkpoints)

    def after_nonfinite(self, nonfinite: list[tuple], state, checkpoints: list[int]) -> Decision:
        """After a call of steps reported non-finite losses: (epoch, step, peer index) in step order."""
        epoch, step, _ = nonfinite[0]
        peers = sorted({peer for e, s, peer in nonfinite if (e, s) == (epoch, step)})
        reason = f"non-finite loss at epoch {epoch + 1} step {step} on peer(s) {peers}"
        if self.health is None:
            return Decision(Action.STOP, "non_finite", reason, epoch + 1)
        return self.decide("non_finite", reason, epoch + 1, state, checkpoints)

    def decide(self, rule: str, reason: str, epoch: int, state, checkpoints: list[int]) -> Decision:
        """A rule fired: roll back (while rollbacks are left and a target is kept) or stop."""
        if self.health.action == "stop":
            return Decision(Action.STOP, rule, f"{reason} (train.health.action: stop)", epoch)
        done = len(state.rollbacks)
        if done >= self.health.max_rollbacks:
            return Decision(Action.STOP, rule, f"{reason}, after {done} rollback(s) "
                            f"(train.health.max_rollbacks={self.health.max_rollbacks})", epoch)
        back_to = self.target(state, checkpoints)
        if back_to is None:
            return Decision(Action.STOP, rule, f"{reason}, and no checkpoint from before it is kept to roll back to",
                            epoch)
        return Decision(Action.ROLLBACK, rule, reason, epoch, back_to)
