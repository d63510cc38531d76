"""What the online-distillation methods (kdcl, pcl, dkel) share: the peers' ensemble target and their config checks."""
from __future__ import annotations

import torch

from raydistill.distill.ensembles import ENSEMBLES, ensemble
from raydistill.methods.base import stacked, tensor_of
from raydistill.errors import ConfigError
from raydistill.names import LOGITS

LEARNED_HEAD = "learned_head"


def peer_ensemble(name: str, peers: list[dict], labels, temperature: float,
                  learned_ensemble=None) -> torch.Tensor:
    """The ensemble e [B, C] of the peers' student logits named by ``method.ensemble`` (distill/ensembles.py), or the
    coordinator's learned head's logits for ``learned_head``."""
    if name == LEARNED_HEAD:
        if learned_ensemble is None:
            raise RuntimeError("ensemble learned_head: the coordinator sent no learned ensemble logits")
        return tensor_of(learned_ensemble).float()
    logits = stacked([p[LOGITS] for p in peers])                              # [P, B, C]
    return ensemble(name, logits, tensor_of(labels), temperature)


def check_online_config(method_config, task: str, allowed: tuple[str, ...]) -> None:
    """Ranges of the online keys; regression has only the mean prediction as an ensemble."""
    m = method_config
    if m.ensemble is not None:
        choices = ("mean_logits",) if task == "regression" else allowed
        if m.ensemble not in choices:
            raise ConfigError("method.ensemble", m.ensemble,
                              f"one of: {', '.join(choices)}" + (" (for regression)" if task == "regression" else ""))
    if m.ema_momentum is not None and not 0.0 <= m.ema_momentum < 1.0:
        raise ConfigError("method.ema_momentum", m.ema_momentum, "must be in [0, 1)")
    if m.teacher_init_steps is not None and m.teacher_init_steps < 0:
        raise ConfigError("method.teacher_init_steps", m.teacher_init_steps, "must be >= 0")
    if m.rampup_epochs is not None and m.rampup_epochs < 0:
        raise ConfigError("method.rampup_epochs", m.rampup_epochs, "must be >= 0 (0: no ramp)")
    if m.beta_floor is not None and not 0.0 <= m.beta_floor < 1.0:
        raise ConfigError("method.beta_floor", m.beta_floor, "must be in [0, 1)")


__all__ = ["ENSEMBLES", "LEARNED_HEAD", "check_online_config", "peer_ensemble"]
