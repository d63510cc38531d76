"""The driver: connects to Ray, reserves one placement group for the run, starts the actors, runs the loop.

``train()`` is the one entry the CLI, Tune and notebooks call; ``runtime="inprocess"`` runs the same engine objects in
this process instead of actors.
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
import shutil
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raydistill.config import Config, dump_config, load_config
from raydistill.engine.checkpoint import check_compatible, latest_checkpoint, load_checkpoint
from raydistill.engine.data import load_run_data
from raydistill.engine.storage import resolve_storage
from raydistill.engine.teacher import load_teacher_weights
from raydistill.errors import ConfigError
from raydistill.runtime import placement
from raydistill.runtime.actors import CoordinatorActor, PeerActor, TeacherActor
from raydistill.runtime.inprocess import InProcessWorkers, labels_of
from raydistill.runtime.loop import Console, Run, RunResult, WorkerLost
from raydistill.runtime.transport import ObjectStoreTransport

RUNTIMES = ("ray", "inprocess")
PLACEMENT_TIMEOUT_S = 60.0


def connect(config) -> bool:
    """Connects to resources.address, or starts a local Ray for the run. Returns True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = config.resources.address
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **({} if address.startswith("ray://") else quiet))
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError("resources.address", address, f"cannot connect to a Ray cluster there ({err})") from None
        return True
    # A local cluster for this run: enough logical CPUs for every bundle even on a small laptop.
    cpus = max(os.cpu_count() or 1, placement.local_cpus_needed(config))
    ray.init(address="local", num_cpus=cpus, **quiet)       # a new local cluster, never a stranger's
    return True


LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError,
        ray.exceptions.OwnerDiedError)


def actor_name(config, role: str) -> str:
    """Actors are named after the run and the driver's process, so tools (and failure drills) can find them."""
    return f"raydistill/{config.name}/{os.getpid()}/{role}"


class RayWorkers:
    """The peers, teachers and coordinator as Ray actors in one placement group; the step as chained refs."""

    def __init__(self, config, spec, arrays, group=None):
        """group: an existing placement group laid out as placement.layout() (a Tune trial's); None: reserve one."""
        self.config = config
        self.layout = placement.layout(config)
        self.owns_group = group is None
        if group is None:
            placement.check_capacity(config, ray.cluster_resources(), [n for n in ray.nodes() if n["Alive"]])
            group = placement_group(self.layout.bundles, strategy=config.resources.strategy,
                                    name=f"raydistill-{config.name}-{os.getpid()}")
        self.group = group
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            if self.owns_group:
                remove_placement_group(self.group)
            raise ConfigError("resources", placement.required(config),
                              f"the cluster could not place the run's bundles {self.layout.bundles} with "
                              f"strategy {config.resources.strategy} within {PLACEMENT_TIMEOUT_S:.0f}s; "
                              f"available: {ray.available_resources()}")
        r = config.resources
        # once: every actor on a node maps the same arrays. Held for the whole run: a restarted actor is built
        # again from its constructor arguments, so they must stay in the object store.
        self.data_ref = data_ref = ray.put(arrays)
        restartable = {"max_restarts": r.max_restarts, "max_task_retries": 0}
        self.peers = [PeerActor.options(num_cpus=r.cpus_per_peer, num_gpus=r.gpus_per_peer,
                                        scheduling_strategy=self._bundle(self.layout.peers[i]),
                                        name=actor_name(config, f"peer{i}"), **restartable)
                      .remote(i, config, data_ref, spec) for i in range(config.num_peers)]
        self.teachers = [TeacherActor.options(num_cpus=r.cpus_per_peer, num_gpus=r.gpus_per_teacher or 0,
                                              scheduling_strategy=self._bundle(self.layout.teachers[0]),
                                              name=actor_name(config, "teacher0"), **restartable)
                         .remote(0, config, data_ref, spec)] if config.teacher is not None else []
        # the coordinator needs no GPU; Ray no longer hides GPUs from 0-GPU actors, so hide them here
        self.coordinator = CoordinatorActor.options(
            num_cpus=r.cpus_per_coordinator, num_gpus=0, scheduling_strategy=self._bundle(self.layout.coordinator),
            name=actor_name(config, "coordinator"), runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": ""}},
            **restartable).remote(config, labels_of(arrays), spec)
        self.transport = ObjectStoreTransport(self.coordinator, config.num_peers)
        self.num_teachers = len(self.teachers)
        self._nodes = ray.get([a.node.remote() for a in self._actors()])   # also waits for every __init__

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)

    def _actors(self) -> list:
        return [*self.peers, *self.teachers, self.coordinator]

    @staticmethod
    def _get(refs):
        """ray.get, with a lost actor (dead process or node) turned into WorkerLost for the loop to recover from."""
        try:
            return ray.get(refs)
        except LOST as err:
            raise WorkerLost(type(err).__name__) from err
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, LOST):
                raise WorkerLost(type(err.cause).__name__) from err
            raise

    # ---- the step protocol: three rounds of calls, no waiting ------------------------------------------------------
    def submit_step(self, epoch: int, step: int) -> list:
        outputs = [p.forward.remote(epoch, step) for p in self.peers]
        outputs += [t.forward.remote(epoch, step) for t in self.teachers]
        targets = self.transport.exchange(epoch, step, outputs)
        return [p.learn.remote(epoch, step, t) for p, t in zip(self.peers, targets)]

    def collect(self, handle: list) -> list[dict]:
        return self._get(handle)

    def evaluate(self, split: str) -> dict:
        outputs = [a.evaluate.remote(split) for a in (*self.peers, *self.teachers)]
        return self._get(self.coordinator.evaluate.remote(split, *outputs))

    def get_state(self) -> dict:
        peers = self._get([p.state_dict.remote() for p in self.peers])
        return {"peers": peers, "coordinator": self._get(self.coordinator.state_dict.remote())}

    def set_state(self, state: dict) -> None:
        calls = [p.load_state_dict.remote(s) for p, s in zip(self.peers, state["peers"])]
        calls.append(self.coordinator.load_state_dict.remote(state["coordinator"]))
        self._get(calls)

    def export(self) -> dict:
        parts = self._get([p.export.remote() for p in self.peers])
        return {name: entry for part in parts for name, entry in part.items()}

    def wait_ready(self, timeout: float) -> None:
        """Waits until every actor answers again (Ray restarts it, on a replacement node if its node is gone)."""
        deadline = time.monotonic() + timeout
        names = [f"peer{i}" for i in range(len(self.peers))] + [f"teacher{i}" for i in range(self.num_teachers)]
        names.append("coordinator")
        nodes = []
        for name, actor in zip(names, self._actors()):
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{name} did not come back within resources.node_wait_s={timeout:g}s "
                                       "(no node with room for its bundle, or past resources.max_restarts)")
                try:
                    nodes.append(ray.get(actor.node.remote(), timeout=min(left, 10.0)))
                    break
                except ray.exceptions.GetTimeoutError:
                    continue
                except LOST:                # still restarting, or past resources.max_restarts: the deadline decides
                    time.sleep(0.5)
        self._nodes = nodes

    def nodes(self) -> dict:
        n = self.config.num_peers
        return {"peers": self._nodes[:n], "teachers": self._nodes[n:n + self.num_teachers],
                "coordinator": self._nodes[-1]}

    def shutdown(self) -> None:
        for actor in self._actors():
            ray.kill(actor, no_restart=True)
        if self.owns_group:
            remove_placement_group(self.group)


