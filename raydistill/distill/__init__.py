"""Pure distillation math: losses, ensembles, schedules, EMA teachers. Knows nothing of Ray or of configs."""
from raydistill.distill.losses import kd_loss, mse_to_target, pairwise_kl, task_loss

__all__ = ["kd_loss", "mse_to_target", "pairwise_kl", "task_loss"]
