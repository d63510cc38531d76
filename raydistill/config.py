"""Typed run configuration: one YAML file over typed defaults, `KEY=VALUE` overrides, presets by name, validation.

Every check raises :class:`raydistill.errors.ConfigError`, whose message is the one line a user sees.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from raydistill.errors import ConfigError, read_yaml
from raydistill.files import write_text
from raydistill.names import peer_name

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "dml-digits"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SCHEDULES = ("cosine", "step", "constant", "onecycle")
ONECYCLE_DEFAULTS = {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4}   # torch OneCycleLR's
OPTIMIZERS = ("sgd", "adam", "adamw")
TASKS = ("classification", "regression")


@dataclass
class DataConfig:
    name: str = "digits"
    root: Union[str, None] = None
    val_fraction: float = 0.1           # validation split carved from the training data (never the test split)
    crop_pad: Union[int, None] = None   # null: the data set's default augmentation
    flip: Union[bool, None] = None
    pad_mode: str = "zeros"             # crop padding: zeros (torchvision RandomCrop) or reflect (WRN / DML recipe)
    download: bool = False
    options: dict = field(default_factory=dict)   # source-specific: image_size, num_train, shape, ...
    cache_dir: Union[str, None] = None  # prepared sets: the node-local folder a data.root URI is copied into, once
    digest: Union[str, None] = None     # the set's digest, recorded when a run starts: a resumed run refuses another


@dataclass
class ModelConfig:
    arch: str = "mlp"                   # every peer's default architecture
    options: dict = field(default_factory=dict)


@dataclass
class PeerConfig:
    arch: Union[str, None] = None       # null: model.arch
    options: Union[dict, None] = None    # null: model.options
    lr: Union[float, None] = None       # null: train.lr
    id: Union[int, None] = None         # the peer's stable number: it is named peer<id> in every record (null: next)
    init: Union[str, None] = None       # a peer added to a checkpoint: scratch (default) | ensemble | peer:K
    ranks: Union[int, None] = None      # data-parallel ranks of this peer (null: resources.ranks_per_peer)




@dataclass
class TeacherConfig:
    arch: str = "resnet56"
    checkpoint: Union[str, None] = None  # a raydistill run directory, an exported .pt, or a torchvision state dict
    cache: Union[bool, str] = False      # true: precompute the outputs once per view into <run dir>/teacher_cache
    options: dict = field(default_factory=dict)
    weight: Union[float, None] = None    # this teacher's share of method.teacher_ensemble: weighted (normalized)


@dataclass
class MethodConfig:
    name: str = "dml"
    # temperature and alpha: a number, or a schedule {kind: constant|linear|cosine|exponential, ..., warmup_epochs}
    temperature: Union[float, dict, None] = None   # null: the method's default (dml 1, kd 4)
    alpha: Union[float, dict, None] = None   # weight of the distillation terms (RepDistiller's convention)
    decay: Union[float, None] = None         # alpha_e = alpha * exp(-decay * e) (dkel: beta(e) = exp(-decay * e))
    ce_weight: Union[float, str, None] = None  # a number, or "complement" (= 1 - alpha, Hinton's convex mix)
    per_peer_views: Union[bool, None] = None   # null: the method's default
    # online distillation (kdcl, pcl, dkel); null: the method's default; an error for a method that does not use it
    ensemble: Union[str, None] = None          # mean_logits | mean_probs | minlogit | best (| learned_head: pcl, dkel)
    rampup_epochs: Union[float, None] = None   # R of w(e); null: min(80, 0.4 * train.epochs)
    ema_momentum: Union[float, None] = None    # EMA teacher momentum per step (0.999)
    teacher_init_steps: Union[int, None] = None  # CE steps of a fresh EMA teacher at lr = lr / 100 (dkel: 2)
    reference_quirks: Union[bool, None] = None   # true: the released code's ramp and EMA warm-up
    beta_floor: Union[float, None] = None      # dkel: beta(e) is 0 below this (0.01)
    # feature distillation (fitnet, self, and peer feature alignment in dml / kdcl)
    features: Union[dict, None] = None         # hint layers {student: layer2, teacher: layer2}; default: middle stage
    hint_weight: Union[float, None] = None     # fitnet: weight of MSE(adapter(f_student), f_teacher) (100)
    kd_weight: Union[float, None] = None       # fitnet one-stage: weight of KD beside the hint (0)
    at_weight: Union[float, None] = None       # fitnet: weight of attention transfer, summed over its pairs (0)
    at_form: Union[str, None] = None           # fitnet: code (the authors' released at_loss, default) | paper
    hint_epochs: Union[int, None] = None       # fitnet two-stage: epochs of hints alone before KD (0: one-stage)
    feature_weight: Union[float, None] = None  # dml / kdcl: weight of peer feature alignment (0: off)
    peer_weighting: Union[str, None] = None    # dml: uniform | performance (weights from the peers' val loss)
    generations: Union[int, None] = None       # self: 1 = EMA teacher, K >= 2 = born-again generations
    hidden_weight: Union[float, None] = None   # self: weight of the hidden-layer MSE to the teacher's (0)
    # several teachers (kd, fitnet): how their logits make one target: mean_logits | mean_probs | weighted
    teacher_ensemble: Union[str, None] = None
    # resources.transport=codistill (dml, kdcl, pcl, dkel): the peers exchange weights every k steps of an epoch
    codistill_every: Union[int, None] = None


@dataclass
class HealthConfig:
    """train.health: the health watch (policies/health.py). Absent or null: off, and a non-finite loss stops the run."""
    max_consistency: Union[float, None] = None   # bound on the peers' validation consistency (null: not watched)
    patience: int = 1                   # epochs in a row above max_consistency before the rule fires
    action: str = "rollback"            # rollback (to the last good checkpoint, data re-seeded) | stop
    max_rollbacks: int = 3              # rollbacks a run may take; the next unhealthy stretch stops it


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    optimizer: str = "sgd"
    schedule: str = "cosine"            # per-step cosine to 0, "step" (milestones x gamma), or "constant"
    milestones: list = field(default_factory=list)   # epochs, for schedule "step"
    gamma: float = 0.1
    warmup_epochs: float = 0.0          # linear learning-rate warm-up
    # schedule "onecycle" (torch OneCycleLR, cosine, per step, no momentum cycling): warm-up fraction of all steps,
    # start lr = lr / div_factor, final lr = start lr / final_div_factor
    pct_start: float = ONECYCLE_DEFAULTS["pct_start"]
    div_factor: float = ONECYCLE_DEFAULTS["div_factor"]
    final_div_factor: float = ONECYCLE_DEFAULTS["final_div_factor"]
    steps_in_flight: int = 2            # object-store transport: steps the driver lets run ahead of their metrics
    steps_per_call: Union[int, None] = None   # steps a worker runs per call (null: to the epoch's end or the next
                                              # checkpoint_every_steps point); rollback points fall on call boundaries
    checkpoint_every: int = 1           # epochs between checkpoints
    checkpoint_every_steps: Union[int, None] = None   # also keep an in-memory rollback point every N steps
    keep_checkpoints: int = 2
    storage: Union[str, None] = None    # mirror the run directory here: a path or a URI such as s3://bucket/runs/x
    grad_clip: Union[float, None] = None  # clip the gradient's global L2 norm to this (null: no clipping)
    accumulate_steps: int = 1           # optimizer step every N steps, on the mean gradient of their batches
    bf16: bool = False                  # bfloat16 autocast of the forward passes on a GPU (ignored on a CPU)
    channels_last: bool = False         # image models and batches in channels_last memory format on a GPU (ignored
                                        # on a CPU)
    compile: str = "none"               # none | graphs: each peer's model compiled with CUDA graphs
                                        # (torch.compile mode "reduce-overhead"); GPU only
    sync_bn: bool = False               # a peer of several ranks: batch norm statistics over all its ranks' rows
                                        # (torch's SyncBatchNorm; GPU only)
    health: Union[HealthConfig, None] = None   # the health watch: {max_consistency, patience, action, max_rollbacks}


@dataclass
class ResourcesConfig:
    gpus_per_peer: float = 0.0          # a rank's device: fractions share a GPU; 0 = CPU
    ranks_per_peer: int = 1             # data-parallel ranks of every peer (a peer's own `ranks` overrides it)
    cpus_per_peer: float = 1.0
    gpus_per_teacher: Union[float, None] = None   # null: gpus_per_peer
    cpus_per_coordinator: float = 1.0
    strategy: str = "PACK"
    address: Union[str, None] = None    # null: a local Ray started for the run (or the one already connected)
    threads_per_peer: int = 1           # torch intra-op threads in each actor; the same in both runtimes
    transport: str = "auto"             # how a step's outputs travel: auto | collective | object_store | codistill
    peers_per_worker: Union[int, None] = None   # peers (and teachers) one worker process hosts (null: auto)
    peer_execution: str = "loop"        # how a worker runs its peers: loop (one after another) | stacked (peers of
                                        # one architecture as one batched model, torch.func.vmap)
    collective_timeout_s: float = 60.0  # a collective that waits longer fails, and the run recovers
    max_restarts: int = 3               # how often Ray restarts a dead peer/teacher/coordinator before the run stops
    node_wait_s: float = 300.0          # how long a run waits for a lost actor (or node) to come back


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peers: Any = 3                      # a count, or a list of per-peer overrides ({arch, options, lr})
    teacher: Union[TeacherConfig, None] = None   # one teacher
    teachers: Union[list, None] = None           # or several: a list of {arch, checkpoint, options, cache, weight}
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    # ---- derived views -------------------------------------------------------------------------------------------
    @property
    def peer_list(self) -> list[PeerConfig]:
        """The peers with every default filled in (after :func:`resolve`, ``peers`` is already this list)."""
        if isinstance(self.peers, int):
            items = [PeerConfig() for _ in range(self.peers)]
        else:
            items = [p if isinstance(p, PeerConfig) else _build(PeerConfig, p, f"peers.{i}")
                     for i, p in enumerate(self.peers)]
        taken = [p.id for p in items if isinstance(p.id, int) and not isinstance(p.id, bool)]
        fresh = iter(range(max(taken, default=-1) + 1, max(taken, default=-1) + 1 + len(items)))
        return [PeerConfig(arch=p.arch or self.model.arch,
                           options=dict(self.model.options if p.options is None else p.options),
                           lr=self.train.lr if p.lr is None else p.lr,
                           id=p.id if p.id is not None else next(fresh), init=p.init,
                           ranks=self.resources.ranks_per_peer if p.ranks is None else p.ranks) for p in items]

    @property
    def peer_names(self) -> list[str]:
        """Each peer's stable name in records, summary and export: peer<id>."""
        return [peer_name(p.id) for p in self.peer_list]

    @property
    def num_peers(self) -> int:
        return self.peers if isinstance(self.peers, int) else len(self.peers)

    @property
    def teacher_list(self) -> list[TeacherConfig]:
        """The run's teachers in member order: ``teacher`` as a list of one, or ``teachers``; [] without any."""
        if self.teacher is not None:
            return [self.teacher]
        return [t if isinstance(t, TeacherConfig) else _build(TeacherConfig, t, f"teachers.{j}")
                for j, t in enumerate(self.teachers or [])]

    @property
    def num_teachers(self) -> int:
        return len(self.teacher_list)

    def teacher_field(self, index: int) -> str:
        """Where teacher ``index`` is written in this config, for errors: ``teacher`` or ``teachers.{index}``."""
        return "teacher" if self.teacher is not None else f"teachers.{index}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- building dataclasses from plain dicts, with the field path in every error -----------------------------------
