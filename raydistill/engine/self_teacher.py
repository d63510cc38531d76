"""A peer's own teacher, chosen by the method (``Method.self_teacher_kind``). No Ray.

- ``ema``: a temporal-mean (EMA) teacher of the student's weights (mean teacher, Tarvainen & Valpola 2017), as PCL and
  DKEL keep one per peer and `self` with one generation learns from it;
- ``generations``: born-again networks (Furlanello et al. 2018): the previous generation's student, frozen, teaches a
  fresh student, which starts with new weights, a new optimizer and its own learning-rate schedule.
One interface: ``outputs(x)`` (its logits on the peer's view, or None while there is no teacher), ``after_step()``,
``state_dict()``/``load_state_dict()``, ``evaluate()``, ``export()``; the Peer never asks which kind it holds.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from raydistill.distill.ema import ema_update_
from raydistill.distill.losses import task_loss
from raydistill.engine.hints import Hint
from raydistill.engine.optim import make_optimizer
from raydistill.models import build_model
from raydistill.names import EMA_LOGITS, EMA_TEACHER, ema_name
from raydistill.seeding import derive_seed, seed_device


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class SelfTeacher:
    """No teacher of its own (the default): every hook is a no-op."""

    def __init__(self, peer):
        self.peer = peer
        self.hint: Hint | None = None

    @property
    def model(self) -> torch.nn.Module | None:
        return None

    def attach_hint(self, path: str) -> None:
        """Tap the teacher's copy of the student's hint layer (self-distillation's hidden term)."""
        if self.model is not None:
            self.hint = Hint(self.model, path, "method.features.student", self.peer.spec)

    def before_forward(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def local_targets(self, logits: torch.Tensor | None) -> dict:
        """What the peer learns from its own teacher (self-distillation): its logits and hint on this view."""
        if logits is None:
            return {}
        targets = {"teacher_logits": logits}
        if self.hint is not None:
            targets["teacher_hint"] = self.hint.value.detach().float()
        return targets

    def after_step(self) -> None:
        pass

    def train_schedule(self, epoch: int):
        """(train config, epoch) of the learning-rate schedule."""
        return self.peer.config.train, epoch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def evaluate(self, split: str) -> dict:
        return {}

    def export(self) -> dict:
        return {}


class EmaTeacher(SelfTeacher):
    """A copy of the student's initial weights, then ``method.teacher_init_steps`` CE steps at lr / 100 on this peer's
    views of the first batches of epoch 0 (DKEL's teacher init; 0 steps: a plain copy, as in PCL); after every
    optimizer step theta_t <- m theta_t + (1 - m) theta_s, m from the method's warm-up counted from after the init."""

    def __init__(self, peer):
        super().__init__(peer)
        self.ema = frozen(self.initial(peer))
        self.updates = 0                    # EMA updates since the teacher's init: the warm-up counter

    @property
    def model(self) -> torch.nn.Module:
        return self.ema

    @staticmethod
    def initial(peer) -> torch.nn.Module:
        teacher = copy.deepcopy(peer.model)
        config = peer.config
        steps = config.method.teacher_init_steps or 0
        if steps:
            optimizer = make_optimizer(config.train, teacher.parameters(), peer.settings.lr / 100)
            teacher.train()
            for k in range(steps):
                step = k % peer.data.steps_per_epoch
                x = peer.data.view(0, step, peer.view_index, device=peer.device)
                seed_device(peer.device, config.seed, "teacher_init", peer.id, k)
                loss = task_loss(teacher(x), peer.data.labels(0, step, device=peer.device), config.task)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            teacher.zero_grad(set_to_none=True)
        return teacher

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        # train mode, as the mean-teacher code: batch statistics, and the teacher's own BN running stats
        self.ema.train()
        with self.peer.autocast():
            return self.ema(x).float()

    def after_step(self) -> None:
        self.updates += 1
        ema_update_(self.ema, self.peer.model, self.peer.method.ema_momentum(self.updates))

    def state_dict(self) -> dict:
        return {"ema_teacher": cpu_state(self.ema), "ema_updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "ema_teacher" not in state:
            raise ValueError(f"peer {self.peer.index}: the checkpoint holds no EMA teacher, but method "
                             f"{self.peer.method.name} keeps one")
        self.ema.load_state_dict(state["ema_teacher"])
        self.updates = int(state["ema_updates"])

    def evaluate(self, split: str) -> dict:
        return {EMA_LOGITS: self.peer.data.predict(self.ema, split, self.peer.device)}

    def export(self) -> dict:
        return {ema_name(self.peer.id): {"kind": EMA_TEACHER, "index": self.peer.index, "state": cpu_state(self.ema)}}


class PreviousGeneration(SelfTeacher):
    """Born-again: train.epochs split into ``method.generations`` generations; at each generation's first epoch the
    student becomes the frozen teacher and a fresh student starts. The first generation has no teacher."""

    def __init__(self, peer):
        super().__init__(peer)
        self.snapshot: torch.nn.Module | None = None
        self.generation = 0
        self.hint_path: str | None = None

    @property
    def model(self) -> torch.nn.Module | None:
        return self.snapshot

    def attach_hint(self, path: str) -> None:
        self.hint_path = path
        super().attach_hint(path)

    def before_forward(self, epoch: int) -> None:
        generation = self.peer.method.generation(epoch)
        if generation != self.generation:
            self.start(generation)

    def start(self, generation: int) -> None:
        peer = self.peer
        self.set_snapshot(peer.model.state_dict())
        torch.manual_seed(derive_seed(peer.config.seed, "init", "peer", peer.id, "generation", generation))
        fresh = build_model(peer.settings.arch, peer.spec, **peer.settings.options)
        peer.model.load_state_dict(fresh.state_dict())       # in place: the taps and hooks stay on the student
        peer.optimizer = peer.make_optimizer()
        self.generation = generation

    def set_snapshot(self, state: dict | None) -> None:
        self.snapshot, self.hint = None, None
        if state is None:
            return
        peer = self.peer
        snapshot = build_model(peer.settings.arch, peer.spec, **peer.settings.options)   # fresh: no hooks
        snapshot.load_state_dict(state)
        self.snapshot = frozen(snapshot.to(peer.device).eval())
        if self.hint_path is not None:
            super().attach_hint(self.hint_path)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.snapshot is None:
            return None                   # the first generation: no teacher yet
        with self.peer.autocast():
            return self.snapshot(x).float()

    def train_schedule(self, epoch: int):
        method, train = self.peer.method, self.peer.config.train
        start = method.generation_start(epoch)
        last = method.generation(epoch) == self.peer.config.method.generations - 1
        length = (train.epochs - start) if last else method.generation_epochs
        return dataclasses.replace(train, epochs=length), epoch - start

    def state_dict(self) -> dict:
        return {"generation": self.generation,
                "snapshot": cpu_state(self.snapshot) if self.snapshot is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.generation = int(state["generation"])
        self.set_snapshot(state["snapshot"])


SELF_TEACHERS = {None: SelfTeacher, "ema": EmaTeacher, "generations": PreviousGeneration}


def make_self_teacher(peer) -> SelfTeacher:
    return SELF_TEACHERS[peer.method.self_teacher_kind](peer)


__all__ = ["EmaTeacher", "PreviousGeneration", "SelfTeacher", "make_self_teacher"]