def default_run_dir(config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.name}-{stamp}"


def train(config=None, output=None, *, overrides=None, runtime: str = "ray", resume=None,
          stop_after_epoch: int | None = None, progress: bool = True, from_checkpoint=None, on_epoch=None,
          placement_group=None) -> RunResult:
    """Trains a run and returns its summary.

    config: a Config, a preset name, a YAML/JSON path or a dict (None: the default job, DML on digits);
    output: the run directory (default runs/NAME-TIMESTAMP); resume: a run directory to continue from its last checkpoint
    (overrides may extend train.epochs); stop_after_epoch: stop (with a checkpoint) after that many epochs in all.
    For Tune: from_checkpoint continues a checkpoint directory under this (possibly mutated) config in a new run
    directory; on_epoch(record, checkpoint_dir) is called after every epoch; placement_group is the trial's group.
    """
    if runtime not in RUNTIMES:
        raise ConfigError("--runtime", runtime, f"one of: {', '.join(RUNTIMES)}")
    resume_state = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError("--resume", str(resume), "is not a run directory (no config.yaml)")
        config = load_config(run_dir, overrides)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError("--resume", str(resume), "holds no checkpoint yet; start the run again instead")
        resume_state = load_checkpoint(checkpoint, config.num_peers)
        if resume_state["loop"]["epochs_completed"] >= config.train.epochs:
            raise ConfigError("train.epochs", config.train.epochs,
                              f"the run already completed {resume_state['loop']['epochs_completed']} epochs; "
                              "raise train.epochs to train further")
    else:
        if not isinstance(config, Config):
            config = load_config(config, overrides)
        run_dir = Path(output) if output is not None else default_run_dir(config)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError("--output", str(run_dir), "already holds files; choose a new directory or --resume it")
        if from_checkpoint is not None:
            resume_state = load_checkpoint(from_checkpoint, config.num_peers)

    if config.teacher is not None and config.teacher.cache is True:
        config = copy.deepcopy(config)           # the cache lives in the run directory
        config.teacher.cache = str(run_dir.resolve() / "teacher_cache")
    # everything that can be refused is checked before the run directory is written
    if config.train.storage:
        resolve_storage(config.train.storage)
    spec, arrays = load_run_data(config)
    if resume_state is not None:
        check_compatible(config, spec, resume_state, str(resume or from_checkpoint))
    if config.teacher is not None:
        from raydistill.models import build_model

        load_teacher_weights(build_model(config.teacher.arch, spec, **config.teacher.options),
                             config.teacher.checkpoint, config.teacher.arch)
    started = False
    if runtime == "ray":
        started = connect(config)
        try:
            workers = RayWorkers(config, spec, arrays, group=placement_group)
        except BaseException:
            if started:
                ray.shutdown()
            raise
    else:
        workers = InProcessWorkers(config, spec, arrays)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
        run = Run(config, spec, arrays, workers, run_dir, runtime, Console(progress), on_epoch=on_epoch)
        return run.train(resume_state, stop_after_epoch)
    except KeyboardInterrupt:
        if created and not any(run_dir.glob("checkpoints/epoch_*")):
            shutil.rmtree(run_dir, ignore_errors=True)      # nothing worth keeping yet
        raise
    finally:
        workers.shutdown()
        if started:
            ray.shutdown()
