"""The method contract: a small object with pure functions, run the same in a Ray actor or in one process.

A method answers three questions (mdistiller's "distiller" contract, split the way the runtime is split):
- ``hyper(epoch)``: the values of its knobs at an epoch (temperature, alpha, ce_weight, ramp, beta), logged each epoch;
- ``targets(hyper, peers, teachers, labels, learned_ensemble)``: in the coordinator, what each peer is to learn from,
  as numpy arrays; ``peers`` holds each peer's outputs: ``logits``, and ``ema_logits`` / ``features`` when asked for;
- ``loss(hyper, outputs, labels, targets)``: in a peer, the total loss and its named terms.
What a method asks of the engine is declared, not coded in the engine: ``uses_ema_teacher`` (each peer keeps a
temporal-mean teacher), ``feature_taps()`` (pooled features the coordinator needs, e.g. for a learned ensemble head),
``feature_target`` (each peer taps its hint layer and owns adapters toward the teacher's or the other peers' hints),
``outputs_needed(role)`` (what a peer or a teacher sends each step: logits, hints only where needed),
``self_teacher`` (the peer holds its own teacher: self-distillation), ``uses_peer_losses`` (performance weights).
Weights follow one rule: ``loss = ce_weight * task_loss + alpha_e * sum_n weight_n(e) * term_n``,
alpha_e = alpha(e)*exp(-decay*e) (alpha and temperature may be schedules of the epoch, distill/schedules.py),
weight_n from ``term_weights(hyper)`` (ramps, beta, hint weights; 1 by default); a term weighted 0 is left out;
``ce_weight: complement`` means 1 - alpha_e (Hinton's convex mix). RepDistiller's alpha weights KD the same way;
torchdistill's alpha weights CE instead.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raydistill.distill.features import peer_alignment_loss
from raydistill.distill.losses import kd_loss, mse_to_target, task_loss
from raydistill.distill.schedules import make_schedule
from raydistill.errors import ConfigError
from raydistill.names import ALIGNED_HINTS, EMA_LOGITS, HINT, LOGITS

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


def tensor_of(value) -> torch.Tensor:
    """A member's output as a tensor where it lies: a tensor is itself, an array (read-only ones too, never written)
    a CPU tensor over it. Targets are computed in torch, so that a worker's targets stay on its device."""
    if isinstance(value, torch.Tensor):
        return value
    if getattr(value, "flags", None) is not None and value.flags.writeable:
        return torch.from_numpy(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(np.asarray(value))


def stacked(values) -> torch.Tensor:
    """The members' outputs of one kind stacked on a new first axis ([P, B, C] of logits)."""
    return torch.stack([tensor_of(v) for v in values])


def without(stacked_values: torch.Tensor, i: int) -> torch.Tensor:
    """The stacked outputs without member i (every other peer's)."""
    return torch.cat([stacked_values[:i], stacked_values[i + 1:]])


def with_peer_hints(targets: list[dict], peers: list[dict]) -> list[dict]:
    """Peer feature alignment: each peer's targets get the other peers' hints (a list: their shapes may differ)."""
    if peers and HINT in peers[0]:
        for i, target in enumerate(targets):
            target["peer_hints"] = [tensor_of(p[HINT]) for j, p in enumerate(peers) if j != i]
    return targets


def peer_alignment_term(outputs: dict, targets: dict) -> dict:
    """{"align": mean_j MSE(r_ij(f_i), f_j)} where the peer aligns its hint to the others' (else nothing)."""
    if "peer_hints" not in targets:
        return {}
    return {"align": peer_alignment_loss(outputs[ALIGNED_HINTS], targets["peer_hints"])}


class Method:
    name = "base"
    # the defaults reproduce each method's source; resolved into config.yaml so a run states what it used
    defaults = {"temperature": 1.0, "alpha": 1.0, "ce_weight": 1.0, "per_peer_views": False, "decay": 0.0}
    # what the method needs and supports, declared; the config (check_config), the engine and elastic peers read it
    min_peers = 1                  # peers it needs at least
    needs_teacher = False          # it trains from frozen teachers (teacher or teachers in the config)
    uses_ema_teacher = False       # each peer keeps a temporal-mean teacher of itself (PCL, DKEL)
    ema_targets = False            # the coordinator's targets read every peer's EMA-teacher logits (PCL, DKEL)
    self_teacher = False           # the peer holds the teacher it learns from (self-distillation)
    uses_peer_losses = False       # the coordinator adds "peer_weights" from the peers' validation losses
    # what a student's hint is compared with: "teacher" (its adapter maps it to the teacher's hint), "peers" (one
    # adapter per other peer), "self" (the same network's teacher copy, no adapter), or None (no hint)
    feature_target: str | None = None

    def __init__(self, method_config, task: str = "classification", num_peers: int = 1, epochs: int = 1,
                 teacher_weights=()):
        """teacher_weights: each frozen teacher's ``weight`` (None where not given), in member order."""
        self.config = method_config
        self.task = task
        self.num_peers = num_peers
        self.epochs = epochs
        self.teacher_weights = list(teacher_weights)
        # built once: hyper() runs every step in every peer and in the coordinator
        self.alpha_schedule = make_schedule(method_config.alpha, None, "method.alpha")
        self.temperature_schedule = make_schedule(method_config.temperature, None, "method.temperature")

    # ---- knobs per epoch ---------------------------------------------------------------------------------------
    def alpha_at(self, epoch: int) -> float:
        """alpha_e = alpha(e) * exp(-decay * e): alpha's schedule (a number is constant), decayed per epoch."""
        return self.alpha_schedule(epoch, self.epochs) * math.exp(-self.config.decay * epoch)

    def temperature_at(self, epoch: int) -> float:
        """The temperature of an epoch: a number, or a schedule (linear 4 -> 1, cosine, exponential, warm-up)."""
        return self.temperature_schedule(epoch, self.epochs)

    def hyper(self, epoch: int) -> dict[str, float]:
        alpha = self.alpha_at(epoch)
        ce_weight = 1.0 - alpha if self.config.ce_weight == "complement" else float(self.config.ce_weight)
        return {"temperature": self.temperature_at(epoch), "alpha": alpha, "ce_weight": ce_weight}

    def view_index(self, peer: int) -> int:
        """Which augmented view of the batch a peer trains on: its own, or the shared view 0."""
        return peer if self.config.per_peer_views else 0

    @property
    def uses_hint(self) -> bool:
        """Whether each peer taps its hint layer (``method.features.student``, the middle stage by default)."""
        return self.feature_target is not None

    def outputs_needed(self, role: str) -> tuple[str, ...]:
        """What a ``peer`` or ``teacher`` sends each step: logits, and its hint features or its EMA teacher's logits
        only where a method's targets read them (the hint is the largest thing that could leave an actor)."""
        if role != "peer":
            return (LOGITS,)
        return (LOGITS,) + ((HINT,) if self.feature_target == "peers" else ()) + \
            ((EMA_LOGITS,) if self.ema_targets else ())

    def feature_taps(self) -> list[tuple[str, str]]:
        """(module path, "input"|"output") of the features each peer sends with its logits; none by default."""
        return []

    @property
    def self_teacher_kind(self) -> str | None:
        """The teacher each peer keeps of itself (engine/self_teacher.py): "ema", "generations", or None."""
        return "ema" if self.uses_ema_teacher else None

    @property
    def deploy_kind(self) -> str:
        """Which model a run of this method is meant to deploy: the EMA teacher where there is one (PCL, DKEL)."""
        return "ema_teacher" if self.uses_ema_teacher else "peer"

    def teacher_views(self) -> list[int]:
        """The views a teacher must see so that every peer gets targets for its own view."""
        return sorted({self.view_index(i) for i in range(self.num_peers)})

    @property
    def learned_head(self) -> bool:
        """The coordinator trains an ensemble head over the peers' features (``ensemble: learned_head``)."""
        return False

    @classmethod
    def check_config(cls, config) -> None:
        """The method's rules over the whole resolved config: the peers and teachers it needs, then its own keys
        (``check_keys``). The first problem raises a ConfigError."""
        m = config.method
        if config.num_peers < cls.min_peers:
            raise ConfigError("peers", config.num_peers, f"method {m.name} needs at least {cls.min_peers} peers")
        teachers = config.teacher_list
        if cls.needs_teacher:
            if not teachers:
                raise ConfigError("teacher.checkpoint", None, f"method {m.name} needs a teacher: {{arch, "
                                  "checkpoint}} (a run directory or a .pt file), or teachers: a list of them")
            for j, teacher in enumerate(teachers):
                field = f"{config.teacher_field(j)}.checkpoint"
                if not teacher.checkpoint:
                    raise ConfigError(field, teacher.checkpoint, f"method {m.name} needs a teacher: {{arch, "
                                      "checkpoint}} (a run directory or a .pt file)")
                if not Path(teacher.checkpoint).exists():
                    raise ConfigError(field, teacher.checkpoint, "does not exist")
        elif teachers:
            field, value = (("teacher", config.teacher.arch) if config.teacher
                            else ("teachers", [t.arch for t in teachers]))
            needing = [name for name in method_names() if method_class(name).needs_teacher]
            raise ConfigError(field, value, f"none for method {m.name}: only {', '.join(needing)} train from a "
                              "teacher")
        cls.check_keys(config)

    @classmethod
    def check_keys(cls, config) -> None:
        """Raises ConfigError for a value of one of the method's keys that it cannot use. Default: nothing."""

    def check_peer_change(self) -> None:
        """Raises ConfigError where the peer set cannot change while the run trains (elastic peers): state kept per
        peer in the coordinator (a learned ensemble head as wide as the peer set, each peer's validation history), or
        adapters each peer owns toward every other peer."""
        m = self.config
        if self.learned_head:
            raise ConfigError("method.ensemble", m.ensemble, "a learned ensemble head is as wide as the peer set; "
                              "changing peers needs another ensemble (mean_logits, mean_probs, minlogit, best)")
        if self.uses_peer_losses:
            raise ConfigError("method.peer_weighting", m.peer_weighting, "keeps every peer's validation history; "
                              "changing peers needs peer_weighting: uniform")
        if self.feature_target == "peers":
            raise ConfigError("method.feature_weight", m.feature_weight, "each peer owns adapters toward every "
                              "other peer; changing peers needs feature_weight: 0")

    @staticmethod
    def check_feature_weight(method_config) -> None:
        value = method_config.feature_weight
        if value is not None and value < 0:
            raise ConfigError("method.feature_weight", value, "must be a number >= 0 (0: no feature alignment)")

    # ---- coordinator side --------------------------------------------------------------------------------------
    def targets(self, hyper: dict, peers: list[dict], teachers: list[dict], labels: np.ndarray,
                learned_ensemble: np.ndarray | None = None) -> list[dict]:
        """One dict of tensors per peer, on the outputs' device. Default: nothing to learn from (independent training).

        learned_ensemble: the coordinator's learned ensemble head's logits [B, C] (``ensemble: learned_head``)."""
        return [{} for _ in peers]

    def with_peer_losses(self, targets: list[dict], peer_losses: list[list[float]]) -> list[dict]:
        """The targets with what the coordinator's record of the peers' validation losses adds (``uses_peer_losses``:
        ``peer_weights``, the performance weights of the other peers). Default: the targets as they are."""
        return targets

    # ---- peer side ---------------------------------------------------------------------------------------------
    def distill_terms(self, hyper: dict, outputs: dict, labels: torch.Tensor, targets: dict) -> dict:
        """The method's named distillation terms, before the alpha weight. Default: none."""
        return {}

    def term_weights(self, hyper: dict) -> dict[str, float]:
        """Per-epoch weight of each named distillation term (ramps, beta); a term not named here weighs 1."""
        return {}

    def loss(self, hyper: dict, outputs: dict, labels: torch.Tensor, targets: dict):
        """Total loss and its named terms (the unweighted terms are what gets logged)."""
        terms = {"task": task_loss(outputs[LOGITS], labels, self.task)}
        distill = self.distill_terms(hyper, outputs, labels, targets)
        weights = self.term_weights(hyper)
        # a term weighted 0 stays out of the graph: the layers only it feeds get no gradient and no weight decay
        # (fitnet's hint stage trains the layers below the hint only)
        total = hyper["ce_weight"] * terms["task"] if hyper["ce_weight"] else None
        for name, value in distill.items():
            weight = hyper["alpha"] * weights.get(name, 1.0)
            if weight:
                total = weight * value if total is None else total + weight * value
            terms[name] = value
        if total is None:
            total = terms["task"] * 0.0
        terms["loss"] = total
        return total, terms

    def distill(self, student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
        """KD toward a target's logits (classification) or MSE toward its predictions (regression)."""
        if self.task == "regression":
            return mse_to_target(student, target)
        return kd_loss(student, target, temperature)
