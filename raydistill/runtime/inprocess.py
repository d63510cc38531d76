"""The same protocol in one process, over the very same engine objects: the reference, and a debugging aid.

One engine Worker hosts every peer and teacher and the coordinator; its exchange is the identity. The Ray runtime's
workers run this very code, each over its share of the members, with a collective exchange in between.

A run with peers of several ranks (engine/grid.py) is the grid in one process: the workers Ray would start (laid out
by runtime/placement.py), stepping together phase by phase, their exchange the concatenation of what each sends, a
peer's ranks agreeing on their gradients and buffers exactly as their group makes them agree on Ray.
"""
from __future__ import annotations

import copy

import torch

from raydistill.engine import grid
from raydistill.engine.checkpoint import COORDINATOR, PEERS
from raydistill.engine.step import backward, update
from raydistill.engine.worker import CallReport, Members, Worker


class InProcessWorkers:
    transport_name = "inprocess"

    def __init__(self, config, spec, data):
        torch.set_num_threads(config.resources.threads_per_peer)
        self.config = config
        self.num_teachers = config.num_teachers
        if grid.is_grid(config):
            from raydistill.runtime.placement import worker_members

            layout = worker_members(config)
            self.group = InProcessGroup()
            self.workers = [Worker(config, data, spec, members, exchange=self.group, layout=layout)
                            for members in layout]
        else:
            members = Members(tuple(range(config.num_peers)), tuple(range(self.num_teachers)))
            self.group, self.workers = None, [Worker(config, data, spec, members)]

    @property
    def worker(self) -> Worker:
        """The one worker of a run without peers of several ranks (tests and tools reach its members)."""
        return self.workers[0]

    def describe(self) -> str:
        return "one process" if self.group is None else f"one process, {len(self.workers)} workers of a grid"

    def run_steps(self, epoch: int, first: int, count: int, replay: int = 0, on_step=None) -> CallReport:
        if self.group is None:
            return self.worker.run_steps(epoch, first, count, replay, on_step)
        reports = [CallReport() for _ in self.workers]
        for done, step in enumerate(range(first, first + count), start=1):
            for report, figures in zip(reports, self.grid_step(epoch, step, replay)):
                report.add_device_step(epoch, step, figures)
            if on_step is not None:
                on_step(done)
        merged = CallReport()
        for report in reports:                     # as the driver merges the workers' reports
            merged.merge(report.finish())
        merged.nonfinite.sort()
        return merged

    def grid_step(self, epoch: int, step: int, replay: int) -> list[dict]:
        """One step of every worker, phase by phase: forwards, the exchange, targets, backwards, the ranks'
        agreement (gradients summed in rank order, rank 0's buffers), updates. Each worker's figures by peer."""
        steps = [w.training_step for w in self.workers]
        outputs = [s.forward(epoch, step, replay) for s in steps]
        self.group.sent = [o for sent in outputs for o in sent]
        targets = [s.targets(epoch, step, replay, s.gather(epoch, step, replay, o)) for s, o in zip(steps, outputs)]
        figures = [{p.index: backward(p, epoch, step, t) for p, t in zip(w.peers, ts)}
                   for w, ts in zip(self.workers, targets)]
        ranks = {}
        for w in self.workers:
            if w.members.ranks > 1:
                ranks.setdefault(w.peers[0].index, []).append(w.peers[0])
        for replicas in ranks.values():
            if replicas[0].optimizer_step_due(step):
                average = grid.combine([grid.flat_gradients(p) for p in replicas])
                buffers = grid.flat_buffers(replicas[0])
                for p in replicas:
                    grid.set_gradients(p, average)
                    grid.set_buffers(p, buffers)
        for w in self.workers:
            for peer in w.peers:
                if peer.optimizer_step_due(step):
                    update(peer)
        return figures

    def prepare_epoch(self, epoch: int) -> None:
        for w in self.workers:
            w.prepare_epoch(epoch)

    def evaluate(self, split: str) -> dict:
        if self.group is None:
            return self.worker.evaluate(split)
        self.group.sent = [o for w in self.workers for o in w.evaluate_outputs(split)]
        results = [w.evaluate(split) for w in self.workers]     # every replica records (its peers' val losses)
        return results[0]

    def get_state(self) -> dict:
        peers, coordinator = {}, None
        for w in self.workers:
            state = w.state_dict()
            peers.update(state[PEERS])
            coordinator = state[COORDINATOR] if coordinator is None else coordinator
        return {PEERS: [peers[i] for i in range(self.config.num_peers)], COORDINATOR: coordinator}

    def set_state(self, state: dict) -> None:
        # a copy, as Ray's object store hands its workers: a loaded optimizer keeps the tensors it is given, and
        # training would change a rollback point kept in memory (its second use would then differ from Ray's)
        for w in self.workers:
            copied = copy.deepcopy(state)
            w.load_state_dict({PEERS: dict(enumerate(copied[PEERS])), COORDINATOR: copied[COORDINATOR]})

    def export(self) -> dict:
        return {name: entry for w in self.workers for name, entry in w.export().items()}

    def check_room(self, config) -> None:
        pass                                        # one process holds any peer set

    def recover(self, timeout: float) -> None:
        pass                                        # nothing here can be lost without losing the driver too

    def nodes(self) -> dict:
        return {"peers": ["local"] * self.config.num_peers, "teachers": ["local"] * self.num_teachers,
                "workers": ["local"] * len(self.workers)}

    def shutdown(self) -> None:
        pass


class InProcessGroup:
    """The exchange of the grid's workers in one process: each worker's gather returns what every worker sent
    (``sent``, set by InProcessWorkers before the workers gather), as a collective's all-gather would."""
    carries_tensors = True

    def __init__(self):
        self.sent = []

    def gather(self, tag: str, local: list) -> list:
        return self.sent

    def close(self) -> None:
        pass
