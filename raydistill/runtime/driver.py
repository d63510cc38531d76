"""The Ray runtime: connects to Ray, reserves one placement group for the run, starts the workers (``RayWorkers``),
carries out the loop's calls on them and recovers them after a failure. ``runtime/launch.py``'s ``train()`` is the
one entry the CLI, Tune and notebooks call.

Ray keeps placement, lifecycle, failures, checkpoints and metrics; it leaves the step loop. Each worker actor runs a
whole call of steps (``run_steps``), exchanging its members' outputs with the other workers through a torch.distributed
group (the collective transport), so a step costs no Ray call at all. The object-store transport, the reference and
the fallback, drives every step from here: forward on every worker, the coordinator actor's targets, learn.
"""
from __future__ import annotations

import os
import threading
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raydistill.engine.data import describe_sources
from raydistill.engine.worker import CallReport
from raydistill.engine.checkpoint import COORDINATOR, PEERS
from raydistill.errors import ConfigError, user_error
from raydistill.names import teacher_name
from raydistill.runtime import placement, session
from raydistill.runtime.actors import CoordinatorActor, WorkerActor
from raydistill.runtime.collective import CollectiveError
from raydistill.transports import transport_of
from raydistill.runtime.console import Console
from raydistill.runtime.objectstore import drive_steps
from raydistill.policies.failures import WorkerGivenUp, WorkerLost

PLACEMENT_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 600.0
PROGRESS_S = 0.25                # how often a progress line asks worker 0 how far a call of steps is          # workers import torch and build their models: minutes on a loaded small machine

LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError,
        ray.exceptions.OwnerDiedError)


def connect(config, console: Console | None = None, verbose: bool = False) -> bool:
    """Connects to resources.address, or starts a local Ray for the run. Returns True when this call started Ray."""
    return session.connect(config, console or Console(False), verbose)


def actor_name(config, role: str, generation: int = 0) -> str:
    """Actors are named after the run and the driver's process, so tools can find them; the workers started again
    for a changed peer set are a new generation (g1/worker0, ...). A worker kept warm (the test suite's pool) keeps
    the name of the run that started it: ``find_actor`` finds a run's actors whatever their names."""
    return f"raydistill/{config.name}/{os.getpid()}/{f'g{generation}/' if generation else ''}{role}"


def find_actor(config, role: str):
    """The live actor of a run of this process ("worker1", "coordinator"): its newest generation's, whether started
    for it or taken warm from the pool; None while the run has no actors."""
    workers = _LIVE.get(config.name)
    if workers is None:
        return None
    if role == "coordinator":
        return workers.coordinator
    rank = int(role.removeprefix("worker"))
    return workers.workers[rank] if rank < len(workers.workers) else None


def _cause(err: BaseException) -> BaseException:
    return getattr(err, "cause", None) or err


def classify(err: BaseException) -> str:
    """What a failed call means for the run: "user" (bad input), "lost" (a process or node died, or the group broke
    because one did), or "error" (anything else: raised as it is)."""
    if user_error(err) is not None:
        return "user"
    if isinstance(err, (*LOST, WorkerLost)) or isinstance(_cause(err), (*LOST, CollectiveError)):
        return "lost"
    return "error"


