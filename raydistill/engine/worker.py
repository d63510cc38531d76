"""A worker: the peers and teachers one process hosts, and the steps they run together. No Ray.

One training step, whatever the transport: every member (peer or teacher) runs forward on its view of the step's batch;
the members' outputs are exchanged (``Exchange.gather``: every worker ends with every member's outputs, in member order:
peers 0..N-1, then teachers); the coordinator's target logic turns them into one target per peer; each local peer
learns. With a collective exchange (or in one process) every worker holds a replica of the coordinator and computes
the same targets from the same gathered outputs, bitwise, so a whole call of steps runs without leaving the worker:
``run_steps``. With the object-store transport the driver drives the two halves of each step (``forward``, ``learn``)
and one coordinator actor computes the targets in between. With codistillation (engine/codistill.py) the exchange
carries weights every few steps instead, and each worker computes the other peers' outputs from stale copies.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from raydistill.engine.coordinator import Coordinator
from raydistill.engine.peer import Peer, host_outputs
from raydistill.engine.teacher import Teacher
from raydistill.transports import transport_of


@dataclass(frozen=True)
class Members:
    """Which peers and teachers a worker hosts (global indices)."""
    peers: tuple = ()
    teachers: tuple = ()


class LocalExchange:
    """A worker that hosts every member: its own outputs are all the outputs. No copy."""
    carries_tensors = True

    def gather(self, tag: str, local: list) -> list:
        return local

    def close(self) -> None:
        pass


@dataclass
class PeerFigures:
    """One peer's step figures summed over steps, each weighted by the step's samples. Within a call of steps each
    step's figures stay a device tensor (``add_device``: a reference kept, no work on the device) until ``finish``
    reads them all at once and sums them as numbers, in step order and float64, as figures handed over step by step
    (the object-store transport, ``add``) are: the same sums, bit for bit."""
    sums: dict = field(default_factory=dict)
    samples: float = 0.0
    pending: list = field(default_factory=list)         # the call's StepFigures, in step order

    def add(self, metrics: dict) -> None:
        n = metrics["samples"]
        for key, value in metrics.items():
            if key not in ("samples", "finite"):
                self.sums[key] = self.sums.get(key, 0.0) + value * n
        self.samples += n

    def add_device(self, figures) -> None:
        """figures: a StepFigures (engine/peer.py), left on its device."""
        self.pending.append(figures)

    def finish(self) -> list[bool]:
        """Reads the call's figures (one copy per set of names) and adds them up; returns each step's finiteness."""
        by_keys, rows = {}, [None] * len(self.pending)
        for i, figures in enumerate(self.pending):
            by_keys.setdefault(figures.keys, []).append(i)
        for steps in by_keys.values():
            for i, values in zip(steps, torch.stack([self.pending[i].values for i in steps]).cpu().tolist()):
                rows[i] = self.pending[i].host(values)
        for row in rows:
            self.add(row)
        self.pending = []
        return [bool(row["finite"]) for row in rows]

    def merge(self, other: "PeerFigures") -> None:
        for key, value in other.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.samples += other.samples

    def means(self) -> dict:
        return {key: value / self.samples for key, value in self.sums.items()}


@dataclass
class CallReport:
    """What a call of steps returns: each local peer's summed figures, and where a loss was not finite."""
    peers: dict = field(default_factory=dict)            # peer index -> PeerFigures
    nonfinite: list = field(default_factory=list)        # (epoch, step, peer index), in step order
    steps: dict = field(default_factory=dict)            # peer index -> the (epoch, step) of its pending figures

    def add_step(self, epoch: int, step: int, metrics: dict) -> None:
        """metrics: peer index -> that peer's step metrics as numbers (StepFigures.host)."""
        for index, m in metrics.items():
            self.peers.setdefault(index, PeerFigures()).add(m)
            if not m["finite"]:
                self.nonfinite.append((epoch, step, index))

    def add_device_step(self, epoch: int, step: int, figures: dict) -> None:
        """figures: peer index -> that peer's StepFigures, kept on the device until ``finish``."""
        for index, f in figures.items():
            self.peers.setdefault(index, PeerFigures()).add_device(f)
            self.steps.setdefault(index, []).append((epoch, step))

    def finish(self) -> "CallReport":
        """Reads what stayed on the device at the end of a call: the figures, and each peer's first non-finite step
        (a peer's later steps went on from a broken state and are not reported)."""
        for index, figures in self.peers.items():
            finite = figures.finish()
            broken = [at for at, ok in zip(self.steps.get(index, []), finite) if not ok]
            if broken:
                self.nonfinite.append((*broken[0], index))
        self.steps = {}
        self.nonfinite.sort(key=lambda entry: (entry[0], entry[1], entry[2]))
        return self

    def merge(self, other: "CallReport") -> "CallReport":
        for index, figures in other.peers.items():
            self.peers.setdefault(index, PeerFigures()).merge(figures)
        self.nonfinite.extend(other.nonfinite)
        return self

    def copy(self) -> "CallReport":
        return CallReport({i: dataclasses.replace(f, sums=dict(f.sums)) for i, f in self.peers.items()},
                          list(self.nonfinite))