def _build(cls, data, path: str):
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(path, data, f"must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{path}.{key}" if path else key, data[key],
                              f"unknown key; allowed: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            sub = f"{path}.{f.name}" if path else f.name
            values[f.name] = _coerce(hints[f.name], data[f.name], sub)
    return cls(**values)


def _coerce(tp, value, path):
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1 and dataclasses.is_dataclass(choices[0]):
            return _coerce(choices[0], value, path)     # an optional section: its own error names the inner field
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                errors.append(err.allowed)
        raise ConfigError(path, value, " or ".join(errors))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "must be a string")
        return value
    if tp in (dict, list) or origin in (dict, list):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(path, value, f"must be a {'mapping' if base is dict else 'list'}")
        return copy.deepcopy(value)
    return value


# ---- loading ------------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_description(name: str) -> str:
    """A preset's leading comment, whole (it may run over several lines)."""
    lines = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("config", str(path), f"cannot be read ({err.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else read_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        first = str(err).splitlines()[0]
        raise ConfigError("config", str(path), f"is not valid YAML/JSON ({first})") from None
    if isinstance(data, dict) and path.suffix == ".json" and isinstance(data.get("config"), dict):
        data = data["config"]      # a Tune best.json carries the resolved config under "config"
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "must hold a mapping of config keys")
    return data


