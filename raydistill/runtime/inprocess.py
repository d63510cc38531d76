"""The same step protocol in one process, over the very same engine objects: the reference, and a debugging aid."""
from __future__ import annotations

import torch

from raydistill.engine.coordinator import Coordinator
from raydistill.engine.peer import Peer
from raydistill.engine.teacher import Teacher
from raydistill.runtime.transport import DirectTransport


def labels_of(arrays: dict) -> dict:
    return {split: arrays[f"{split}_y"] for split in ("train", "val", "test")}


class InProcessWorkers:
    def __init__(self, config, spec, arrays):
        torch.set_num_threads(config.resources.threads_per_peer)
        self.peers = [Peer(i, config, arrays, spec) for i in range(config.num_peers)]
        self.teachers = [Teacher(0, config, arrays, spec)] if config.teacher is not None else []
        self.coordinator = Coordinator(config, labels_of(arrays), spec)
        self.transport = DirectTransport(self.coordinator)
        self.num_teachers = len(self.teachers)

    def submit_step(self, epoch: int, step: int):
        outputs = [p.forward(epoch, step) for p in self.peers] + [t.forward(epoch, step) for t in self.teachers]
        targets = self.transport.exchange(epoch, step, outputs)
        return [p.learn(epoch, step, t) for p, t in zip(self.peers, targets)]

    def collect(self, handle):
        return handle

    def evaluate(self, split: str) -> dict:
        outputs = [p.evaluate(split) for p in self.peers] + [t.evaluate(split) for t in self.teachers]
        return self.coordinator.evaluate(split, *outputs)

    def get_state(self) -> dict:
        return {"peers": [p.state_dict() for p in self.peers], "coordinator": self.coordinator.state_dict()}

    def set_state(self, state: dict) -> None:
        for peer, peer_state in zip(self.peers, state["peers"]):
            peer.load_state_dict(peer_state)
        self.coordinator.load_state_dict(state["coordinator"])

    def export(self) -> dict:
        return {name: entry for p in self.peers for name, entry in p.export().items()}

    def wait_ready(self, timeout: float) -> None:
        pass                                        # nothing here can be lost without losing the driver too

    def nodes(self) -> dict:
        return {"peers": ["local"] * len(self.peers), "teachers": ["local"] * len(self.teachers),
                "coordinator": "local"}

    def shutdown(self) -> None:
        pass
