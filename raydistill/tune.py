"""Ray Tune searches over a run's hyper-parameters: each trial is one whole raydistill run.

A trial reserves its run's placement group at once through a PlacementGroupFactory (bundle 0: the trial and the
coordinator; one bundle per peer and teacher), so concurrent trials never hold half a run each. The trial calls
:func:`raydistill.runtime.launch.train` with that group and reports every epoch's figures with a checkpoint of the whole
run, so ASHA stops trials early and PBT clones a good trial's checkpoint into a worse one with perturbed
hyper-parameters.

The experiment directory holds Tune's own state, ``search.yaml`` (what was searched, for ``--resume``), ``trials/`` (one
raydistill run directory per trial segment: TensorBoard, metrics.parquet, checkpoints), and at the end ``best.json`` and
``trials.parquet``. Samples are drawn from the config's ``seed``, so a search interrupted and resumed any number of
times tries the same trials, and ends with the same rows, as the same search run straight through.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import yaml
from ray.tune import Callback
from ray.tune.stopper import Stopper, TimeoutStopper

from raydistill.config import Config, PeerConfig, apply_overrides, load_config, raw_config
from raydistill.errors import ConfigError, Terminated, one_line, read_yaml, user_error

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "randint")
SCHEDULERS = ("asha", "pbt")
SEARCHES = ("random", "optuna")
SETTINGS = ("metric", "mode", "scheduler", "search", "time_budget_s")
SCHEDULER_OPTIONS = {"asha": ("grace_period", "reduction_factor"),
                     "pbt": ("perturbation_interval", "quantile_fraction", "resample_probability", "synch", "mutate")}
PBT_MUTATES = ("method.temperature", "method.alpha")
SEARCH_FILE = "search.yaml"
BUDGET_SPENT = "time_budget_spent"          # marks an experiment whose time budget ended it
TRIALS_DIR = "trials"
SEGMENT = re.compile(r"^(?P<trial>[^.]+)(\.(?P<k>\d+)_from_epoch_\d+)?$")
FINISHED = ("completed", "stopped early")   # the statuses of a trial that needs nothing more


# ---- the search space --------------------------------------------------------------------------------------------
@dataclass
class Space:
    params: dict            # dotted config key -> (distribution, arguments)
    metric: str
    mode: str
    scheduler: str
    scheduler_options: dict
    search: str
    time_budget_s: float | None = None      # the whole search's wall-clock budget, counted across --resume

    def bounds(self) -> dict[str, tuple[float, float]]:
        """[low, high] of the continuous keys: PBT's perturbations stay inside them."""
        return {k: tuple(args) for k, (dist, args) in self.params.items() if dist in ("loguniform", "uniform")}


