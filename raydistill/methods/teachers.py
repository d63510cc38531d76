"""Methods that learn from frozen teachers (kd, fitnet): the target one teacher gives, or several together.

With one teacher the target is that teacher's logits, exactly as they come. With M teachers, the coordinator makes one
target per view from the teachers' logits z_1..z_M on that view (``method.teacher_ensemble``):
- ``mean_logits`` (default): e = (1/M) sum_j z_j; softmax(e/T) is the normalized geometric mean of the teachers'
  softened probabilities (regression: the mean prediction);
- ``mean_probs``: p = (1/M) sum_j softmax(z_j/T), e = T log p, so KD at T toward e is KD toward the arithmetic mean of
  the soft targets (Hinton et al. 2015's ensemble of soft targets; You et al. 2017, "Learning from Multiple Teacher
  Networks"); classification only;
- ``weighted``: p = sum_j w_j softmax(z_j/T), w_j = weight_j / sum_k weight_k (each teacher's ``weight``, normalized to
  sum 1), e = T log p: the weighted arithmetic mean of the soft targets (regression: sum_j w_j z_j).
T is the epoch's temperature (it may follow a schedule). Pure functions over tensors: the coordinator's part.
"""
from __future__ import annotations

import torch

from raydistill.distill.ensembles import mean_logits, mean_probs, weighted_mean, weighted_probs
from raydistill.errors import ConfigError
from raydistill.methods.base import Method, stacked, tensor_of
from raydistill.names import LOGITS

TEACHER_ENSEMBLES = ("mean_logits", "mean_probs", "weighted")


class FromTeachers(Method):
    """A method whose peers learn from frozen teacher members: its targets read the teachers' outputs per view."""
    defaults = {**Method.defaults, "teacher_ensemble": "mean_logits"}
    needs_teacher = True

    @classmethod
    def check_keys(cls, config):
        name, task = config.method.teacher_ensemble, config.task
        if name not in TEACHER_ENSEMBLES:
            raise ConfigError("method.teacher_ensemble", name, f"one of: {', '.join(TEACHER_ENSEMBLES)}")
        if task == "regression" and name == "mean_probs":
            raise ConfigError("method.teacher_ensemble", name, "mean_logits or weighted for task regression (the "
                              "teachers' predictions are averaged; there are no probabilities)")

    def for_peer(self, per_view: torch.Tensor, peer: int) -> torch.Tensor:
        """The entry of a teacher output [V, ...] for the view peer ``peer`` trains on."""
        return tensor_of(per_view)[self.teacher_views().index(self.view_index(peer))]

    def teacher_logits(self, hyper: dict, teachers: list[dict]) -> torch.Tensor:
        """The target logits for every teacher view, [V, B, C]: the one teacher's own, or the teachers' ensemble."""
        if len(teachers) == 1:
            return tensor_of(teachers[0][LOGITS])
        logits = stacked([t[LOGITS] for t in teachers])                          # [M, V, B, C]
        views = [self.ensemble_of_teachers(logits[:, v], hyper["temperature"]) for v in range(logits.shape[1])]
        return torch.stack(views)

    def ensemble_of_teachers(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """One view's target [B, C] from the teachers' logits [M, B, C] (the module's formulas)."""
        name = self.config.teacher_ensemble
        if name == "weighted":
            if self.task == "regression":
                return weighted_mean(logits, self.teacher_weights)
            return weighted_probs(logits, self.teacher_weights, temperature)
        if name == "mean_probs":
            return mean_probs(logits, temperature)
        return mean_logits(logits)