class RayWorkers:
    """The run's workers (and, for the object-store transport, its coordinator) as Ray actors in one placement group."""

    def __init__(self, config, spec, data, group=None, driver_cpus: float = 0.0, console: Console | None = None,
                 shared_memory: bool = True, generation: int = 0):
        """group: an existing placement group laid out as placement.layout(config, driver_cpus) (a Tune trial's);
        None: reserve one. shared_memory: False sends the step's exchange through gloo even on one node (benchmarks).
        generation: how many times the run's peer set has changed in this process (it names the actors)."""
        self.shared_memory = shared_memory
        self.generation = generation
        self.config = config
        self.console = console or Console(False)
        self.transport = transport_of(config)
        self.layout = placement.layout(config, driver_cpus)
        self.members = self.layout.members
        self.num_teachers = config.num_teachers
        self.owns_group = group is None
        self.spec = spec
        tic = time.perf_counter()
        self.workers, self.coordinator = [], None
        warm = _POOL.take(self._pool_key()) if group is None else None
        if warm is not None:                       # the last run's workers of this process, kept warm (tests)
            group, self.workers, self.coordinator = warm
        elif group is None:
            _POOL.clear()                          # their bundles would keep this run's from being placed
            placement.check_capacity(config, ray.cluster_resources(), [n for n in ray.nodes() if n["Alive"]])
            name = f"raydistill-{config.name}-{os.getpid()}" + (f"-g{generation}" if generation else "")
            group = placement_group(self.layout.bundles, strategy=config.resources.strategy, name=name)
        self.group = group
        try:
            self._wait_placed()
            self._start(data)
            self.setup()
            try:
                self.form_group()
            except WorkerLost as err:
                raise ConfigError("resources.transport", config.resources.transport,
                                  f"the workers could not form a collective group ({err.__cause__ or err}); "
                                  "set resources.transport=object_store") from None
            # where each node reads a prepared set from (its folder, or its node-local copy)
            sources = None if data.resident else self.results([w.data_source.remote() for w in self.workers])
        except BaseException:
            self.shutdown(keep=False)
            raise
        self.console.line(f"{len(self.workers)} workers ready in {time.perf_counter() - tic:.1f}s "
                          f"({self.describe()})")
        if sources is not None:
            self.console.line(describe_sources(data, self._nodes, sources))

    @property
    def transport_name(self) -> str:
        return self.transport.name

    def describe(self) -> str:
        names = self.config.peer_names
        hosted = ", ".join("+".join([names[i] + (f" rank {m.rank}/{m.ranks}" if m.ranks > 1 else "")
                                     for i in m.peers] + [teacher_name(i) for i in m.teachers])
                           for m in self.members)
        return f"transport {self.transport.name}; workers: {hosted}"

    def _wait_placed(self) -> None:
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise ConfigError("resources", placement.required(self.config),
                              f"the cluster could not place the run's bundles {self.layout.bundles} with "
                              f"strategy {self.config.resources.strategy} within {PLACEMENT_TIMEOUT_S:.0f}s; "
                              f"available: {ray.available_resources()}")

    def _start(self, data) -> None:
        """The actors (unless kept warm from the last run), empty until ``setup``."""
        r = self.config.resources
        # once: every actor on a node maps the same in-memory arrays; a prepared set travels as its handle (index
        # and labels, no image). Held for the whole run: a restarted actor is built again from it.
        self.data_ref = ray.put(data)
        if self.workers:
            _LIVE[self.config.name] = self
            return
        restartable = {"max_restarts": r.max_restarts, "max_task_retries": 0}
        for rank, (members, bundle) in enumerate(zip(self.members, self.layout.workers)):
            need = placement.worker_bundle(self.config, members)
            self.workers.append(WorkerActor.options(
                num_cpus=need["CPU"], num_gpus=need.get("GPU", 0), scheduling_strategy=self._bundle(bundle),
                name=actor_name(self.config, f"worker{rank}", self.generation), runtime_env=self._hide_gpus(need),
                **restartable).remote())
        if self.transport.coordinator_actor:
            # the coordinator needs no GPU; Ray no longer hides GPUs from 0-GPU actors, so hide them here
            self.coordinator = CoordinatorActor.options(
                num_cpus=r.cpus_per_coordinator, num_gpus=0, scheduling_strategy=self._bundle(self.layout.head),
                name=actor_name(self.config, "coordinator", self.generation), runtime_env=self._hide_gpus({}),
                **restartable).remote()
        _LIVE[self.config.name] = self

    def setup(self) -> None:
        """Every worker opens the run's data set on its node and builds its peers and teachers over it, and the
        coordinator actor itself (a restarted one builds them again: Ray restarts an actor empty)."""
        self._identities = None                 # being renewed: an error in a restarted worker's setup is its own
        replicas = not self.transport.coordinator_actor
        calls = [w.setup.remote(self.data_ref, self.config, self.spec, members, replicas, self.members)
                 for w, members in zip(self.workers, self.members)]
        if self.coordinator is not None:
            calls.append(self.coordinator.setup.remote(self.config, self.data_ref, self.spec,
                                                       [m for m in self.members if m.peers]))
        self._nodes = self.results(calls, READY_TIMEOUT_S)[:len(self.workers)]
        self._identities = self._identify()

    def _hide_gpus(self, need: dict) -> dict | None:
        """A CPU-only actor sees no GPU (Ray no longer hides them from 0-GPU actors); on a cluster without GPUs there
        is nothing to hide, and an actor without a runtime_env can take one of Ray's idle workers."""
        if need.get("GPU") or not ray.cluster_resources().get("GPU"):
            return None
        return {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)

    def _actors(self) -> list:
        return [*self.workers, *([self.coordinator] if self.coordinator is not None else [])]

    # ---- calls ----------------------------------------------------------------------------------------------------
    def results(self, refs: list, timeout: float | None = None, hung=None) -> list:
        """Every call's result, after every call has ended (none is left running into a broken group): a ConfigError
        raised in an actor as itself, a lost actor or broken group as WorkerLost, anything else as it was raised.
        Calls still running at the timeout hang: their actors are killed (Ray restarts them), found by ``hung``
        (pending refs -> actors) or, by default, by position (refs[i] is a call of worker i)."""
        pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
        failures = []
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                break
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as err:  # noqa: BLE001 — sorted below
                    failures.append(err)
                    if deadline is None:      # the others end within the collective timeout (and a step's
                        timeout_s = self.config.resources.collective_timeout_s      # compute) once one has failed
                        deadline = time.monotonic() + timeout_s + min(30.0, timeout_s + 5.0)
        if pending:                           # calls that never ended: their worker hangs; restart it
            actors = hung(pending) if hung is not None else [self.workers[refs.index(ref)] for ref in pending
                                                              if refs.index(ref) < len(self.workers)]
            for actor in actors:
                ray.kill(actor, no_restart=False)
            failures.append(WorkerLost(f"{len(pending)} call(s) did not end in time: their worker hangs, restarted"))
        if failures:
            self._raise(failures)
        return ray.get(refs)

    def _raise(self, failures: list) -> None:
        kinds = [classify(err) for err in failures]
        for kind, err in zip(kinds, failures):
            if kind == "user":
                raise user_error(err) from None
        for kind, err in zip(kinds, failures):
            if kind == "error":
                self.check_restarted()        # a worker restarted between calls fails its next call: not set up
                raise err
        lost = failures[0]
        if isinstance(lost, WorkerLost):
            raise lost
        raise WorkerLost(type(_cause(lost)).__name__) from lost

    def _identify(self) -> list:
        """(node, pid) of every actor. Asked between calls, so each answers at once: a worker that does not within
        the collective timeout hangs (a stopped process), and is restarted as a hung call's worker is."""
        actors = self._actors()
        found = self.results([a.node.remote() for a in actors] + [a.pid.remote() for a in actors],
                              self.config.resources.collective_timeout_s)
        return list(zip(found[:len(actors)], found[len(actors):]))

    def check_restarted(self) -> None:
        """Raises WorkerLost if an actor was restarted since setup. Ray restarts an actor that died between two calls
        without telling the driver, and hands it the next call: a worker that was never set up, or a coordinator
        with a fresh state that would go on silently."""
        known = getattr(self, "_identities", None)
        if known is None:
            return
        names = [f"worker{i}" for i in range(len(self.workers))] + (["coordinator"] if self.coordinator else [])
        changed = [name for name, before, now in zip(names, known, self._identify()) if before != now]
        if changed:
            raise WorkerLost(f"{', '.join(changed)} restarted between calls")

    # ---- the group ------------------------------------------------------------------------------------------------
    def form_group(self) -> None:
        """A new torch.distributed group over the workers on a new port (a restarted rank cannot rejoin an old one)."""
        if not self.transport.forms_group or len(self.workers) < 2:
            return
        timeout = self.config.resources.collective_timeout_s
        address, port = ray.get(self.workers[0].address.remote(), timeout=READY_TIMEOUT_S)
        one_node = len(set(self._nodes)) == 1 and self.shared_memory   # then the step's data go through /dev/shm
        peer_groups = {}                        # a peer of several ranks: its workers' group ranks
        for rank, members in enumerate(self.members):
            if members.ranks > 1:
                peer_groups.setdefault(members.peers[0], []).append(rank)
        self.results([w.join_group.remote(rank, len(self.workers), address, port, timeout, one_node, peer_groups)
                       for rank, w in enumerate(self.workers)], timeout + 30.0)

    def leave_group(self, timeout: float = 30.0) -> None:
        if not self.transport.forms_group or len(self.workers) < 2:
            return
        refs = [w.leave_group.remote() for w in self.workers]
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 — a dead or restarting worker has no group to leave
                pass

    # ---- the loop's protocol ----------------------------------------------------------------------------------------
    def run_steps(self, epoch: int, first: int, count: int, replay: int = 0, on_step=None) -> CallReport:
        """on_step(done): told the steps worker 0 has run, a few times a second while the call runs (the object
        store's driver knows each step it drives)."""
        self.check_restarted()
        if self.transport.workers_drive:
            refs = [w.run_steps.remote(epoch, first, count, replay) for w in self.workers]
            if on_step is not None:
                self._follow(refs, on_step)
            return _merge(self.results(refs))
        return drive_steps(self, epoch, first, count, replay, on_step)

    def _follow(self, refs: list, on_step) -> None:
        """Until the call's first result: worker 0's steps done, every PROGRESS_S."""
        while not ray.wait(refs, num_returns=1, timeout=PROGRESS_S)[0]:
            try:
                on_step(ray.get(self.workers[0].steps_done.remote(), timeout=PROGRESS_S))
            except (ray.exceptions.GetTimeoutError, *LOST):
                return                          # the call's own result says what happened

    def prepare_epoch(self, epoch: int) -> None:
        if any(t.cache for t in self.config.teacher_list):
            self.results([w.prepare_epoch.remote(epoch) for w in self.workers])

    def evaluate(self, split: str) -> dict:
        if not self.transport.coordinator_actor:
            return self.results([w.evaluate.remote(split) for w in self.workers])[0]
        outputs = [w.evaluate_outputs.remote(split) for w in self.workers]
        return self.results([self.coordinator.evaluate.remote(split, *outputs)])[0]

    def get_state(self) -> dict:
        states = self.results([w.state_dict.remote() for w in self.workers])
        peers = {i: s for state in states for i, s in state[PEERS].items()}
        coordinator = (states[0][COORDINATOR] if self.coordinator is None
                       else self.results([self.coordinator.state_dict.remote()])[0])
        self.check_restarted()                  # the states are those of the actors that were set up
        return {PEERS: [peers[i] for i in range(self.config.num_peers)], COORDINATOR: coordinator}

    def set_state(self, state: dict) -> None:
        replica = state[COORDINATOR] if self.coordinator is None else None
        calls = [w.load_state_dict.remote({PEERS: {i: state[PEERS][i] for i in m.peers}, COORDINATOR: replica})
                 for w, m in zip(self.workers, self.members)]
        if self.coordinator is not None:
            calls.append(self.coordinator.load_state_dict.remote(state[COORDINATOR]))
        self.results(calls)

    def export(self) -> dict:
        parts = self.results([w.export.remote() for w in self.workers])
        return {name: entry for part in parts for name, entry in part.items()}

    def check_room(self, config) -> None:
        """Refuses (ConfigError) a peer set the cluster could not hold even with this run's workers gone, before
        they are stopped (elastic peers)."""
        placement.check_capacity(config, ray.cluster_resources(), [n for n in ray.nodes() if n["Alive"]])

    def recover(self, timeout: float) -> None:
        """After a lost worker: the old group closed on every survivor, every actor answering again (Ray restarts a
        dead one, on a replacement node if its node is gone), a new group formed."""
        self.leave_group()
        self.wait_ready(timeout)
        self.setup()
        self.form_group()

    def wait_ready(self, timeout: float) -> None:
        """Waits until every actor answers again; raises WorkerGivenUp at once for an actor Ray will not restart (its
        max_restarts spent), TimeoutError when one does not come back within ``timeout`` (no room for its bundle)."""
        deadline = time.monotonic() + timeout
        names = [f"worker{i}" for i in range(len(self.workers))] + (["coordinator"] if self.coordinator else [])
        for name, actor in zip(names, self._actors()):
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{name} did not come back within resources.node_wait_s={timeout:g}s "
                                       "(no node with room for its bundle, or past resources.max_restarts)")
                try:
                    ray.get(actor.node.remote(), timeout=min(left, 10.0))
                    break
                except ray.exceptions.GetTimeoutError:
                    continue
                except LOST:                # restarting (it answers soon), or dead for good
                    if _given_up(actor):
                        limit = self.config.resources.max_restarts
                        raise WorkerGivenUp(f"{name} died and Ray will not restart it (Ray restarts each worker at "
                                            f"most resources.max_restarts={limit} time{'s' if limit != 1 else ''})"
                                            ) from None
                    time.sleep(min(left, 0.5))

    def nodes(self) -> dict:
        by_peer, by_teacher = {}, {}
        for node, members in zip(self._nodes, self.members):
            by_peer.update({i: node for i in members.peers if members.rank == 0})      # a peer's rank 0's node
            by_teacher.update({i: node for i in members.teachers})
        return {"peers": [by_peer[i] for i in range(self.config.num_peers)],
                "teachers": [by_teacher[i] for i in range(self.num_teachers)],
                "workers": list(self._nodes)}

    def _pool_key(self) -> tuple:
        """What a warm set must share with the run that takes it: this process's Ray session, its number of workers
        (and bundles), their GPUs, the strategy, the restarts, the transport's actors. Not the actors' names or
        CPUs: every run builds its workers anew in ``setup`` and sets their threads itself."""
        bundles = self.layout.bundles
        gpus = tuple(bundle.get("GPU", 0) for bundle in bundles)
        return (_session(), len(self.members), len(bundles), gpus, self.config.resources.strategy,
                self.config.resources.max_restarts, self.transport.coordinator_actor)

    def shutdown(self, keep: bool = True) -> None:
        """The workers and their placement group go (once); with the pool on (RAYDISTILL_KEEP_WORKERS=1), workers
        that all answer are kept warm, empty, for the next run of this process that has their shape."""
        if getattr(self, "group", None) is None and not self.workers:
            return
        if _LIVE.get(self.config.name) is self:
            del _LIVE[self.config.name]
        if self.workers:
            self.leave_group(timeout=5.0)       # the group's shared-memory folder goes with it
        if keep and self.owns_group and _POOL.enabled and self._all_answer():
            _POOL.park(self._pool_key(), self.group, self.workers, self.coordinator)
        else:
            for actor in self._actors():
                ray.kill(actor, no_restart=True)
            if self.owns_group and getattr(self, "group", None) is not None:
                remove_placement_group(self.group)
        self.group, self.workers, self.coordinator = None, [], None

    def _all_answer(self) -> bool:
        """Every actor alive, never restarted since setup, and emptied (reset) within a few seconds."""
        if getattr(self, "_identities", None) is None:
            return False
        try:
            if [tuple(i) for i in self._identify()] != [tuple(i) for i in self._identities]:
                return False
            ray.get([a.reset.remote() for a in self._actors()], timeout=10)
            return True
        except Exception:  # noqa: BLE001 — anything amiss: not kept
            return False


