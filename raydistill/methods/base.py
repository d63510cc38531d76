"""The method contract: a small object with pure functions, run the same in a Ray actor or in one process.

A method answers three questions (mdistiller's "distiller" contract, split the way the runtime is split):
- ``hyper(epoch)``: the values of its knobs at an epoch (temperature, alpha, ce_weight, ...), logged every epoch;
- ``targets(hyper, peers, teachers, labels)``: in the coordinator, what each peer is to learn from, as numpy arrays;
- ``loss(hyper, outputs, labels, targets)``: in a peer, the total loss and its named terms.
Weights follow one rule: ``loss = ce_weight * task_loss + alpha_e * (distillation terms)``, alpha_e = alpha*exp(-decay*e);
``ce_weight: complement`` means 1 - alpha_e (Hinton's convex mix). RepDistiller's alpha weights KD the same way;
torchdistill's alpha weights CE instead.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from raydistill.distill.losses import kd_loss, mse_to_target, task_loss
from raydistill.errors import ConfigError

_REGISTRY: dict[str, type["Method"]] = {}


def register_method(name: str) -> Callable[[type], type]:
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type["Method"]:
    if name not in _REGISTRY:
        raise ConfigError("method.name", name, f"one of: {', '.join(method_names())}")
    return _REGISTRY[name]


class Method:
    name = "base"
    # the defaults reproduce each method's source; resolved into config.yaml so a run states what it used
    defaults = {"temperature": 1.0, "alpha": 1.0, "ce_weight": 1.0, "per_peer_views": False,
                "min_peers": 1, "needs_teacher": False}

    def __init__(self, method_config, task: str = "classification", num_peers: int = 1, epochs: int = 1):
        self.config = method_config
        self.task = task
        self.num_peers = num_peers
        self.epochs = epochs

    # ---- knobs per epoch ---------------------------------------------------------------------------------------
    def hyper(self, epoch: int) -> dict[str, float]:
        alpha = self.config.alpha * math.exp(-self.config.decay * epoch)
        ce_weight = 1.0 - alpha if self.config.ce_weight == "complement" else float(self.config.ce_weight)
        return {"temperature": float(self.config.temperature), "alpha": alpha, "ce_weight": ce_weight}

    def view_index(self, peer: int) -> int:
        """Which augmented view of the batch a peer trains on: its own, or the shared view 0."""
        return peer if self.config.per_peer_views else 0

    def teacher_views(self) -> list[int]:
        """The views a teacher must see so that every peer gets targets for its own view."""
        return sorted({self.view_index(i) for i in range(self.num_peers)})

    # ---- coordinator side --------------------------------------------------------------------------------------
    def targets(self, hyper: dict, peers: list[dict], teachers: list[dict], labels: np.ndarray) -> list[dict]:
        """One dict of numpy arrays per peer. Default: nothing to learn from (independent training)."""
        return [{} for _ in peers]

    # ---- peer side ---------------------------------------------------------------------------------------------
    def distill_terms(self, hyper: dict, outputs: dict, labels: torch.Tensor, targets: dict) -> dict:
        """The method's named distillation terms, before the alpha weight. Default: none."""
        return {}

    def loss(self, hyper: dict, outputs: dict, labels: torch.Tensor, targets: dict):
        """Total loss and its named terms (the terms are what gets logged)."""
        terms = {"task": task_loss(outputs["logits"], labels, self.task)}
        distill = self.distill_terms(hyper, outputs, labels, targets)
        total = hyper["ce_weight"] * terms["task"]
        for name, value in distill.items():
            total = total + hyper["alpha"] * value
            terms[name] = value
        terms["loss"] = total
        return total, terms

    def distill(self, student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
        """KD toward a target's logits (classification) or MSE toward its predictions (regression)."""
        if self.task == "regression":
            return mse_to_target(student, target)
        return kd_loss(student, target, temperature)
