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
    """Linear warm-up, then cosine to 0 (per step), step decay at milestones, or constant."""
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
