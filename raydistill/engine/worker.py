"""A worker: the peers and teachers one process hosts, and the steps they run together. No Ray.

The step itself is engine/step.py's ``TrainingStep`` (forward -> gather -> targets -> learn); a worker builds it over
its members, its exchange and its replica of the coordinator. With a collective exchange (or in one process) every
worker computes the same targets from the same gathered outputs, bitwise, so a whole call of steps runs without
leaving the worker: ``run_steps``. With the object-store transport the driver drives the two halves of each step
(``forward``, ``learn``) and one coordinator actor computes the targets in between. With codistillation
(engine/codistill.py) the exchange carries weights every few steps instead, and each worker computes the other peers'
outputs from stale copies.
"""
from __future__ import annotations

from dataclasses import dataclass

from raydistill.engine import grid
from raydistill.engine.coordinator import Coordinator
from raydistill.engine.data import DataView
from raydistill.engine.peer import Peer
from raydistill.engine.step import THROUGH_EXCHANGE, CallReport, LocalMembers, TrainingStep, host_outputs
from raydistill.engine.teacher import Teacher
from raydistill.methods import build_method
from raydistill.names import LOGITS
from raydistill.transports import transport_of


@dataclass(frozen=True)
class Members:
    """Which peers and teachers a worker hosts (global indices); a worker of a peer of several ranks hosts that one
    peer, as rank ``rank`` of ``ranks`` (engine/grid.py)."""
    peers: tuple = ()
    teachers: tuple = ()
    rank: int = 0
    ranks: int = 1

    @classmethod
    def every(cls, config) -> "Members":
        """Every peer and teacher of a run: one worker hosting them all (one process)."""
        return cls(tuple(range(config.num_peers)), tuple(range(config.num_teachers)))


class LocalExchange:
    """A worker that hosts every member: its own outputs are all the outputs. No copy."""
    carries_tensors = True

    def gather(self, tag: str, local: list) -> list:
        return local

    def close(self) -> None:
        pass


class Worker:
    def __init__(self, config, data, spec, members: Members, coordinator: bool = True, exchange=None,
                 layout: list | None = None):
        """data: the run's data set (engine/data.py), opened here on this worker's node; coordinator: hold a replica
        of the coordinator (collective exchange, one process); False where a coordinator actor computes the targets
        (object-store transport); layout: every worker's Members (a run with peers of several ranks puts a peer's
        ranks together from them: engine/grid.py)."""
        self.config = config
        self.members = members
        self.grid = None
        if layout is not None and grid.is_grid(config):
            self.grid = grid.OnTheGrid(layout, grid.share(members, config.train.batch_size), config.num_peers)
        self.method = build_method(config)         # one for the worker: a method holds no per-peer state
        self.data = DataView(config, data.on_node())  # one for the worker: a step's batch is read once for all
        self.peers = [Peer(i, config, self.data, spec, method=self.method, rank=members.rank, ranks=members.ranks)
                      for i in members.peers]
        self.teachers = [Teacher(j, config, self.data, spec, method=self.method) for j in members.teachers]
        self.coordinator = Coordinator(config, self.data, spec, method=self.method) if coordinator else None
        stack = None
        if config.resources.peer_execution == "stacked" and self.peers:
            from raydistill.engine.stack import PeerStack

            stack = PeerStack(self.peers)
        self.local = LocalMembers(self.peers, self.teachers, stack)
        self.codistill = None
        if transport_of(config).stale_copies and self.peers:
            from raydistill.engine.codistill import Codistillation

            self.codistill = Codistillation(config, spec, self.peers)
        self.exchange = exchange or LocalExchange()
        self.training_step = self.step_over(self.exchange)

    @property
    def stack(self):
        """The PeerStack that runs the peers as one batched model, or None (one after another)."""
        return self.local.stack

    def data_source(self) -> str:
        """Where this worker reads the run's data set from (a prepared set's folder or node cache, or memory)."""
        return self.data.source()

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
        return [host_outputs(o) for o in self.local.forward(epoch, step, replay)]

    def learn(self, epoch: int, step: int, targets: list[dict]) -> dict[int, dict]:
        """targets: one dict per local peer, in order. Returns each local peer's step metrics, as numbers."""
        return {index: figures.host() for index, figures in self.local.learn(epoch, step, targets).items()}

    # ---- whole calls (a collective exchange, or one process) -------------------------------------------------------
    def run_steps(self, epoch: int, first: int, count: int, replay: int = 0, on_step=None) -> CallReport:
        """Steps first..first+count-1 of an epoch (of its replay-th replay); the figures come back once, read at the
        end of the call. on_step(done): told as each step is run (a progress line)."""
        return self.training_step.call(epoch, first, count, replay, on_step).finish()

    def steps_done(self) -> int:
        """Steps of the current call run so far by the host (a progress line's side channel; no device sync)."""
        return getattr(self.training_step, "steps_done", 0)

    def prepare_epoch(self, epoch: int) -> None:
        """Work that must not sit between two collectives: a cached teacher's outputs for the epoch."""
        for teacher in self.teachers:
            if teacher.cache is not None:
                teacher.cache.precompute([epoch])

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @property
    def first_ranks(self) -> list:
        """The local peers whose state, evaluation and export stand for their peer: all of them, but rank 0 only of
        a peer of several ranks (its ranks agree)."""
        return [p for p in self.peers if p.rank == 0]

    def evaluate_outputs(self, split: str) -> list[dict]:
        """The local members' outputs on a split: each peer's {logits[, ema_logits]}, each teacher's {logits}."""
        return [p.evaluate(split) for p in self.first_ranks] + [{LOGITS: t.evaluate(split)} for t in self.teachers]

    def evaluate(self, split: str) -> dict:
        """The figures of every member and the ensemble, computed by this worker's coordinator replica."""
        outputs = self.exchange.gather(f"eval-{split}", self.evaluate_outputs(split))
        return self.coordinator.evaluate(split, *outputs)

    # ---- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        peers = {p.index: p.state_dict() for p in self.first_ranks}
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
        return {name: entry for p in self.first_ranks for name, entry in p.export().items()}

    def step_over(self, exchange) -> TrainingStep:
        """The training step of this worker's members over an exchange (the other peers' outputs through it, or from
        codistillation's stale copies, refreshed through it)."""
        if self.grid is not None:                       # a rank's peer agrees with its other ranks over its group
            self.local.agree = (lambda peer, what: (grid.sync_over if what == "gradients" else grid.buffers_over)(
                exchange, peer)) if self.members.ranks > 1 else None
        return TrainingStep(self.local, self.coordinator, exchange, self.codistill or self.grid or THROUGH_EXCHANGE)

    def set_exchange(self, exchange) -> None:
        """Exchanges through ``exchange`` from now on (None: this worker alone)."""
        self.exchange.close()
        self.exchange = exchange or LocalExchange()
        if self.config.train.sync_bn and self.members.ranks > 1 and exchange is not None:
            for peer in self.peers:                 # batch norm over the peer's ranks (GPUs: config refuses CPUs)
                grid.sync_batch_norm(peer, exchange.peer_groups[peer.index][0])
        self.training_step = self.step_over(self.exchange)
        if self.codistill is not None:
            self.codistill.invalidate()
