"""Thin Ray shells around the engine's Worker and Coordinator: every method forwards; nothing else lives here."""
from __future__ import annotations

import os

import ray

from raydistill.engine.coordinator import Coordinator
from raydistill.engine.step import host_outputs
from raydistill.engine.worker import Worker
from raydistill.runtime.collective import GroupExchange, free_port


PROGRESS = "progress"          # the concurrency group of steps_done: it must not wait behind a call of steps


class _Shell:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """The actor's process id (failure drills kill it)."""
        return os.getpid()


class WorkerShell(_Shell):
    """Empty until ``setup``: Ray restarts a lost actor by running its constructor again with its first arguments,
    and a worker kept warm for the next run of this process (driver.py's pool) has other ones; so everything a
    worker is made of comes with ``setup``, every time."""

    def __init__(self):
        self.worker = None

    def setup(self, data, config, spec, members, coordinator: bool, layout=None) -> str:
        """Builds the engine worker over the run's data set (once; after a restart, again). Returns the node id.
        layout: every worker's Members (a run with peers of several ranks)."""
        if self.worker is None:
            self.worker = Worker(config, data, spec, members, coordinator=coordinator, layout=layout)
        return self.node()

    def data_source(self) -> str:
        return self.worker.data_source()

    def reset(self) -> None:
        """Back to empty, its group left: kept warm for another run of the driver's process."""
        if self.worker is not None:
            self.worker.set_exchange(None)
        self.worker = None

    def address(self) -> tuple[str, int]:
        """Where this worker, as rank 0, hosts the group: its node's address and a free port."""
        return ray.util.get_node_ip_address(), free_port()

    def join_group(self, rank: int, world: int, address: str, port: int, timeout_s: float, one_node: bool,
                   peer_groups: dict | None = None) -> None:
        self.worker.set_exchange(GroupExchange(rank, world, address, port, timeout_s, one_node, self.worker.device,
                                               peer_groups))

    def leave_group(self) -> None:
        self.worker.set_exchange(None)

    def run_steps(self, epoch, first, count, replay=0):
        return self.worker.run_steps(epoch, first, count, replay)

    @ray.method(concurrency_group=PROGRESS)
    def steps_done(self) -> int:
        """Answered while a call of steps runs (its own concurrency group, beside the default one that keeps every
        other call in order): the steps its host has run so far, for the driver's progress line."""
        return self.worker.steps_done() if self.worker is not None else 0

    def forward(self, epoch, step, replay=0):
        return self.worker.forward(epoch, step, replay)

    def learn(self, epoch, step, targets):
        return self.worker.learn(epoch, step, targets)

    def prepare_epoch(self, epoch):
        self.worker.prepare_epoch(epoch)

    def evaluate(self, split):
        return self.worker.evaluate(split)

    def evaluate_outputs(self, split):
        return self.worker.evaluate_outputs(split)

    def state_dict(self):
        return self.worker.state_dict()

    def load_state_dict(self, state):
        self.worker.load_state_dict(state)

    def export(self):
        return self.worker.export()


class CoordinatorShell(_Shell):
    """The object-store transport's coordinator: targets per worker, as one return value per worker. Empty until
    ``setup`` (as a worker: see WorkerShell)."""

    def __init__(self):
        self.coordinator = self.members = None

    def setup(self, config, data, spec, members) -> str:
        """data: the run's data set, of which the coordinator reads the labels only."""
        if self.coordinator is None:
            self.coordinator = Coordinator(config, data, spec)
            self.members = members
        return self.node()

    def reset(self) -> None:
        self.coordinator = self.members = None

    def targets(self, epoch, step, *worker_outputs, replay=0):
        outputs = [member for outputs in worker_outputs for member in outputs]
        targets = [host_outputs(t) for t in self.coordinator.targets(epoch, step, *outputs, replay=replay)]
        per_worker = [[targets[i] for i in m.peers] for m in self.members]
        return per_worker if len(per_worker) > 1 else per_worker[0]    # num_returns=1 returns the value itself

    def evaluate(self, split, *worker_outputs):
        return self.coordinator.evaluate(split, *[member for outputs in worker_outputs for member in outputs])

    def state_dict(self):
        return self.coordinator.state_dict()

    def load_state_dict(self, state):
        self.coordinator.load_state_dict(state)


WorkerActor = ray.remote(concurrency_groups={PROGRESS: 1})(WorkerShell)
CoordinatorActor = ray.remote(CoordinatorShell)
