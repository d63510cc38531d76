"""Per-step time of every runtime and transport on the same run, side by side (default: 3-peer DML, tiny MLP, CPU).

    raydistill bench [CONFIG] [--steps 200] [--repeats 3] [--set KEY=VALUE ...]
    raydistill bench --gpu [--steps 100] [--repeats 3]      # 3 ResNet-32 peers sharing one GPU, against a plain loop
    raydistill bench --reference [--only reference,inprocess] ...
    raydistill bench --data [IMAGES] [--data-size 128]      # the data path: a prepared set against ImageFolder
    python -m raydistill.bench ...

In one run: the in-process runtime (every peer in this process, one after another), the Ray runtime with the
object-store transport (the driver drives every step: forward, the coordinator actor's targets, learn) and with the
collective transport (each worker runs whole calls of steps, exchanging outputs with one all-gather per step: shared
memory between workers on one node, and the same over gloo's all_gather as the "collective-gloo" row).
Steps are timed after a warm-up; evaluation, checkpoints and start-up are excluded. The exchange column is the
exchange alone, compute excluded: the outputs of one real forward gathered and turned into targets, step after step,
by the engine's training step (engine/step.py) without its forward and learn; in this process for the in-process
rows, and for a collective's rows among processes of this bench's own laid out as the row's workers and joined the
way they are (runtime/collective.py's group, on a node through shared memory or over gloo). The object store's
exchange is the driver's rounds of actor calls, which nothing but a whole step makes: "-".

--gpu (on a CUDA machine): 3 ResNet-32 peers (DML) sharing one GPU on synthetic CIFAR-shaped data (100 classes, batch
128, bf16 autocast, random crop and flip on the GPU), rows: the reference, in-process, object store and the collective
(the fast path: the three peers in one worker, no copy between them). --reference adds the reference row to any DML
config: a plain PyTorch loop, every peer in one process, eager (raydistill/bench/reference_loop.py); the ratio column
is then the speed-up over it, the reference's ms/step over the row's. --only picks rows.
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import dataclass

from raydistill.config import load_config
from raydistill.errors import ConfigError, one_line, report_error, user_error
from raydistill.transports import transport_of

DEFAULT = {"name": "bench", "data": {"name": "synthetic", "options": {"num_train": 4096, "shape": [1, 8, 8]}},
           "model": {"arch": "mlp", "options": {"hidden": [64]}}, "peers": 3, "method": {"name": "dml"},
           "train": {"epochs": 1, "batch_size": 64}}
# --gpu: the reference loop's setup (bench/reference_loop.py) as a run: an epoch of CIFAR-shaped images (45,000 after
# the validation split: every timed step of --steps 100 --repeats 3 in one epoch), peers sharing one GPU
DEFAULT_GPU = {"name": "bench-gpu",
               "data": {"name": "synthetic", "crop_pad": 4, "flip": True,
                        "options": {"num_train": 50_000, "num_test": 256, "shape": [3, 32, 32], "num_classes": 100}},
               "model": {"arch": "resnet32"}, "peers": 3, "method": {"name": "dml", "temperature": 1.0, "alpha": 1.0},
               "train": {"epochs": 1, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                         "nesterov": True, "bf16": True, "channels_last": True},
               "resources": {"gpus_per_peer": 1 / 3}}
WARMUP = 10
RANK_TIMEOUT_S = 600.0      # a rank of the bench's own group imports torch and builds its members: minutes if loaded


@dataclass(frozen=True)
class Setup:
    """How a row runs: in this process or on Ray, over which transport, with which peer execution."""
    name: str                          # the row's name (``--only``) and what the table prints as its transport
    runtime: str                       # "inprocess" or "ray"
    transport: str | None = None       # resources.transport of a Ray row
    execution: str | None = None       # resources.peer_execution, where the row sets it
    shared_memory: bool = True         # False: a collective's step exchange over gloo even on one node

    def applied(self, config):
        """The run config of this row."""
        config = copy.deepcopy(config)
        if self.execution is not None:
            config.resources.peer_execution = self.execution
        if self.transport is not None:
            config.resources.transport = self.transport
        return config


SETUPS = (Setup("inprocess", "inprocess"), Setup("object_store", "ray", "object_store"),
          Setup("collective", "ray", "collective"), Setup("collective-gloo", "ray", "collective", shared_memory=False))
# the same with each worker's peers stacked into one batched model (resources.peer_execution: stacked)
STACKED = (Setup("inprocess+stacked", "inprocess", execution="stacked"),
           Setup("collective+stacked", "ray", "collective", execution="stacked"))
GPU_SETUPS = SETUPS[:3] + STACKED       # one worker hosts the three peers: gloo would have nothing to exchange
ALL_SETUPS = SETUPS + STACKED
REFERENCE = "reference"
ROWS = (REFERENCE,) + tuple(setup.name for setup in ALL_SETUPS)


def run_steps(workers, first: int, count: int, steps_per_epoch: int) -> None:
    """`count` steps from global step `first`, in calls that end at epoch boundaries."""
    step = first
    while step < first + count:
        epoch, index = divmod(step, steps_per_epoch)
        size = min(steps_per_epoch - index, first + count - step)
        workers.run_steps(epoch, index, size)
        step += size


def exchange_seconds(worker, count: int, epoch: int = 0) -> float:
    """Seconds for ``count`` steps of gather and targets alone (compute excluded): an engine worker's own training
    step over the outputs of its one real forward."""
    step = worker.training_step
    outputs = step.forward(epoch, 0)
    tic = time.perf_counter()
    for _ in range(count):
        step.targets(epoch, 0, 0, step.gather(epoch, 0, 0, outputs))
    return time.perf_counter() - tic


def _exchange_rank(config, members, rank: int, world: int, port: int, shared_memory: bool, count: int,
                   results) -> None:
    """One rank of the bench's own group: the members a row's worker hosts, joined to the others as a run's workers
    are (runtime/collective.py); puts (rank, seconds of the exchange alone) or (rank, the error in one line)."""
    import torch

    from raydistill.engine.data import load_run_data
    from raydistill.engine.worker import Worker
    from raydistill.runtime.collective import GroupExchange

    try:
        if config.resources.gpus_per_peer > 0 and torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())       # one GPU a rank, as Ray gives them
        spec, arrays = load_run_data(config)
        worker = Worker(config, arrays, spec, members)
        worker.set_exchange(GroupExchange(rank, world, "127.0.0.1", port, config.resources.collective_timeout_s,
                                          shared_memory, worker.device))
        try:
            results.put((rank, exchange_seconds(worker, count)))
        finally:
            worker.set_exchange(None)
    except Exception as err:  # noqa: BLE001 — said by the parent, in one line
        results.put((rank, one_line(err)))


def group_exchange_ms(config, setup: Setup, count: int) -> float:
    """ms per step of a collective's exchange and targets alone, among processes of this bench laid out as the row's
    workers (the slowest rank's time); one worker has no group, and its exchange is measured in this process."""
    from raydistill.engine.data import load_run_data
    from raydistill.engine.worker import Worker
    from raydistill.runtime.collective import free_port
    from raydistill.runtime.placement import layout

    members = layout(config).members
    if len(members) == 1:
        spec, arrays = load_run_data(config)
        return exchange_seconds(Worker(config, arrays, spec, members[0]), count) / count * 1000
    spawn = multiprocessing.get_context("spawn")
    results, port = spawn.Queue(), free_port()
    ranks = [spawn.Process(target=_exchange_rank, daemon=True,
                           args=(config, m, rank, len(members), port, setup.shared_memory, count, results))
             for rank, m in enumerate(members)]
    for process in ranks:
        process.start()
    try:
        seconds = dict(results.get(timeout=RANK_TIMEOUT_S) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=30.0)
            if process.is_alive():
                process.kill()
    failed = [f"rank {rank}: {value}" for rank, value in sorted(seconds.items()) if isinstance(value, str)]
    if failed:
        raise RuntimeError(f"the exchange's own group failed ({'; '.join(failed)})")
    return max(seconds.values()) / count * 1000


def measure(config, setup: Setup, steps: int, repeats: int) -> dict:
    from raydistill.data.views import num_steps
    from raydistill.engine.data import load_run_data

    config = setup.applied(config)
    spec, arrays = load_run_data(config)
    steps_per_epoch = num_steps(len(arrays["train_y"]), config.train.batch_size)
    if setup.runtime == "ray":
        from raydistill.runtime.driver import RayWorkers

        workers = RayWorkers(config, spec, arrays, shared_memory=setup.shared_memory)
    else:
        from raydistill.runtime.inprocess import InProcessWorkers

        workers = InProcessWorkers(config, spec, arrays)
    try:
        run_steps(workers, 0, WARMUP, steps_per_epoch)
        samples = []
        for _ in range(repeats):
            tic = time.perf_counter()
            run_steps(workers, WARMUP, steps, steps_per_epoch)
            samples.append((time.perf_counter() - tic) / steps)
        ms = statistics.median(samples) * 1000
        exchange = exchange_seconds(workers.worker, steps) / steps * 1000 if setup.runtime == "inprocess" else None
        described = workers.describe()
    finally:
        workers.shutdown()
    if setup.runtime == "ray" and transport_of(config).workers_drive:      # measured with the row's workers gone
        exchange = group_exchange_ms(config, setup, steps)
    return {"ms": ms, "exchange_ms": exchange, "workers": described,
            "peer_samples_per_s": config.num_peers * config.train.batch_size / (ms / 1000)}


def measure_reference(config, steps: int, repeats: int) -> dict:
    """The reference loop on the config's peers, batch, data shape, augmentation and optimizer settings."""
    import torch

    from raydistill.bench.reference_loop import describe, reference_step_ms
    from raydistill.engine.data import load_run_data

    if config.method.name != "dml":
        raise ConfigError("method.name", config.method.name, "dml for the reference row (--gpu, --reference, --only "
                          "reference): the reference loop computes DML")
    if config.task != "classification":
        raise ConfigError("task", config.task, "classification for the reference row: the reference loop computes DML "
                          "with cross-entropy")
    spec, arrays = load_run_data(config)
    cuda = config.resources.gpus_per_peer > 0 and torch.cuda.is_available()     # where the runtimes put the peers
    peers = config.peer_list
    r = reference_step_ms(config.num_peers, config.train.batch_size, spec.num_classes, [p.arch for p in peers],
                          options=[p.options for p in peers], shape=spec.input_shape, steps=steps, warmup=WARMUP,
                          repeats=repeats, device="cuda" if cuda else "cpu", bf16=config.train.bf16,
                          channels_last=config.train.channels_last, crop_pad=config.data.crop_pad,
                          flip=config.data.flip, lr=config.train.lr, momentum=config.train.momentum,
                          weight_decay=config.train.weight_decay, nesterov=config.train.nesterov,
                          temperature=_scale(config.method.temperature), alpha=_scale(config.method.alpha),
                          num_images=len(arrays["train_y"]), seed=config.seed,
                          threads=None if cuda else config.resources.threads_per_peer)
    return {"ms": r["ms"], "exchange_ms": None, "workers": describe(r), "peer_samples_per_s": r["peer_images_per_s"],
            "images": len(spec.input_shape) == 3}


def _scale(value) -> float:
    """A method knob for the reference: the number, or 1 for a schedule (its cost is the same)."""
    return value if isinstance(value, (int, float)) else 1.0


def attempt(measure_row, *args) -> dict:
    """A row's figures, or {"error": one line} where it failed for another reason than bad input: the other rows
    still run (one run on a lent machine gives every row it can)."""
    try:
        return measure_row(*args)
    except Exception as err:
        if user_error(err) is not None:
            raise
        text = str(err).strip().splitlines()
        return {"error": f"{type(err).__name__}: {text[0] if text else ''}"}


def rows_to_run(args) -> list:
    """The rows of this bench, in table order."""
    if args.only is not None:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        if not names or any(name not in ROWS for name in names):
            raise ConfigError("--only", args.only, f"a comma-separated list of: {', '.join(ROWS)}")
        return [name for name in ROWS if name in names]
    setups = GPU_SETUPS if args.gpu else SETUPS
    return ([REFERENCE] if args.gpu or args.reference else []) + [setup.name for setup in setups]


def machine_line() -> str:
    import torch

    line = (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
            f"{platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return line


def bench_config(args):
    """The config of this bench: CONFIG (or the tiny default, or with --gpu the GPU setup) and --set. With --gpu a
    config whose peers are on CPUs gets them sharing one GPU (resources.gpus_per_peer = 1 / peers)."""
    config = load_config(args.config or (DEFAULT_GPU if args.gpu else DEFAULT), args.overrides)
    if args.gpu and config.resources.gpus_per_peer == 0:
        share = [f"resources.gpus_per_peer={1 / config.num_peers!r}"]
        config = load_config(args.config or DEFAULT_GPU, share + list(args.overrides))
    return config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydistill bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="a preset or YAML (default: tiny 3-peer DML; with --gpu: 3 ResNet-32 peers on one GPU)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per repeat (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is shown (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu", action="store_true",
                   help="needs CUDA: 3 ResNet-32 peers (DML, bf16, batch 128) sharing one GPU on synthetic "
                        "CIFAR-shaped data; rows: reference, inprocess, object_store, collective")
    p.add_argument("--reference", action="store_true",
                   help="a first row: a plain PyTorch loop, every peer in one process, eager; ratios are speed-ups "
                        "over it")
    p.add_argument("--only", metavar="ROWS", default=None,
                   help=f"only these rows, comma-separated: {', '.join(ROWS)}")
    p.add_argument("--data", type=int, nargs="?", const=3000, metavar="IMAGES",
                   help="the data path instead (raydistill/bench/data.py): a prepared set against ImageFolder + "
                        "DataLoader on IMAGES generated JPEGs (3000), and the memory of 1-3 readers; --repeats passes")
    p.add_argument("--data-size", type=int, default=128, metavar="S", help="--data: crops S x S (128)")
    p.add_argument("--data-dir", metavar="DIR", help="--data: keep the JPEGs and the set here, reused by a rerun")


def run(args) -> int:
    import torch

    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            raise ConfigError(flag, value, "an integer >= 1")
    if args.data is not None:
        from raydistill.bench.data import run_data

        return run_data(args, machine_line())
    if args.gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu", True, "needs a CUDA device and torch sees none here: run the bench without --gpu "
                          "(add --reference for the plain-loop row on this machine)")
    rows = rows_to_run(args)
    config = bench_config(args)
    results = {}
    if rows[0] == REFERENCE:                 # first, while nothing else holds the machine
        results[REFERENCE] = attempt(measure_reference, config, args.steps, args.repeats)
    setups = [setup for setup in ALL_SETUPS if setup.name in rows]
    started = False
    if any(setup.runtime == "ray" for setup in setups):
        from raydistill.runtime.driver import connect

        # room for the widest row: a coordinator actor's head bundle where a row's transport has one
        widest = max((setup.applied(config) for setup in setups if setup.runtime == "ray"),
                     key=lambda row_config: transport_of(row_config).head_cpus(row_config))
        started = connect(widest)               # a Ray that was running already is left running
    try:
        for setup in setups:
            results[setup.name] = attempt(measure, config, setup, args.steps, args.repeats)
    finally:
        if started:
            from raydistill.runtime import session

            session.shutdown()
    gpu = config.resources.gpus_per_peer > 0 and torch.cuda.is_available()
    print(f"{machine_line()}; {config.num_peers} peers, {config.peers[0].arch}, batch {config.train.batch_size}"
          f"{', bf16' if gpu and config.train.bf16 else ''}{', on the GPU' if gpu else ''}, "
          f"{args.steps} steps x {args.repeats} (median)")
    if REFERENCE in results:
        print_against_reference(rows, results)
    else:
        print_against_first(rows, setups, results)
    return 1 if any("error" in r for r in results.values()) else 0