class WorkerPool:
    """The last run's workers of this process, kept warm for the next run of this process with their shape (see
    ``RayWorkers._pool_key``), whatever its name: starting a worker process and importing torch is most of a run's
    start on a small machine. Off unless RAYDISTILL_KEEP_WORKERS=1 (the test suite, which runs hundreds of short runs
    in one process). At most one set is kept; a run of another shape removes it before placing its own. A taken set
    keeps its actors' names and bundles (find_actor finds a run's actors)."""

    def __init__(self):
        self.kept = None
        self.lock = threading.Lock()            # runs of several threads of one process (parallel jobs)

    @property
    def enabled(self) -> bool:
        return os.environ.get(KEEP_WORKERS) == "1"

    def park(self, key, group, workers, coordinator) -> None:
        self.clear()
        with self.lock:
            self.kept = (key, group, workers, coordinator)

    def take(self, key):
        with self.lock:
            if self.kept is None or self.kept[0] != key:
                return None
            _, group, workers, coordinator = self.kept
            self.kept = None
        try:                                    # each still answers (this Ray session's, not restarted away)
            ray.get([a.pid.remote() for a in [*workers, *([coordinator] if coordinator else [])]], timeout=10)
        except Exception:  # noqa: BLE001 — not kept then: a fresh set is started
            self.kept = (key, group, workers, coordinator)
            self.clear()
            return None
        return group, workers, coordinator

    def clear(self) -> None:
        """The kept workers go (if they belong to this process's Ray session still: another one took them along)."""
        with self.lock:
            if self.kept is None:
                return
            key, group, workers, coordinator = self.kept
            self.kept = None
        if not ray.is_initialized() or key[0] != _session():
            return
        try:
            for actor in [*workers, *([coordinator] if coordinator is not None else [])]:
                ray.kill(actor, no_restart=True)
            remove_placement_group(group)
        except Exception:  # noqa: BLE001 — gone with their session already
            pass


def _session() -> str:
    """This process's Ray session (a new ray.init is another one, whatever its job id)."""
    context = ray.get_runtime_context()
    return f"{context.gcs_address}/{context.get_node_id()}"


def release_warm_workers() -> None:
    """The workers kept warm go now (before anything else wants their bundles: a Tune search's trials)."""
    _POOL.clear()


KEEP_WORKERS = "RAYDISTILL_KEEP_WORKERS"
_POOL = WorkerPool()
_LIVE: dict = {}            # run name -> its RayWorkers now (find_actor)


def _given_up(actor) -> bool:
    """Whether Ray has given an actor up for good (dead, no restart left), as the GCS says."""
    from ray._private import state

    try:
        info = state.actors(actor_id=actor._actor_id.hex())
    except Exception:  # noqa: BLE001 — the GCS unreachable: not known to be given up; the deadline decides
        return False
    return bool(info) and info.get("State") == "DEAD"


def _merge(reports: list[CallReport]) -> CallReport:
    merged = CallReport()
    for report in reports:
        merged.merge(report)
    merged.nonfinite.sort()
    return merged