def raw_config(source: Union[str, os.PathLike, dict, None]) -> dict:
    """The user's mapping for a preset name, a YAML/JSON file, a run directory, or a dict (None: the default preset)."""
    if source is None:
        source = DEFAULT_PRESET
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if path.is_dir():
        return _read_mapping(path / "config.yaml")
    if path.is_file():
        return _read_mapping(path)
    if str(source) in preset_names():
        return _read_mapping(PRESET_DIR / f"{source}.yaml")
    raise ConfigError("config", str(source), f"is neither a file nor a preset; presets: {', '.join(preset_names())}")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as YAML (numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ConfigError("--set", text, "must look like key.path=value")
    key, _, raw = text.partition("=")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides) -> dict:
    """Sets `a.b.c` paths in a plain mapping; intermediate mappings are created, list items addressed by index."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or ())
    for key, value in items:
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = _list_index(node, part, parts[:depth + 1])
                if index == len(node):                  # `peers.3.arch=...` after 3 peers: a fourth
                    node.append({})
                node = node[index]
                continue
            if part == "peers" and isinstance(node.get(part), int):
                node[part] = [{} for _ in range(node[part])]    # `peers.1.arch=...` over a peer count
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            index = _list_index(node, last, parts)
            node[index:index + 1] = [value]
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(".".join(parts[:-1]), node, "is not a mapping; cannot set a key inside it")
    return data


def _list_index(node: list, part: str, parts) -> int:
    """An item's index, or the list's length: one item more (a peer added by ``--set peers.3.arch=...``)."""
    if not part.isdigit() or int(part) > len(node):
        raise ConfigError(".".join(parts), part, f"must be an index up to {len(node)} ({len(node)}: one more)")
    return int(part)


def load_config(source=None, overrides=None) -> Config:
    """The public loader: preset name / file / run dir / dict, plus overrides, resolved and validated."""
    from raydistill.methods import method_defaults   # methods sit above config in the layering only by data

    data = apply_overrides(inherited_peers(raw_config(source)), overrides)
    config = _build(Config, data, "")
    return resolve(config, method_defaults)


def inherited_peers(data: dict) -> dict:
    """A resolved config (a run's config.yaml, a Tune best.json) lists every peer's arch, options and lr; a value
    equal to its run-wide default (model.arch, model.options, train.lr) is the default, and follows an override of
    it (``--resume DIR --set train.lr=0.01`` changes every peer that had train.lr)."""
    peers = data.get("peers")
    if not isinstance(peers, list):
        return data
    model, train = data.get("model") or {}, data.get("train") or {}
    defaults = {"arch": model.get("arch", ModelConfig.arch), "options": model.get("options", {}),
                "lr": train.get("lr", TrainConfig.lr)}
    data = copy.deepcopy(data)
    data["peers"] = [{k: v for k, v in peer.items() if not (k in defaults and v == defaults[k])}
                     if isinstance(peer, dict) else peer for peer in peers]
    return data


# ---- resolution and validation ------------------------------------------------------------------------------------
def resolve(config: Config, method_defaults) -> Config:
    """Fills every default (method defaults, per-peer entries) and validates; the result is what config.yaml holds."""
    config = copy.deepcopy(config)
    defaults = method_defaults(config.method.name)     # raises ConfigError on an unknown method
    m = config.method
    from raydistill.methods import methods_using

    ramp_given = m.rampup_epochs is not None
    for key in (f.name for f in dataclasses.fields(MethodConfig) if f.name != "name"):
        if getattr(m, key) is None:
            setattr(m, key, defaults.get(key))
        elif key not in defaults:              # a key the method would silently ignore
            raise ConfigError(f"method.{key}", getattr(m, key),
                              f"not used by method {m.name}; used by: {', '.join(methods_using(key))}")
    if m.rampup_epochs is not None and not ramp_given:
        # the sources ramp over 80 of 200 epochs; a shorter run keeps that fraction
        m.rampup_epochs = min(float(m.rampup_epochs), 0.4 * config.train.epochs)
    if isinstance(config.peers, bool) or not isinstance(config.peers, (int, list)):
        raise ConfigError("peers", config.peers, "must be a count or a list of per-peer settings")
    if isinstance(config.peers, int) and config.peers < 1:
        raise ConfigError("peers", config.peers, "must be at least 1")
    config.peers = config.peer_list
    _resolve_teachers(config)
    from raydistill.data import dataset_names, default_augment

    if config.data.name in dataset_names():
        augment = default_augment(config.data.name)
        if config.data.crop_pad is None:
            config.data.crop_pad = augment["crop_pad"]
        if config.data.flip is None:
            config.data.flip = augment["flip"]
    if config.teacher_list and config.resources.gpus_per_teacher is None:
        config.resources.gpus_per_teacher = config.resources.gpus_per_peer
    validate(config, defaults)
    return config


def _resolve_teachers(config: Config) -> None:
    """``teachers`` as TeacherConfig items (errors name ``teachers.{j}.key``); ``teacher`` and ``teachers`` together,
    or an empty list, are refused. ``teacher`` stays as written: the one-teacher form of a list of one."""
    if config.teachers is None:
        return
    if not isinstance(config.teachers, list):
        raise ConfigError("teachers", config.teachers, "must be a list of teachers {arch, checkpoint, options, "
                          "cache, weight}")
    if config.teacher is not None:
        raise ConfigError("teachers", [t.get("arch") if isinstance(t, dict) else getattr(t, "arch", t)
                                       for t in config.teachers],
                          "give either teacher (one teacher) or teachers (a list of teachers), not both")
    if not config.teachers:
        raise ConfigError("teachers", [], "a list of at least one teacher {arch, checkpoint}, or leave it out")
    config.teachers = config.teacher_list


def validate(config: Config, defaults: dict) -> None:
    """Every range and combination a run depends on, in named parts; the first problem raises a ConfigError."""
    _check_run(config)
    _check_archs(config)
    _check_method(config, defaults)
    _check_teachers(config)
    _check_train(config)
    _check_resources(config)
    from raydistill.engine.grid import check_config as check_grid

    check_grid(config)                        # peers of several ranks
    _check_peer_execution(config)
    _check_compile(config)


NAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_run(config: Config) -> None:
    from raydistill.data import check_root, dataset_names

    if not isinstance(config.name, str) or not NAME_CHARS.match(config.name) or ".." in config.name:
        raise ConfigError("name", config.name, "letters, digits, '.', '_' and '-' only (it names the run directory "
                          "under runs/; use --output for a path)")
    if config.task not in TASKS:
        raise ConfigError("task", config.task, f"one of: {', '.join(TASKS)}")
    if config.data.name not in dataset_names():
        raise ConfigError("data.name", config.data.name, f"one of: {', '.join(dataset_names())}")
    check_root(config.data.name, config.data.root)
    if config.data.cache_dir is not None and config.data.name != "prepared":
        raise ConfigError("data.cache_dir", config.data.cache_dir, "only for data.name prepared")
    if not (math.isfinite(config.data.val_fraction) and 0.0 <= config.data.val_fraction < 1.0):
        raise ConfigError("data.val_fraction", config.data.val_fraction, "must be in [0, 1)")


def _check_archs(config: Config) -> None:
    from raydistill.models import check_arch

    archs = [("model", config.model.arch, config.model.options)]
    archs += [(f"peers.{i}", p.arch, p.options) for i, p in enumerate(config.peers)]
    archs += [(config.teacher_field(j), t.arch, t.options) for j, t in enumerate(config.teacher_list)]
    for where, arch, options in archs:
        try:
            check_arch(arch, options)
        except ConfigError as err:           # name the place in this config: peers.1.arch, teachers.0.options.x, ...
            field = f"{where}.arch" if err.field == "model.arch" else f"{where}.options.{err.field.split('.', 1)[1]}"
            raise ConfigError(field, err.value, err.allowed) from None


def _check_method(config: Config, defaults: dict) -> None:
    m = config.method
    temperatures = _schedule_values(m.temperature, "method.temperature", config.train.epochs)
    if not all(math.isfinite(t) and t > 0 for t in temperatures):
        raise ConfigError("method.temperature", m.temperature, "must be a number > 0 (at every epoch)")
    alphas = _schedule_values(m.alpha, "method.alpha", config.train.epochs)
    if not all(math.isfinite(a) and a >= 0 for a in alphas):
        raise ConfigError("method.alpha", m.alpha, "must be a number >= 0 (at every epoch)")
    if m.ce_weight == "complement":
        if max(alphas) > 1:
            raise ConfigError("method.alpha", m.alpha, "must be in [0, 1] when method.ce_weight is complement")
    elif isinstance(m.ce_weight, str) or not math.isfinite(m.ce_weight) or m.ce_weight < 0:
        raise ConfigError("method.ce_weight", m.ce_weight, "must be a number >= 0 or 'complement'")
    if not (math.isfinite(m.decay) and m.decay >= 0):
        raise ConfigError("method.decay", m.decay, "must be a number >= 0")
    from raydistill.methods import check_method_config

    check_method_config(config)               # the peers and teachers it needs, its own keys
    if m.generations is not None and m.generations > config.train.epochs:
        raise ConfigError("method.generations", m.generations, f"at most train.epochs ({config.train.epochs}): "
                          "each generation trains for train.epochs / generations epochs")


def _check_teachers(config: Config) -> None:
    """Each teacher's weight: >= 0, read by method.teacher_ensemble=weighted only, and then given for every teacher
    with a positive sum (the weights are normalized to sum 1)."""
    teachers, ensemble = config.teacher_list, config.method.teacher_ensemble
    for j, teacher in enumerate(teachers):
        weight = teacher.weight
        if weight is not None and not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"{config.teacher_field(j)}.weight", weight, "must be a number >= 0")
        if weight is not None and ensemble != "weighted":
            raise ConfigError(f"{config.teacher_field(j)}.weight", weight,
                              f"read only by method.teacher_ensemble=weighted (this run has {ensemble})")
    if ensemble == "weighted" and teachers:
        missing = [config.teacher_field(j) for j, t in enumerate(teachers) if t.weight is None]
        if missing:
            raise ConfigError("method.teacher_ensemble", ensemble, "needs a weight on every teacher "
                              f"({', '.join(f'{where}.weight' for where in missing)} not given)")
        if sum(t.weight for t in teachers) <= 0:
            raise ConfigError("method.teacher_ensemble", ensemble, "needs teachers' weights with a sum > 0 "
                              f"(given: {[t.weight for t in teachers]})")


def _positive(value) -> bool:
    return math.isfinite(value) and value > 0


def _check_train(config: Config) -> None:
    t = config.train
    if t.grad_clip is not None and not _positive(t.grad_clip):
        raise ConfigError("train.grad_clip", t.grad_clip, "must be a number > 0, or null for no clipping")
    for name in ("epochs", "batch_size", "steps_in_flight", "checkpoint_every", "keep_checkpoints",
                 "accumulate_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}", getattr(t, name), "must be >= 1")
    for name in ("steps_per_call", "checkpoint_every_steps"):
        if getattr(t, name) is not None and getattr(t, name) < 1:
            raise ConfigError(f"train.{name}", getattr(t, name), "must be >= 1 or null")
    if not _positive(t.lr):
        raise ConfigError("train.lr", t.lr, "must be a finite number > 0")
    from raydistill.engine.elastic import check_peer_ids

    check_peer_ids(config)                    # stable ids, and what a new peer starts from
    for i, peer in enumerate(config.peers):
        if not _positive(peer.lr):
            raise ConfigError(f"peers.{i}.lr", peer.lr, "must be a finite number > 0")
    for name in ("weight_decay", "warmup_epochs"):
        value = getattr(t, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"train.{name}", value, "must be a finite number >= 0")
    if not (math.isfinite(t.momentum) and 0 <= t.momentum < 1):
        raise ConfigError("train.momentum", t.momentum, "must be in [0, 1)")
    if not (math.isfinite(t.gamma) and t.gamma > 0):
        raise ConfigError("train.gamma", t.gamma, "must be a finite number > 0")
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in t.milestones):
        raise ConfigError("train.milestones", t.milestones, "must be a list of epochs (integers >= 0)")
    if t.schedule not in SCHEDULES:
        raise ConfigError("train.schedule", t.schedule, f"one of: {', '.join(SCHEDULES)}")
    _check_onecycle(t)
    from raydistill.data.views import PAD_MODES

    if config.data.pad_mode not in PAD_MODES:
        raise ConfigError("data.pad_mode", config.data.pad_mode, f"one of: {', '.join(PAD_MODES)}")
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError("train.optimizer", t.optimizer, f"one of: {', '.join(OPTIMIZERS)}")
    if t.health is not None:
        from raydistill.policies.health import check_config as check_health

        check_health(config)



def _check_resources(config: Config) -> None:
    r = config.resources
    if r.strategy not in STRATEGIES:
        raise ConfigError("resources.strategy", r.strategy, f"one of: {', '.join(STRATEGIES)}")
    from raydistill.transports import check_transport

    check_transport(config)                  # a known transport, and its own rules
    for name in ("gpus_per_peer", "gpus_per_teacher"):
        value = getattr(r, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (value > 1 and value != int(value))):
            raise ConfigError(f"resources.{name}", value, "must be >= 0: a fraction of one GPU or a whole number")
    for name in ("cpus_per_peer", "cpus_per_coordinator", "node_wait_s", "collective_timeout_s"):
        if not _positive(getattr(r, name)):
            raise ConfigError(f"resources.{name}", getattr(r, name), "must be a number > 0")
    if r.max_restarts < 0:
        raise ConfigError("resources.max_restarts", r.max_restarts, "must be >= 0")
    if r.threads_per_peer < 1:
        raise ConfigError("resources.threads_per_peer", r.threads_per_peer, "must be >= 1")
    if r.peers_per_worker is not None and r.peers_per_worker < 1:
        raise ConfigError("resources.peers_per_worker", r.peers_per_worker, "must be >= 1, or null (auto)")


PEER_EXECUTIONS = ("loop", "stacked")
COMPILE_MODES = ("none", "graphs")


def _check_peer_execution(config: Config) -> None:
    """resources.peer_execution: stacked runs a worker's peers as one model over stacked weights (engine/stack.py):
    one architecture, one learning rate, and nothing that reaches into a single peer's model during its forward."""
    r = config.resources
    if r.peer_execution not in PEER_EXECUTIONS:
        raise ConfigError("resources.peer_execution", r.peer_execution, f"one of: {', '.join(PEER_EXECUTIONS)}")
    if r.peer_execution != "stacked":
        return
    peers = config.peer_list
    for i, peer in enumerate(peers[1:], start=1):
        for key in ("arch", "options", "lr"):
            if getattr(peer, key) != getattr(peers[0], key):
                raise ConfigError(f"peers.{i}.{key}", getattr(peer, key),
                                  f"the same as peers.0.{key} ({getattr(peers[0], key)!r}) with "
                                  "resources.peer_execution=stacked (one model over stacked weights)")
    from raydistill.methods import build_method

    method = build_method(config)
    if method.self_teacher or method.uses_hint or method.feature_taps():
        what = ("its peers learn from their own teacher" if method.self_teacher
                else "its peers tap hidden features" if method.uses_hint
                else "its ensemble head reads the peers' features")
        raise ConfigError("resources.peer_execution", "stacked", f"not for method {config.method.name} as "
                          f"configured: {what}; use resources.peer_execution=loop")
    refusals = (("train.grad_clip", config.train.grad_clip, config.train.grad_clip is not None,
                 "null with resources.peer_execution=stacked (a stacked gradient has no per-peer norm here)"),
                ("resources.transport", r.transport, _stale_copies(config),
                 "not codistill with resources.peer_execution=stacked (each worker keeps stale single copies)"))
    for field_name, value, refused, allowed in refusals:
        if refused:
            raise ConfigError(field_name, value, allowed)


def _check_compile(config: Config) -> None:
    """train.compile: graphs (CUDA graphs through torch.compile "reduce-overhead") needs a GPU and steps whose
    shapes and code paths never change."""
    t = config.train
    if t.compile not in COMPILE_MODES:
        raise ConfigError("train.compile", t.compile, f"one of: {', '.join(COMPILE_MODES)}")
    if not isinstance(t.channels_last, bool):
        raise ConfigError("train.channels_last", t.channels_last, "true or false")
    if t.compile == "none":
        return
    if config.resources.gpus_per_peer <= 0:
        raise ConfigError("train.compile", t.compile, "none on CPUs: CUDA graphs need GPUs "
                          "(resources.gpus_per_peer > 0)")
    if config.method.name == "self" and (config.method.generations or 1) >= 2:
        raise ConfigError("train.compile", t.compile, "none with born-again generations (method.generations >= 2): "
                          "a generation switch rebuilds the student, which a captured graph cannot follow")
    if _stale_copies(config):
        raise ConfigError("train.compile", t.compile, "none with resources.transport=codistill (the stale copies' "
                          "weights are reloaded between captures)")
    from raydistill.methods import build_method

    method = build_method(config)
    if method.uses_hint or method.feature_taps():
        raise ConfigError("train.compile", t.compile, f"none for method {config.method.name} as configured: its "
                          "peers' hidden features are read by hooks, which a captured graph does not run")


def _stale_copies(config: Config) -> bool:
    from raydistill.transports import transport_of

    return transport_of(config).stale_copies


def check_data_fits(config: Config, num_train: int) -> None:
    """Checks that need the data set's size (the driver calls it once the data is loaded)."""
    if config.train.batch_size > num_train:
        raise ConfigError("train.batch_size", config.train.batch_size,
                          f"at most the {num_train:,} training samples of data set {config.data.name}")


def _check_onecycle(t: TrainConfig) -> None:
    """The one-cycle knobs: in range, and set only where the schedule reads them (no key is silently ignored)."""
    if t.schedule != "onecycle":
        for name, default in ONECYCLE_DEFAULTS.items():
            if getattr(t, name) != default:
                raise ConfigError(f"train.{name}", getattr(t, name), "used only by train.schedule onecycle")
        return
    if not 0.0 <= t.pct_start <= 1.0:
        raise ConfigError("train.pct_start", t.pct_start, "a fraction of the steps in [0, 1]")
    for name in ("div_factor", "final_div_factor"):
        if not (math.isfinite(getattr(t, name)) and getattr(t, name) > 0):
            raise ConfigError(f"train.{name}", getattr(t, name), "a number > 0")
    if t.warmup_epochs:
        raise ConfigError("train.warmup_epochs", t.warmup_epochs, "0 with train.schedule onecycle (its warm-up is "
                          "train.pct_start)")


def _schedule_values(spec, field: str, epochs: int) -> list[float]:
    """A number or a schedule's value at every epoch of the run (ConfigError for a malformed schedule)."""
    from raydistill.distill.schedules import make_schedule

    schedule = make_schedule(spec, None, field)
    return [schedule(epoch, epochs) for epoch in range(epochs)]


CONFIG_HEADER = "# written by raydistill (sha256 {digest}); change a run's settings with --resume RUN --set key=value\n"


def dump_config(config: Config, path: Path) -> None:
    """A run's config.yaml, written whole or not at all, headed by the digest of what follows: a resume refuses a
    file that no longer matches it (``check_written``), damaged or edited by hand."""
    body = yaml.safe_dump(config.to_dict(), sort_keys=False)
    write_text(path, CONFIG_HEADER.format(digest=hashlib.sha256(body.encode()).hexdigest()) + body)


def check_written(path: Path) -> None:
    """A run directory's config.yaml is the one the run wrote: the digest in its first line matches the rest (a file
    without that line was written before digests and is taken as it is)."""
    text = Path(path).read_text()
    first, _, body = text.partition("\n")
    found = re.fullmatch(r"# written by raydistill \(sha256 ([0-9a-f]{64})\).*", first)
    if found and hashlib.sha256(body.encode()).hexdigest() != found.group(1):
        raise ConfigError("--resume", str(Path(path).parent),
                          f"{path} is not the config the run wrote (damaged, or edited by hand); change a run's "
                          "settings with --resume RUN --set key=value, or put the file back")