def print_against_first(rows, setups, results) -> None:
    """The table without a reference: the ratio is the row's ms/step over the in-process runtime's (or the first
    row's): above 1, slower."""
    print(f"{'runtime':<10}{'transport':<20}{'ms/step':>9}{'peer-samples/s':>16}{'ratio':>7}{'exchange ms':>13}"
          "  workers")
    base = results["inprocess" if "inprocess" in results else rows[0]].get("ms")
    for setup in setups:
        r = results[setup.name]
        if "error" in r or base is None:
            print(f"{setup.runtime:<10}{setup.name:<20}"
                  f"{'failed: ' + r['error'] if 'error' in r else 'no base to compare'}")
            continue
        print(f"{setup.runtime:<10}{setup.name:<20}{r['ms']:>9.2f}{r['peer_samples_per_s']:>16.0f}"
              f"{r['ms'] / base:>7.2f}{_exchange(r):>13}  {r['workers']}")


def _exchange(figures: dict) -> str:
    return "-" if figures["exchange_ms"] is None else f"{figures['exchange_ms']:.3f}"


def print_against_reference(rows, results) -> None:
    """The table with the reference first: the speed-up is the reference's ms/step over the row's (below 1: slower
    than the plain loop)."""
    rate = "peer-samples/s" if results[REFERENCE].get("images") is False else "peer-images/s"
    print(f"{'runtime':<10}{'transport':<20}{'ms/step':>9}{rate:>16}{'speed-up':>10}{'exchange ms':>13}  workers")
    base = results[REFERENCE].get("ms")
    runtimes = {REFERENCE: REFERENCE, **{setup.name: setup.runtime for setup in ALL_SETUPS}}
    for name in rows:
        r = results[name]
        shown = "eager" if name == REFERENCE else name
        if "error" in r:
            print(f"{runtimes[name]:<10}{shown:<20}failed: {r['error']}")
            continue
        ratio = f"{base / r['ms']:.2f}" if base else "-"
        print(f"{runtimes[name]:<10}{shown:<20}{r['ms']:>9.2f}{r['peer_samples_per_s']:>16.0f}{ratio:>10}"
              f"{_exchange(r):>13}  {r['workers']}")
    print("speed-up: the reference's ms/step / the row's (the reference: a plain PyTorch loop, every peer in one "
          "process, eager)")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except Exception as err:  # noqa: BLE001 — one line, as `raydistill bench` prints it
        return report_error(err)


