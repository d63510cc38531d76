"""The same protocol in one process, over the very same engine objects: the reference, and a debugging aid.

One engine Worker hosts every peer and teacher and the coordinator; its exchange is the identity. The Ray runtime's
workers run this very code, each over its share of the members, with a collective exchange in between.
"""
from __future__ import annotations

import copy

import torch

from raydistill.engine.checkpoint import COORDINATOR, PEERS
from raydistill.engine.worker import CallReport, Members, Worker


class InProcessWorkers:
    transport_name = "inprocess"

    def __init__(self, config, spec, data):
        torch.set_num_threads(config.resources.threads_per_peer)
        self.config = config
        self.num_teachers = config.num_teachers
        members = Members(tuple(range(config.num_peers)), tuple(range(self.num_teachers)))
        self.worker = Worker(config, data, spec, members)

    def describe(self) -> str:
        return "one process"

    def run_steps(self, epoch: int, first: int, count: int, replay: int = 0, on_step=None) -> CallReport:
        return self.worker.run_steps(epoch, first, count, replay, on_step)

    def prepare_epoch(self, epoch: int) -> None:
        self.worker.prepare_epoch(epoch)

    def evaluate(self, split: str) -> dict:
        return self.worker.evaluate(split)

    def get_state(self) -> dict:
        state = self.worker.state_dict()
        return {PEERS: [state[PEERS][i] for i in range(self.config.num_peers)], COORDINATOR: state[COORDINATOR]}

    def set_state(self, state: dict) -> None:
        # a copy, as Ray's object store hands its workers: a loaded optimizer keeps the tensors it is given, and
        # training would change a rollback point kept in memory (its second use would then differ from Ray's)
        state = copy.deepcopy(state)
        self.worker.load_state_dict({PEERS: dict(enumerate(state[PEERS])), COORDINATOR: state[COORDINATOR]})

    def export(self) -> dict:
        return self.worker.export()

    def check_room(self, config) -> None:
        pass                                        # one process holds any peer set

    def recover(self, timeout: float) -> None:
        pass                                        # nothing here can be lost without losing the driver too

    def nodes(self) -> dict:
        return {"peers": ["local"] * self.config.num_peers, "teachers": ["local"] * self.num_teachers,
                "workers": ["local"]}

    def shutdown(self) -> None:
        pass
