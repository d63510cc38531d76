"""The object-store transport's step loop, the reference and the fallback: the driver drives every step.

Each step is three rounds of actor calls: ``forward`` on every worker (its members' outputs as numpy arrays in the
object store, shared zero-copy on a node), the coordinator actor's ``targets`` (one return value per worker,
``num_returns``), ``learn`` on every worker; at most ``train.steps_in_flight`` steps outstanding. The workers run the
two halves of the engine's step (engine/worker.py ``forward`` and ``learn``) that a whole call runs in one piece.
"""
from __future__ import annotations

from collections import deque

import ray

from raydistill.engine.worker import CallReport


def drive_steps(workers, epoch: int, first: int, count: int, replay: int, on_step=None) -> CallReport:
    """Steps first..first+count-1 of ``workers`` (driver.RayWorkers): three rounds of calls per step, at most
    train.steps_in_flight steps outstanding."""
    actors, coordinator = workers.workers, workers.coordinator
    report, pending = CallReport(), deque()
    learners = [i for i, m in enumerate(workers.members) if m.peers]
    calls = StepCalls(len(actors))
    stall_s = workers.config.resources.collective_timeout_s     # a step computes within it, as with a collective
    try:
        for step in range(first, first + count):
            outputs = [w.forward.remote(epoch, step, replay) for w in actors]
            targets = coordinator.targets.options(num_returns=len(learners)).remote(epoch, step, *outputs,
                                                                                    replay=replay)
            targets = targets if len(learners) > 1 else [targets]
            learns = [actors[i].learn.remote(epoch, step, t) for i, t in zip(learners, targets)]
            calls.add(outputs, targets, learners, learns)
            pending.append((step, learns))
            while len(pending) > workers.config.train.steps_in_flight or (pending and step == first + count - 1):
                done_step, refs = pending.popleft()
                parts = workers.results(refs, stall_s + min(30.0, stall_s + 5.0),
                                        hung=lambda _: calls.hung(actors, coordinator))
                report.add_step(epoch, done_step, {i: m for part in parts for i, m in part.items()})
                calls.forget_done()
                if on_step is not None:
                    on_step(done_step - first + 1)
    except BaseException:
        _drain([ref for _, refs in pending for ref in refs])
        raise
    return report


class StepCalls:
    """The object-store transport's calls in flight, per actor in submission order, to tell which actor hangs when a
    step does not end: a worker whose oldest unfinished call is a forward, or a learn whose targets are there; the
    coordinator when a step's forwards are all done and its targets are not. A worker whose learn waits for targets
    only waits (an actor runs its calls in order, so its next forward waits behind that learn)."""

    def __init__(self, workers: int):
        self.queues = [deque() for _ in range(workers)]      # per worker: (ref, the targets it waits for, or None)
        self.steps = deque()                                  # (forward refs, targets refs) per step

    def add(self, outputs: list, targets: list, learners: list, learns: list) -> None:
        for queue, ref in zip(self.queues, outputs):
            queue.append((ref, None))
        for i, target, ref in zip(learners, targets, learns):
            self.queues[i].append((ref, target))
        self.steps.append((outputs, targets))

    @staticmethod
    def _done(ref) -> bool:
        return bool(ray.wait([ref], timeout=0)[0])

    def forget_done(self) -> None:
        for queue in self.queues:
            while queue and self._done(queue[0][0]):
                queue.popleft()
        while self.steps and all(self._done(ref) for ref in self.steps[0][1]):
            self.steps.popleft()

    def hung(self, workers: list, coordinator) -> list:
        actors = []
        for worker, queue in zip(workers, self.queues):
            waiting = next(((ref, target) for ref, target in queue if not self._done(ref)), None)
            if waiting is not None and (waiting[1] is None or self._done(waiting[1])):
                actors.append(worker)
        if not actors and any(all(self._done(ref) for ref in outputs) and not all(self._done(t) for t in targets)
                              for outputs, targets in self.steps):
            actors.append(coordinator)
        return actors


def _drain(refs: list) -> None:
    """Waits (briefly) for calls that are no longer wanted and reads their errors, so none is reported as unhandled."""
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=30.0)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 — the failure that mattered is being handled already
                pass
