"""Ray tasks for work that is not a run: a prepare's decode tasks on a cluster's nodes (``raydistill data prepare
--address``, data/prepare.py takes them as its executor): the same functions as the local worker processes, results taken back in task order, a window of tasks in flight. The source
files must be readable at the same path on every node (a shared filesystem); the results come back to the writer
through the object store."""
from __future__ import annotations

from collections import deque

IN_FLIGHT_PER_CPU = 2          # tasks in flight per CPU of the cluster: every core busy while results come back


class RayTasks:
    """``workers``: tasks at once (default: twice the cluster's CPUs, so that every core stays busy)."""

    def __init__(self, address: str | None, run_task, workers: int | None = None, local_cpus: int | None = None):
        """address None: a local Ray of ``local_cpus`` CPUs, started here (the data bench)."""
        import ray

        self._ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            local = {"num_cpus": local_cpus, "include_dashboard": False} if address is None else {}
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, **local)
        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = workers or IN_FLIGHT_PER_CPU * self.cpus
        self._remote = ray.remote(num_cpus=1)(run_task)

    def describe(self) -> str:
        nodes = len([n for n in self._ray.nodes() if n.get("Alive")])
        return f"Ray tasks ({self.in_flight} at once; {self.cpus} CPUs on {nodes} node{'s' if nodes != 1 else ''})"

    def imap(self, tasks):
        in_flight = deque()
        for task in tasks:
            in_flight.append(self._remote.remote(task))
            if len(in_flight) >= self.in_flight:
                yield self._ray.get(in_flight.popleft())
        while in_flight:
            yield self._ray.get(in_flight.popleft())

    def close(self, finished: bool) -> None:
        if self.started:
            self._ray.shutdown()
