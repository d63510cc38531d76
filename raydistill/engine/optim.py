"""Optimizers and the learning-rate schedule as a pure function of (epoch, step): nothing to checkpoint but the optimizer."""
import math

import torch


def make_optimizer(train_config, parameters, lr: float) -> torch.optim.Optimizer:
    if train_config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=train_config.momentum,
                               weight_decay=train_config.weight_decay,
                               nesterov=train_config.nesterov and train_config.momentum > 0)
    cls = torch.optim.Adam if train_config.optimizer == "adam" else torch.optim.AdamW
    return cls(parameters, lr=lr, weight_decay=train_config.weight_decay)


def learning_rate(train_config, base_lr: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate of one step: linear warm-up, then cosine to 0 (per step), step decay at milestones, or
    constant; or the one-cycle schedule (``onecycle``, per step, with its own warm-up)."""
    if train_config.schedule == "onecycle":
        return onecycle_lr(base_lr, epoch * steps_per_epoch + step, train_config.epochs * steps_per_epoch,
                           train_config.pct_start, train_config.div_factor, train_config.final_div_factor)
    progress = epoch + step / steps_per_epoch                      # epochs done, as a float
    if train_config.warmup_epochs > 0 and progress < train_config.warmup_epochs:
        return base_lr * (progress + 1 / steps_per_epoch) / train_config.warmup_epochs
    if train_config.schedule == "cosine":
        span = max(train_config.epochs - train_config.warmup_epochs, 1e-9)
        done = min(max(progress - train_config.warmup_epochs, 0.0) / span, 1.0)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * done))
    if train_config.schedule == "step":
        return base_lr * train_config.gamma ** sum(epoch >= m for m in train_config.milestones)
    return base_lr


def _annealing_cos(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), written as torch's OneCycleLR writes it (same float ops)."""
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def onecycle_lr(max_lr: float, step: int, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                final_div_factor: float = 1e4) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``torch.optim.lr_scheduler.OneCycleLR`` with
    ``anneal_strategy="cos"``, ``three_phase=False`` (Smith & Topin 2019, "Super-Convergence"; torch's semantics):

        initial_lr = max_lr / div_factor,  min_lr = initial_lr / final_div_factor
        phase 1, steps 0 .. pct_start * total_steps - 1:       cosine from initial_lr up to max_lr
        phase 2, up to step total_steps - 1:                  cosine from max_lr down to min_lr

    where a phase's progress is (step - its start) / (its end - its start), the phase boundaries float as in torch.
    Only the learning rate is scheduled: momentum stays ``train.momentum`` throughout, which is OneCycleLR with
    ``cycle_momentum=False`` (the learning rates are the same either way; torch's momentum cycling would also move
    SGD's momentum between 0.85 and 0.95). A zero-length phase counts as finished (torch divides by zero there).
    """
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    phases = ((float(pct_start * total_steps) - 1, initial_lr, max_lr),
              (total_steps - 1, max_lr, min_lr))
    start_step = 0.0
    for i, (end_step, start_lr, end_lr) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            span = end_step - start_step
            pct = (step - start_step) / span if span else 1.0
            return _annealing_cos(start_lr, end_lr, pct)
        start_step = end_step
    raise AssertionError("unreachable: the last phase always answers")
