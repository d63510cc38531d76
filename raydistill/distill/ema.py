"""Exponential moving average (temporal-mean) teachers: mean teacher (Tarvainen & Valpola 2017), as in PCL and DKEL."""

import torch
from torch import nn


def ema_momentum(step: int, momentum: float) -> float:
    """Mean-teacher warm-up momentum m_t = min(1 - 1/(t+1), m).

    ``step`` is t, the 1-based count of this EMA update: the first update after the teacher's initialisation uses
    t = 1 (momentum 0.5), so the initialisation is blended with the student, not erased. Raises on t < 1, which
    would give momentum 0 and overwrite the teacher (see ``reference_quirk_ema_momentum``).
    """
    if step < 1:
        raise ValueError(f"ema step counts updates from 1, got {step}")
    return min(1.0 - 1.0 / (step + 1), momentum)


def reference_quirk_ema_momentum(step: int, momentum: float) -> float:
    """The released DKEL code's warm-up: min(1 - 1/(step+1), m) with the global step counted from 0.

    At step 0 the momentum is 0, so the first update copies the student's weights into the teacher and erases the
    teacher's own initialisation (its CE steps). Kept only to reproduce the released behaviour.
    """
    return min(1.0 - 1.0 / (step + 1), momentum)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, over parameters: theta_teacher <- m * theta_teacher + (1 - m) * theta_student.

    Buffers are not touched: the teacher keeps its own BatchNorm running statistics, which come from its own
    forward passes in train mode (run by the caller), and its integer counters such as num_batches_tracked.
    Teacher and student must have the same parameter names and shapes (the teacher is a copy of the student).
    """
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        raise ValueError("ema teacher and student have different parameters")
    targets = [teacher_params[name] for name in teacher_params]
    sources = [student_params[name].detach() for name in teacher_params]
    for name, target, source in zip(teacher_params, targets, sources):
        if target.shape != source.shape:
            raise ValueError(f"ema parameter {name}: teacher {tuple(target.shape)} != student {tuple(source.shape)}")
    if not targets:
        return
    # one fused kernel per op over all parameters, as torch's optimizers do
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, sources, alpha=1.0 - momentum)