def labels_of(arrays: dict) -> dict:
    return {split: arrays[f"{split}_y"] for split in ("train", "val", "test")}


class Worker:
    def __init__(self, config, arrays: dict, spec, members: Members, coordinator: bool = True, exchange=None):
        """coordinator: hold a replica of the coordinator (collective exchange, one process); False where a
        coordinator actor computes the targets (object-store transport)."""
        self.config = config
        self.members = members
        self.peers = [Peer(i, config, arrays, spec) for i in members.peers]
        self.teachers = [Teacher(j, config, arrays, spec) for j in members.teachers]
        self.coordinator = Coordinator(config, labels_of(arrays), spec) if coordinator else None
        self.exchange = exchange or LocalExchange()
        self.stack = None
        if config.resources.peer_execution == "stacked" and self.peers:
            from raydistill.engine.stack import PeerStack

            self.stack = PeerStack(self.peers)
        self.codistill = None
        if transport_of(config).stale_copies and self.peers:
            from raydistill.engine.codistill import Codistillation

            self.codistill = Codistillation(config, spec, self.peers, self.coordinator)

    @property
    def device(self) -> str:
        """Where this worker's members compute (a collective exchange of device tensors runs there)."""
        members = self.peers or self.teachers
        return str(members[0].device) if members else "cpu"

    # ---- the two halves of a step (the object-store transport drives them one by one) ------------------------------
    def forward(self, epoch: int, step: int, replay: int = 0) -> list[dict]:
        """The local members' outputs as host arrays (what the object store carries): each peer's dict of arrays,
        then each teacher's. replay: the epoch's replay number after health rollbacks (it re-seeds the batch and the
        views; 0 for a first attempt)."""
        return [host_outputs(o) for o in self.step_forward(epoch, step, replay)]

    def learn(self, epoch: int, step: int, targets: list[dict]) -> dict[int, dict]:
        """targets: one dict per local peer, in order. Returns each local peer's step metrics, as numbers."""
        return {index: figures.host() for index, figures in self.step_learn(epoch, step, targets).items()}

    def step_forward(self, epoch: int, step: int, replay: int = 0) -> list[dict]:
        """The local members' outputs, left where they were computed (tensors on the device; a cached teacher's
        arrays)."""
        peers = (self.stack.forward(epoch, step, replay) if self.stack is not None
                 else [p.forward(epoch, step, replay) for p in self.peers])
        return peers + [t.forward(epoch, step, replay) for t in self.teachers]

    def step_learn(self, epoch: int, step: int, targets: list[dict]) -> dict:
        """Each local peer's StepFigures by peer index, on the device."""
        if self.stack is not None:
            return self.stack.learn(epoch, step, targets)
        return {p.index: p.learn(epoch, step, t) for p, t in zip(self.peers, targets)}

    # ---- whole calls (a collective exchange, or one process) -------------------------------------------------------
    def run_steps(self, epoch: int, first: int, count: int, replay: int = 0) -> CallReport:
        """Steps first..first+count-1 of an epoch (of its replay-th replay): forward, exchange, targets, learn;
        figures come back once. Nothing in a step waits for the device: outputs, targets, losses and figures stay
        there, and are read at the end of the call (``CallReport.finish``); an exchange between workers carries host
        arrays (``host_outputs``), an exchange within one worker carries nothing."""
        report = CallReport()
        if self.codistill is not None:
            for step in range(first, first + count):
                targets = self.codistill.targets(epoch, step, replay, self.exchange.gather)
                report.add_device_step(epoch, step, self.step_learn(epoch, step, targets))
            return report.finish()
        tensors = self.exchange.carries_tensors
        for step in range(first, first + count):
            outputs = self.step_forward(epoch, step, replay)
            outputs = self.exchange.gather("step", outputs if tensors else [host_outputs(o) for o in outputs])
            targets = self.coordinator.targets(epoch, step, *outputs, replay=replay)
            report.add_device_step(epoch, step, self.step_learn(epoch, step, [targets[p.index] for p in self.peers]))
        return report.finish()

    def exchange_only(self, epoch: int, count: int) -> float:
        """Seconds for ``count`` steps of exchange and targets alone, over the outputs of one real forward (the
        benchmark's measure of a transport, compute excluded)."""
        import time

        outputs = self.step_forward(epoch, 0)
        for peer in self.peers:
            peer.discard_step()
        if not self.exchange.carries_tensors:
            outputs = [host_outputs(o) for o in outputs]
        tic = time.perf_counter()
        for step in range(count):
            self.coordinator.targets(epoch, 0, *self.exchange.gather("step", outputs))
        return time.perf_counter() - tic

    def cached_outputs(self, epoch: int) -> list[dict]:
        """The outputs of one real forward, kept for the object-store exchange benchmark."""
        if getattr(self, "_cached", None) is None:
            self._cached = self.forward(epoch, 0)
            for peer in self.peers:
                peer.discard_step()
        return self._cached

    def prepare_epoch(self, epoch: int) -> None:
        """Work that must not sit between two collectives: a cached teacher's outputs for the epoch."""
        for teacher in self.teachers:
            if teacher.cache is not None:
                teacher.cache.precompute([epoch])

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def evaluate_outputs(self, split: str) -> list[dict]:
        """The local members' outputs on a split: each peer's {logits[, ema_logits]}, each teacher's {logits}."""
        return [p.evaluate(split) for p in self.peers] + [{"logits": t.evaluate(split)} for t in self.teachers]

    def evaluate(self, split: str) -> dict:
        """The figures of every member and the ensemble, computed by this worker's coordinator replica."""
        outputs = self.exchange.gather(f"eval-{split}", self.evaluate_outputs(split))
        return self.coordinator.evaluate(split, *outputs)

    # ---- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        peers = {p.index: p.state_dict() for p in self.peers}
        if self.stack is not None:
            peers = {p.index: self.stack.peer_state(i, peers[p.index]) for i, p in enumerate(self.peers)}
        return {"peers": peers,
                "coordinator": self.coordinator.state_dict() if self.coordinator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """state: {"peers": {index: peer state} (this worker's at least), "coordinator": state or None}."""
        for peer in self.peers:
            peer.load_state_dict(state["peers"][peer.index])
        if self.stack is not None:
            self.stack.load([state["peers"][peer.index] for peer in self.peers])
        if self.coordinator is not None and state.get("coordinator") is not None:
            self.coordinator.load_state_dict(state["coordinator"])
        if self.codistill is not None:
            self.codistill.invalidate()

    def export(self) -> dict:
        return {name: entry for p in self.peers for name, entry in p.export().items()}

    def set_exchange(self, exchange) -> None:
        self.exchange.close()
        self.exchange = exchange or LocalExchange()
        if self.codistill is not None:
            self.codistill.invalidate()