def _unwrap(tp):
    """Union[X, None] -> X (the config's optional sections and values)."""
    if get_origin(tp) is Union:
        rest = [a for a in get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def check_key(key: str, spec) -> None:
    """The key must name a config value: walks the config dataclasses; free-form `options` mappings take any key."""
    tp, parts = Config, key.split(".")
    for depth, part in enumerate(parts):
        tp = _unwrap(tp)
        where = ".".join(parts[:depth]) or "the config"
        if tp is dict or get_origin(tp) is dict:
            return
        if depth == 1 and parts[0] == "peers":          # peers.<index>.<key>: a per-peer setting
            if not part.isdigit():
                raise ConfigError(key, spec, "peers.<index>.<key> names one peer's setting (arch, options, lr)")
            tp = PeerConfig
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(key, spec, f"unknown config key: {where} is a single value")
        hints = get_type_hints(tp)
        if part not in hints:
            raise ConfigError(key, spec, f"unknown config key; {where} has: {', '.join(sorted(hints))}")
        tp = hints[part]
    if dataclasses.is_dataclass(_unwrap(tp)):
        raise ConfigError(key, spec, f"is a section; name one of its keys: "
                                     f"{', '.join(sorted(get_type_hints(_unwrap(tp))))}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_distribution(key: str, spec) -> tuple[str, list]:
    """One of {loguniform|uniform|randint: [low, high]}, {choice|grid: [values...]} -> (name, arguments)."""
    allowed = "one distribution: {loguniform: [low, high]}, {uniform: [low, high]}, {randint: [low, high]}, " \
              "{choice: [values]} or {grid: [values]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(key, spec, allowed)
    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(key, spec, f"unknown distribution {name!r}; {allowed}")
    if name in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(key, spec, f"{name} needs a non-empty list of values")
        return name, list(args)
    if not isinstance(args, list) or len(args) != 2 or not all(_number(a) for a in args):
        raise ConfigError(key, spec, f"{name} needs [low, high], two numbers")
    low, high = args
    if name == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(key, spec, "randint needs [low, high], two integers (both included)")
    if low > high or (low == high and name != "randint"):
        raise ConfigError(key, spec, f"{name} needs low < high; got low {low} > high {high}" if low > high else
                          f"{name} needs low < high; use a fixed --set {key}={low} for one value")
    if name == "loguniform" and low <= 0:
        raise ConfigError(key, spec, "loguniform needs 0 < low < high")
    return name, [low, high]


def corner_values(dist: str, args: list) -> list:
    """The values a trial can take at the edges of a distribution: each is checked against the config first."""
    return list(args) if dist in ("choice", "grid") else [args[0], args[1]]


def load_space(source, base: dict, scheduler: str | None = None) -> Space:
    """Reads and validates a search space (a YAML path or a mapping) against the run's raw config, before any trial.

    Every error is a ConfigError naming the key: unknown config keys, unknown distributions, low > high, and values at
    the edges of the space that the config itself refuses (a temperature of 0, alpha > 1 with ce_weight complement).
    """
    data = source
    if not isinstance(source, dict):
        path = Path(source)
        try:
            data = read_yaml(path.read_text())
        except OSError as err:
            raise ConfigError("--space", str(source), f"cannot be read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError("--space", str(source), f"is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError("--space", source if isinstance(source, str) else data,
                          "must map config keys to distributions, e.g. method.temperature: {loguniform: [1, 10]}")
    params = {}
    for key, spec in data.items():
        if key in SETTINGS:
            continue
        check_key(str(key), spec)
        params[str(key)] = check_distribution(str(key), spec)
    if not params:
        raise ConfigError("--space", source if isinstance(source, str) else data, "names no config key to search")
    for key, (dist, args) in params.items():
        for value in corner_values(dist, args):
            try:
                load_config(base, {key: value})
            except ConfigError as err:
                raise ConfigError(err.field, err.value, f"{err.allowed} (a value of the search space's {key})") \
                    from None
    config = load_config(base)
    metric, mode = search_metric(config, data.get("metric"), data.get("mode"))
    name, options = _scheduler_setting(data.get("scheduler", "asha"), scheduler)
    search = data.get("search", "random")
    if search not in SEARCHES:
        raise ConfigError("search", search, f"one of: {', '.join(SEARCHES)}")
    budget = data.get("time_budget_s")
    if budget is not None and not (_number(budget) and budget > 0):
        raise ConfigError("time_budget_s", budget, "seconds the whole search may run (across --resume), a number > 0")
    space = Space(params, metric, mode, name, options, search, budget)
    _check_combination(space)
    return space


def _scheduler_setting(setting, override: str | None) -> tuple[str, dict]:
    """`scheduler: asha` or `scheduler: {name: pbt, perturbation_interval: 2, ...}`; --scheduler overrides the name."""
    options = dict(setting) if isinstance(setting, dict) else {"name": setting}
    name = options.pop("name", "asha")
    if override is not None and override != name:
        name, options = override, {}
    if name not in SCHEDULERS:
        raise ConfigError("scheduler", name, f"one of: {', '.join(SCHEDULERS)}")
    for key in options:
        if key not in SCHEDULER_OPTIONS[name]:
            raise ConfigError(f"scheduler.{key}", options[key],
                              f"unknown option of {name}; allowed: {', '.join(SCHEDULER_OPTIONS[name])}")
    return name, options


def search_metric(config: Config, metric: str | None, mode: str | None) -> tuple[str, str]:
    """Default: the deployable model's validation figure (val_acc, max). Test-split figures never select a model."""
    from raydistill.engine.evaluation import primary_metric

    primary, primary_mode = primary_metric(config.task)
    metric = metric or f"val_{primary}"
    mode = mode or (primary_mode if metric.endswith(primary) else "max")
    if mode not in ("max", "min"):
        raise ConfigError("mode", mode, "one of: max, min")
    if config.data.val_fraction <= 0:
        raise ConfigError("data.val_fraction", config.data.val_fraction,
                          "a search selects on the validation split carved from the training data; set it > 0")
    if "test" in metric.split("_"):
        raise ConfigError("metric", metric, "choose a validation figure (val_*); the test split never selects a model")
    other = "acc" if primary == "mse" else "mse"
    if metric.endswith(f"_{other}"):
        raise ConfigError("metric", metric, f"a {config.task} run reports *_{primary}, not *_{other} (default: "
                                            f"val_{primary}; leave metric out of the space)")
    return metric, mode


def _check_combination(space: Space) -> None:
    grids = [k for k, (dist, _) in space.params.items() if dist == "grid"]
    if space.search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("search", "optuna", "needs Optuna: pip install 'raydistill[optuna]'")
        if grids:
            raise ConfigError(grids[0], "grid", "Optuna samples; use choice instead of grid with search: optuna")
        if space.scheduler == "pbt":
            raise ConfigError("search", "optuna", "works with scheduler asha; PBT evolves its own population")
    if space.scheduler == "pbt":
        mutate = space.scheduler_options.get("mutate", [k for k in PBT_MUTATES if k in space.params])
        missing = [k for k in mutate if k not in space.params]
        if not mutate or missing:
            raise ConfigError("scheduler.mutate", mutate or None,
                              "PBT mutates keys of the space; name method.temperature and/or method.alpha in it")


# ---- Tune objects -------------------------------------------------------------------------------------------------
def domain(dist: str, args: list):
    from ray import tune

    return {"loguniform": lambda: tune.loguniform(*args), "uniform": lambda: tune.uniform(*args),
            "randint": lambda: tune.randint(args[0], args[1] + 1),       # both ends included, as written
            "choice": lambda: tune.choice(args), "grid": lambda: tune.grid_search(args)}[dist]()


def param_space(space: Space) -> dict:
    return {key: domain(dist, args) for key, (dist, args) in space.params.items()}


def clamp_to_space(config: dict, bounds: dict) -> dict:
    """PBT perturbs by x1.2 / x0.8; keep each continuous key inside the [low, high] of its space."""
    for key, (low, high) in bounds.items():
        if key in config:
            config[key] = min(max(config[key], low), high)
    return config


def build_scheduler(space: Space, config: Config):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    options = space.scheduler_options
    if space.scheduler == "asha":
        epochs = [config.train.epochs]
        if "train.epochs" in space.params:
            epochs += [v for v in corner_values(*space.params["train.epochs"]) if isinstance(v, int)]
        return ASHAScheduler(time_attr="epoch", max_t=max(epochs), grace_period=options.get("grace_period", 1),
                             reduction_factor=options.get("reduction_factor", 4))
    mutate = options.get("mutate", [k for k in PBT_MUTATES if k in space.params])
    mutations = {}
    for key in mutate:
        dist, args = space.params[key]
        mutations[key] = list(args) if dist in ("choice", "grid") else domain(dist, args)
    return PopulationBasedTraining(
        time_attr="epoch", perturbation_interval=options.get("perturbation_interval", config.train.checkpoint_every),
        hyperparam_mutations=mutations, quantile_fraction=options.get("quantile_fraction", 0.25),
        resample_probability=options.get("resample_probability", 0.25), synch=options.get("synch", False),
        custom_explore_fn=functools.partial(clamp_to_space, bounds=space.bounds()))


def checkpoints_to_keep(space: Space) -> int:
    """ASHA resumes a trial from its own last checkpoint; PBT also clones others' (Tune warns below 3)."""
    return 4 if space.scheduler == "pbt" else 2


def build_search(space: Space, config: Config, concurrent: int):
    """Random samples (and every grid value) or Optuna, seeded from the config's seed: a resumed or repeated search
    tries the same trials. The concurrency limit lives here (Tune ignores max_concurrent_trials beside a generator)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=config.seed), max_concurrent=concurrent)
    return BasicVariantGenerator(max_concurrent=concurrent, random_state=config.seed)


def expected_trials(space: Space, samples: int) -> int:
    """How many trials the search creates in all: every grid combination, `samples` times (Tune's count)."""
    return samples * math.prod(len(args) for dist, args in space.params.values() if dist == "grid")


def trial_bundles(config: Config) -> list[dict]:
    """The run's bundles with the trial itself in bundle 0 (beside the coordinator)."""
    from raydistill.runtime import placement

    return placement.bundles(config, driver_cpus=1)


def trial_resources(config: Config) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in trial_bundles(config):
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def placement_factory(config: Config):
    """Tune gives a trial's head bundle to the trainable actor whole; an empty head puts the trainable in bundle 0 at
    no charge, so the coordinator still fits there and every child actor keeps placement.bundles()'s index."""
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([{}] + trial_bundles(config), strategy=config.resources.strategy)


def max_concurrent_trials(config: Config, cluster: dict[str, float]) -> int:
    """How many whole runs the cluster holds at once: by GPUs where a run takes GPUs, else by CPUs."""
    need = trial_resources(config)
    if need.get("CPU", 0) > cluster.get("CPU", 0) + 1e-9 or need.get("GPU", 0) > cluster.get("GPU", 0) + 1e-9:
        raise ConfigError("resources", {k: round(v, 3) for k, v in need.items()},
                          f"one trial reserves its coordinator, peers, teachers and itself at once; the cluster has "
                          f"CPU {cluster.get('CPU', 0):g}, GPU {cluster.get('GPU', 0):g}")
    count = math.floor(cluster.get("CPU", 0) / need["CPU"] + 1e-9)
    if need.get("GPU", 0) > 0:
        count = min(count, math.floor(cluster.get("GPU", 0) / need["GPU"] + 1e-9))
    return max(1, count)


# ---- one trial ---------------------------------------------------------------------------------------------------
def segment_dir(root: Path, trial_id: str, from_epoch: int | None) -> Path:
    """A trial's run directory; a trial continued from a checkpoint (PBT, resume) writes a new segment beside it."""
    if from_epoch is None:
        return root / trial_id
    k = 2 + sum(1 for p in root.glob(f"{trial_id}.*") if p.is_dir())
    return root / f"{trial_id}.{k}_from_epoch_{from_epoch:04d}"


def trial_run_dirs(root: Path, trial_id: str) -> list[Path]:
    """A trial's segments in the order they ran."""
    found = [p for p in Path(root).glob(f"{trial_id}*") if p.is_dir() and (m := SEGMENT.match(p.name))
             and m.group("trial") == trial_id]
    return sorted(found, key=lambda p: int(SEGMENT.match(p.name).group("k") or 1))


def start_over(root: Path, trial_id: str) -> None:
    """A trial started without a checkpoint begins at epoch 1: whatever an earlier attempt left (interrupted before
    Tune kept a checkpoint of it) goes first, its run directories and its reported rows, so that the new attempt writes
    the trial's only segment and its only history."""
    for path in trial_run_dirs(root, trial_id):
        shutil.rmtree(path)
    (Path(root) / f"{trial_id}.jsonl").unlink(missing_ok=True)


def append_report(root: Path, trial_id: str, record: dict) -> None:
    """Every figure a trial reports, in order, in ``trials/TRIAL.jsonl``: the trial's own history. Tune's result
    files are rewritten from a staged copy when a trial is paused and restored (synchronous PBT), which can drop
    earlier rows; this file is only ever appended to."""
    with open(Path(root) / f"{trial_id}.jsonl", "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def trial_history(root: Path, trial_id: str):
    """A trial's reported epochs as a DataFrame, one row per epoch: a later report of an epoch (the trial continued
    from a cloned or earlier checkpoint) replaces what it reported from that epoch on. None if it never reported."""
    import pandas as pd

    path = Path(root) / f"{trial_id}.jsonl"
    if not path.exists():
        return None
    rows: list[dict] = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            rows = [r for r in rows if r["epoch"] < record["epoch"]] + [record]
    return pd.DataFrame(rows) if rows else None


def run_complete(trial_id: str, result: dict) -> bool:
    """A run's last report comes after it finished (summary and export written): nothing left to decide."""
    return result.get("epoch", 0) >= result.get("epochs", math.inf)


class SearchStopper(Stopper):
    """Stops a trial once its run finished, and the whole search once its time budget is spent. Tune saves it with
    the experiment, so the budget counts across --resume; a spent budget leaves BUDGET_SPENT in the experiment
    directory, so that the trials it cut read as out of time, not as interrupted."""

    def __init__(self, budget_s: float | None, experiment: Path):
        self.budget = TimeoutStopper(budget_s) if budget_s else None
        self.mark = str(Path(experiment) / BUDGET_SPENT)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return run_complete(trial_id, result)

    def stop_all(self) -> bool:
        if self.budget is None or not self.budget.stop_all():
            return False
        with contextlib.suppress(OSError):          # an experiment moved since: its statuses read "unfinished"
            Path(self.mark).touch()
        return True


def run_trial(params: dict, *, base: dict, root: str) -> None:
    """A Tune trial: one raydistill run in the trial's placement group, one report per epoch with its checkpoint."""
    import ray
    from ray import tune

    from raydistill.runtime.launch import train

    config = load_config(base, params)
    epochs = config.train.epochs
    trial_id = tune.get_context().get_trial_id()
    last: dict = {}

    def report(record: dict, checkpoint_dir) -> None:
        record = {**record, "epochs": epochs}
        append_report(Path(root), trial_id, record)
        if record["epoch"] >= epochs:
            last.update(record=record, checkpoint=checkpoint_dir)    # reported once the run has exported
            return
        tune.report(record, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir
                    else None)

    run = functools.partial(train, config, progress=False, on_epoch=report,
                            placement_group=ray.util.get_current_placement_group())
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        start_over(Path(root), trial_id)
        run(Path(root) / trial_id)
    else:
        with checkpoint.as_directory() as path:
            done = json.loads((Path(path) / "loop.json").read_text())["epochs_completed"]
            if done >= epochs:
                return                         # cloned from a finished run: nothing left to train
            run(segment_dir(Path(root), trial_id, done), from_checkpoint=path)
    if last:
        tune.report(last["record"], checkpoint=tune.Checkpoint.from_directory(str(last["checkpoint"])))


def trainable(base: dict, root: Path, config: Config):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, base=base, root=str(root)), placement_factory(config))


def trial_dirname(trial) -> str:
    return trial.trial_id


# ---- the experiment ----------------------------------------------------------------------------------------------
def default_output(config: Config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"tune-{config.name}-{stamp}"


def absolute_paths(base: dict) -> dict:
    """Trials run in their own working directories: data.root and every teacher's checkpoint become absolute here."""
    teachers = base.get("teachers") if isinstance(base.get("teachers"), list) else []
    for node, key in ((base.get("data"), "root"), (base.get("teacher"), "checkpoint"),
                      *((teacher, "checkpoint") for teacher in teachers)):
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not os.path.isabs(value):
            node[key] = os.path.abspath(value)
    return base


def _connect(config: Config, progress: bool) -> bool:
    """Joins resources.address, or starts a local Ray with room for at least one whole trial and a watcher that ends
    it if this process is killed outright (runtime/reaper.py). Ray's and Tune's log lines go to DIR/ray.log."""
    from raydistill.runtime import session
    from raydistill.runtime.console import Console
    from raydistill.runtime.driver import release_warm_workers

    started = session.connect(config, Console(progress), cpus=math.ceil(trial_resources(config)["CPU"]))
    release_warm_workers()                  # the trials want every bundle of this process's Ray
    return started


DEFAULT_SAMPLES = 4


@dataclass
class Experiment:
    """One search as search.yaml records it (what --resume rebuilds): where it lives, the base config of every trial,
    the space as written and as checked, and how many samples it draws (None in a search.yaml from before it was
    recorded: then only the trials Tune created count)."""
    output: Path
    base: dict
    raw_space: dict
    space: Space
    samples: int | None

    def save(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / SEARCH_FILE).write_text(yaml.safe_dump(
            {"config": self.base, "space": self.raw_space, "scheduler": self.space.scheduler,
             "samples": self.samples}, sort_keys=False))


def new_experiment(config, space, samples, output, overrides, scheduler) -> Experiment:
    """Checks everything a new search is given, before anything is written or started."""
    if space is None:
        raise ConfigError("--space", None, "a search space is needed, e.g. --space tune_spaces/dml.yaml")
    base = absolute_paths(apply_overrides(raw_config(config), overrides))
    found = load_space(space, base, scheduler)
    if samples is not None and samples < 1:
        raise ConfigError("--samples", samples, "must be >= 1")
    output = Path(output if output is not None else default_output(load_config(base))).resolve()
    if output.exists() and any(output.iterdir()):
        raise ConfigError("--output", str(output), "already holds files; choose a new directory or --resume it")
    raw_space = space if isinstance(space, dict) else read_yaml(Path(space).read_text())
    return Experiment(output, base, raw_space, found, samples or DEFAULT_SAMPLES)


def saved_experiment(resume) -> Experiment:
    from ray import tune as ray_tune

    output = Path(resume).resolve()
    if not (output / SEARCH_FILE).is_file() or not ray_tune.Tuner.can_restore(str(output)):
        raise ConfigError("--resume", str(resume), "holds no raydistill Tune experiment (search.yaml and Tune state)")
    setup = read_yaml((output / SEARCH_FILE).read_text())
    found = load_space(setup["space"], setup["config"], setup.get("scheduler"))
    return Experiment(output, setup["config"], setup["space"], found, setup.get("samples"))


def build_tuner(experiment: Experiment, config: Config, concurrent: int, resume: bool, progress: bool, callbacks):
    """A new Tuner (search.yaml written first), or Tune's own state restored: unfinished and errored trials continue
    from their last checkpoints, trials not yet created are drawn from the restored, seeded generator."""
    from ray import tune as ray_tune

    fn = trainable(experiment.base, experiment.output / TRIALS_DIR, config)
    if resume:
        return ray_tune.Tuner.restore(str(experiment.output), trainable=fn, resume_unfinished=True,
                                      resume_errored=True)
    experiment.save()
    space = experiment.space
    return ray_tune.Tuner(
        fn, param_space=param_space(space),
        tune_config=ray_tune.TuneConfig(
            metric=space.metric, mode=space.mode, scheduler=build_scheduler(space, config),
            search_alg=build_search(space, config, concurrent), num_samples=experiment.samples,
            trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=ray_tune.RunConfig(
            name=experiment.output.name, storage_path=str(experiment.output.parent),
            stop=SearchStopper(space.time_budget_s, experiment.output),
            verbose=1 if progress else 0, callbacks=[*(callbacks or []), ListedCheckpoints()],
            checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=checkpoints_to_keep(space))))


class _BadInputFilter(logging.Filter):
    """Tune logs a failed trial with its traceback; a trial's bad input reaches the user as tune()'s one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and user_error(record.exc_info[1]) is not None)


class ListedCheckpoints(Callback):
    """Puts back, empty, a checkpoint folder that Tune's saved state still lists but Tune itself deleted.

    Tune keeps each trial's last checkpoints (CheckpointConfig.num_to_keep) and deletes the older ones as new ones
    come, while its saved state lists them until its next snapshot. A search stopped outright in between (kill -9,
    a lost machine) resumes with a list naming a deleted folder, and Tune's next deletion of it fails with a
    FileNotFoundError traceback on the console. Never the latest checkpoint (the one a trial continues from, or PBT
    clones): Tune never deletes that one. Saved with the experiment, so every --resume has it."""

    def on_trial_start(self, iteration, trials, trial, **info):
        for kept in trial.run_metadata.checkpoint_manager.best_checkpoint_results:
            folder = Path(kept.checkpoint.path)
            if folder.parent.is_dir() and not folder.exists():
                folder.mkdir()


STOP_S = 2.0        # after SIGTERM the search ends within this; `ray job stop` sends SIGKILL 3 s after its SIGTERM


class SearchStop:
    """SIGTERM (`ray job stop`, Kubernetes, a spot preemption) ends a search as Ctrl-C does: the experiment kept, the
    command that continues it printed, exit 143 (Terminated).

    Ray Tune 2.60 catches SIGINT and SIGUSR1 itself while its loop runs (ray/tune/tune.py, _setup_signal_catching):
    its handler ends the loop after the current step, saves the experiment state, stops the trials, and fit()
    returns; then both files are written. On a cluster this process joined, the first SIGTERM goes to that handler,
    with a deadline: stopping the trials waits on Ray, and if Ray itself is going down, STOP_S after the signal the
    search ends here with what Tune saved. On the local Ray this process started, SIGTERM raises Terminated at once
    (as train does): `ray job stop` and a terminal signal the whole process tree, and once Ray's own processes are
    gone, Ray ends this one at its next call (a lost object store); Tune's state is then its last snapshot (as after
    kill -9). A second SIGTERM, or one before Tune's loop, raises at once too (as a second Ctrl-C skips Tune's last
    save); one while the files are written waits for them."""

    TUNE_STOP = getattr(signal, "SIGUSR1", signal.SIGINT)       # always Tune's stop while its loop runs
    SIGNALS = (signal.SIGTERM, signal.SIGINT, TUNE_STOP)

    def __init__(self, experiment: Experiment, own_cluster: bool):
        self.experiment = experiment
        self.own_cluster = own_cluster
        self.received: list[int] = []
        self.finishing = False                  # fit() returned: the files are being written
        self.stdout = sys.stdout                # Tune's console output may be redirected when the deadline comes
        self._before: dict = {}

    @contextlib.contextmanager
    def catching(self):
        """Installed after ray.init, whose own SIGTERM handlers (Python's, or C++'s that aborts) end the process
        without a word; Tune's handlers, which it leaves installed after fit(), go too."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._before = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield self
        finally:
            for sig, handler in self._before.items():
                if handler is not None:             # None: not installed from Python
                    signal.signal(sig, handler)

    def _on_sigterm(self, signum, frame):
        self.received.append(signum)
        if self.finishing:
            return
        tune_stop = signal.getsignal(self.TUNE_STOP)
        if self.own_cluster or len(self.received) > 1 or not callable(tune_stop) or \
                tune_stop is self._before.get(self.TUNE_STOP):
            raise Terminated
        threading.Thread(target=self._deadline, name="raydistill-stop", daemon=True).start()
        tune_stop(signum, frame)                # Tune's own stop: its state saved, its trials stopped

    def _deadline(self) -> None:
        time.sleep(STOP_S)
        if not self.finishing:
            self.say_stopped()
            print("raydistill: stopped by SIGTERM", file=sys.stderr, flush=True)
            os._exit(143)

    def say_stopped(self) -> None:
        from ray import tune as ray_tune

        output = self.experiment.output
        print(f"stopped by SIGTERM: continue with raydistill tune --resume {output}"
              if ray_tune.Tuner.can_restore(str(output)) else "stopped by SIGTERM before the search started",
              file=self.stdout, flush=True)


def tune(config=None, space=None, *, samples: int | None = None, output=None, overrides=None,
         scheduler: str | None = None, resume=None, max_concurrent: int | None = None, progress: bool = True,
         callbacks=None) -> dict:
    """Searches hyper-parameters and returns the best trial: {metric, mode, value, trial, run_dir, params, complete,
    statuses, errors, experiment, config}.

    config: a preset name, a YAML/JSON path or a dict (with overrides `a.b=v`); space: a tune_spaces/*.yaml path or a
    mapping; samples: Tune's num_samples (a grid is repeated that many times; default 4); output: the experiment
    directory (default runs/tune-NAME-TIMESTAMP); scheduler: asha or pbt over the space's own; resume: an experiment
    directory to continue (Tuner.restore); max_concurrent: trials at once (default: as many whole runs as the cluster
    holds). Writes OUTPUT/best.json and OUTPUT/trials.parquet. `complete` is false while any trial of the search has
    not finished (interrupted, not started, failed, or cut by the time budget); --resume continues all but the last.
    Raises ConfigError when a trial refused its sampled config (after writing both files), TrainingError when no
    trial reported the metric, and Terminated (a KeyboardInterrupt) after SIGTERM stopped the search, once the command
    that continues it is printed (SearchStop: on a cluster it joined, Tune's state saved and both files written first).
    """
    import ray

    from raydistill.runtime import session

    experiment = saved_experiment(resume) if resume is not None else \
        new_experiment(config, space, samples, output, overrides, scheduler)
    run_config = load_config(experiment.base)
    started = _connect(run_config, progress)
    tune_log = logging.getLogger("ray.tune.execution.tune_controller")
    quiet = _BadInputFilter()
    stop = SearchStop(experiment, own_cluster=started and not run_config.resources.address)
    restore_printer = session.raylet_errors_to_log()     # a worker lost in a trial: a block in ray.log, not here
    try:
        with stop.catching():
            concurrent = max_concurrent or max_concurrent_trials(run_config, ray.cluster_resources())
            tuner = build_tuner(experiment, run_config, concurrent, resume is not None, progress, callbacks)
            (experiment.output / TRIALS_DIR).mkdir(exist_ok=True)
            if started:
                session.log_to(experiment.output)
            tune_log.addFilter(quiet)
            # Tune prints its configuration box whatever the verbosity: without progress, nothing of Tune's on stdout
            with contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO()):
                results = tuner.fit()
            stop.finishing = True
            trials, params_of, errors = collect_trials(experiment.output, experiment.space, experiment.base,
                                                       trial_errors(results))
            best = write_results(experiment, trials, params_of, errors)
    except KeyboardInterrupt:
        if not stop.received:
            raise
        stop.say_stopped()
        # Ray turns an exception raised by a signal handler during its calls into a plain KeyboardInterrupt
        raise Terminated from None
    finally:
        tune_log.removeFilter(quiet)
        restore_printer()
        if started and not stop.received:
            # after SIGTERM this process ends at once, asking Ray nothing more: a local Ray, which may have had the
            # signal too, ends with its watcher (runtime/reaper.py)
            session.shutdown()
    if stop.received:
        stop.say_stopped()
        raise Terminated
    return check_results(experiment, best, errors)


def trial_errors(results) -> dict[str, BaseException]:
    """Each failed trial's error, from the ResultGrid fit() returned. Tune's saved state can still call such a trial
    RUNNING: when a trial's process dies, Tune handles the lost actor before the failed call, and no longer snapshots
    the trial it has already let go (so the saved state alone makes a killed trial read as interrupted)."""
    return {Path(result.path).name: result.error for result in results if result.error is not None}


def write_results(experiment: Experiment, trials, params_of: dict, errors: dict) -> dict:
    """Writes trials.parquet and best.json; returns best.json's content."""
    output = experiment.output
    trials.to_parquet(output / "trials.parquet", index=False)
    best = best_trial(trials, params_of, experiment, {trial_id: one_line(err) for trial_id, err in errors.items()})
    (output / "best.json").write_text(json.dumps(best, indent=2, default=float))
    return best


def check_results(experiment: Experiment, best: dict, errors: dict) -> dict:
    """Raises what the user must act on: a trial's refused config, or no figure at all; else returns best."""
    from raydistill.runtime.loop import TrainingError

    refused = {trial_id: found for trial_id, err in errors.items() if (found := user_error(err)) is not None}
    if refused:
        trial_id, err = next(iter(refused.items()))
        others = f", and {len(refused) - 1} other trial(s)" if len(refused) > 1 else ""
        raise ConfigError(err.field, err.value, f"{err.allowed} (in trial {trial_id}{others})")
    if best["value"] is None:
        statuses, output = best["statuses"], experiment.output
        hint = (f"see the trial errors under {output}" if "error" in statuses or best["complete"] else
                "the search's time_budget_s ran out" if "out of time" in statuses else
                f"continue with: raydistill tune --resume {output}")
        raise TrainingError(f"no trial reported {experiment.space.metric}; {hint}")
    return best


def trial_status(trial, epochs_done: int, epochs: int, budget_spent: bool, failed: bool = False) -> str:
    """completed; stopped early (its scheduler's decision: a last result marked done); error (failed: fit() saw it
    fail); out of time (the search's time budget ended it or kept it from starting: final); unfinished (interrupted:
    --resume continues it)."""
    if failed or trial.status == "ERROR":
        return "error"
    if trial.status == "TERMINATED" and epochs_done >= epochs:
        return "completed"
    if trial.status == "TERMINATED" and trial.last_result.get("done"):
        return "stopped early"
    return "out of time" if budget_spent else "unfinished"


def collect_trials(output: Path, space: Space, base: dict, errors: dict):
    """One row per trial in creation order (its hyper-parameters, status, epochs, final and best metric, its last run
    directory), each trial's hyper-parameters as Python values, and the errors of the trials that failed (errors:
    trial_errors(), the failed trials of this fit())."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(output))
    budget_spent = (output / BUDGET_SPENT).exists()
    metric, rows, params_of = space.metric, [], {}
    pick = max if space.mode == "max" else min
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params = params_of[trial.trial_id] = {key: trial.config.get(key) for key in space.params}
        history = trial_history(output / TRIALS_DIR, trial.trial_id)
        scores = history[metric].tolist() if history is not None and metric in history.columns else []
        best_at = pick(range(len(scores)), key=scores.__getitem__) if scores else None
        epochs_done = int(history["epoch"].iloc[-1]) if scores else 0
        dirs = trial_run_dirs(output / TRIALS_DIR, trial.trial_id)
        rows.append({"trial": trial.trial_id,
                     "status": trial_status(trial, epochs_done, _epochs(base, params), budget_spent,
                                            trial.trial_id in errors),
                     **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()},
                     "epochs": epochs_done, f"final_{metric}": scores[-1] if scores else None,
                     f"best_{metric}": scores[best_at] if scores else None,
                     "best_epoch": int(history["epoch"].iloc[best_at]) if scores else None,
                     "run_dir": str(dirs[-1]) if dirs else None})
    columns = ["trial", "status", *space.params, "epochs", f"final_{metric}", f"best_{metric}", "best_epoch", "run_dir"]
    errors = {trial_id: err for trial_id, err in errors.items() if trial_id in params_of}
    return pd.DataFrame(rows, columns=columns), params_of, errors


def _epochs(base: dict, params: dict) -> int:
    """The trial's train.epochs; a config the run refuses has none (its trial failed before any epoch)."""
    try:
        return load_config(base, params).train.epochs
    except ConfigError:
        return load_config(base).train.epochs


def best_trial(trials, params_of: dict, experiment: Experiment, errors: dict) -> dict:
    """The best final figure (a trial's last epoch's, not its best epoch's) among the trials that completed their
    epochs (any trial with a figure if none did; value None when none has one). complete: every trial the search
    creates has finished (completed or stopped early). errors: each failed trial's error line."""
    space, output = experiment.space, experiment.output
    statuses = {str(k): int(v) for k, v in trials["status"].value_counts().items()}
    missing = expected_trials(space, experiment.samples) - len(trials) if experiment.samples is not None else 0
    if missing > 0:                                 # trials the search has not created yet
        left = "out of time" if (output / BUDGET_SPENT).exists() else "not started"
        statuses[left] = statuses.get(left, 0) + missing
    best = {"metric": space.metric, "mode": space.mode, "value": None, "trial": None, "run_dir": None, "params": None,
            "complete": set(statuses) <= set(FINISHED), "statuses": statuses, "errors": errors,
            "experiment": str(output), "config": None}
    final = f"final_{space.metric}"
    scored = trials[trials[final].notna()]
    if scored.empty:
        return best
    completed = scored[scored["status"] == "completed"]
    pool = completed if not completed.empty else scored
    row = pool.loc[pool[final].idxmax() if space.mode == "max" else pool[final].idxmin()]
    params = params_of[row["trial"]]
    best.update(value=float(row[final]), trial=row["trial"], run_dir=row["run_dir"], params=params,
                config=load_config(experiment.base, params).to_dict())
    return best


class _CallableModule(types.ModuleType):
    """`raydistill.tune(config, space)` keeps working once this module is imported over the package's lazy wrapper."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
