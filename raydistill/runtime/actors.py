"""Thin Ray shells around the engine's Peer, Teacher and Coordinator: every method forwards; nothing else lives here."""
from __future__ import annotations

import os

import ray

from raydistill.engine.coordinator import Coordinator
from raydistill.engine.peer import Peer
from raydistill.engine.teacher import Teacher


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


class _Shell:
    def node(self) -> str:
        return _node()

    def pid(self) -> int:
        """The actor's process id (failure drills kill it)."""
        return os.getpid()


class PeerShell(_Shell):
    def __init__(self, index, config, arrays, spec):
        self.peer = Peer(index, config, arrays, spec)

    def forward(self, epoch, step):
        return self.peer.forward(epoch, step)

    def learn(self, epoch, step, targets):
        return self.peer.learn(epoch, step, targets)

    def evaluate(self, split):
        return self.peer.evaluate(split)

    def state_dict(self):
        return self.peer.state_dict()

    def load_state_dict(self, state):
        self.peer.load_state_dict(state)

    def export(self):
        return self.peer.export()


class TeacherShell(_Shell):
    def __init__(self, index, config, arrays, spec):
        self.teacher = Teacher(index, config, arrays, spec)

    def forward(self, epoch, step):
        return self.teacher.forward(epoch, step)

    def evaluate(self, split):
        return self.teacher.evaluate(split)


class CoordinatorShell(_Shell):
    def __init__(self, config, labels, spec):
        self.coordinator = Coordinator(config, labels, spec)

    def targets(self, epoch, step, *outputs):
        return self.coordinator.targets(epoch, step, *outputs)

    def evaluate(self, split, *outputs):
        return self.coordinator.evaluate(split, *outputs)

    def state_dict(self):
        return self.coordinator.state_dict()

    def load_state_dict(self, state):
        self.coordinator.load_state_dict(state)


PeerActor = ray.remote(PeerShell)
TeacherActor = ray.remote(TeacherShell)
CoordinatorActor = ray.remote(CoordinatorShell)
