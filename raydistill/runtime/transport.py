"""How a step's outputs reach the coordinator and each peer's targets come back.

One small interface: ``exchange(epoch, step, outputs) -> per-peer targets``. Methods never see it, so a faster
transport (a collective among the peers, Ray's direct tensor transport) can replace the object store without touching
a method. Outputs and targets are dicts of numpy arrays: Ray shares numpy zero-copy on a node, torch tensors it copies.
"""
from __future__ import annotations

from abc import ABC, abstractmethod


class Transport(ABC):
    @abstractmethod
    def exchange(self, epoch: int, step: int, outputs: list) -> list:
        """outputs: the peers' then the teachers' outputs (values or refs); returns one target (or ref) per peer."""


class ObjectStoreTransport(Transport):
    """Through the Ray object store: the output refs go to the coordinator actor as top-level arguments (Ray resolves
    them), which returns one ref per peer (``num_returns=N``), so each peer fetches only its own targets."""

    def __init__(self, coordinator, num_peers: int):
        self.coordinator = coordinator
        self.num_peers = num_peers

    def exchange(self, epoch, step, outputs):
        refs = self.coordinator.targets.options(num_returns=self.num_peers).remote(epoch, step, *outputs)
        return refs if self.num_peers > 1 else [refs]


class DirectTransport(Transport):
    """In one process: a plain call of the coordinator object."""

    def __init__(self, coordinator):
        self.coordinator = coordinator

    def exchange(self, epoch, step, outputs):
        return self.coordinator.targets(epoch, step, *outputs)
