"""Typed run configuration: one YAML file over typed defaults, `KEY=VALUE` overrides, presets by name, validation.

Every check raises :class:`raydistill.errors.ConfigError`, whose message is the one line a user sees.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from raydistill.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "dml-digits"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")
TASKS = ("classification", "regression")


@dataclass
class DataConfig:
    name: str = "digits"
    root: Union[str, None] = None
    val_fraction: float = 0.1           # validation split carved from the training data (never the test split)
    crop_pad: Union[int, None] = None   # null: the data set's default augmentation
    flip: Union[bool, None] = None
    download: bool = False
    options: dict = field(default_factory=dict)   # source-specific: image_size, num_train, shape, ...


@dataclass
class ModelConfig:
    arch: str = "mlp"                   # every peer's default architecture
    options: dict = field(default_factory=dict)


@dataclass
class PeerConfig:
    arch: Union[str, None] = None       # null: model.arch
    options: Union[dict, None] = None    # null: model.options
    lr: Union[float, None] = None       # null: train.lr


@dataclass
class TeacherConfig:
    arch: str = "resnet56"
    checkpoint: Union[str, None] = None  # a raydistill run directory, an exported .pt, or a torchvision state dict
    options: dict = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "dml"
    temperature: Union[float, None] = None   # null: the method's default (dml 1, kd 4)
    alpha: Union[float, None] = None         # weight of the distillation terms (RepDistiller's convention)
    decay: float = 0.0                       # alpha_e = alpha * exp(-decay * e); 0 = no decay
    ce_weight: Union[float, str, None] = None  # a number, or "complement" (= 1 - alpha, Hinton's convex mix)
    per_peer_views: Union[bool, None] = None   # null: the method's default


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
    steps_in_flight: int = 2            # how many steps the driver lets run ahead before it collects metrics
    checkpoint_every: int = 1           # epochs between checkpoints
    keep_checkpoints: int = 2


@dataclass
class ResourcesConfig:
    gpus_per_peer: float = 0.0          # fractions share a GPU; 0 = CPU
    cpus_per_peer: float = 1.0
    gpus_per_teacher: Union[float, None] = None   # null: gpus_per_peer
    cpus_per_coordinator: float = 1.0
    strategy: str = "PACK"
    address: Union[str, None] = None    # null: a local Ray started for the run (or the one already connected)
    threads_per_peer: int = 1           # torch intra-op threads in each actor; the same in both runtimes


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peers: Any = 3                      # a count, or a list of per-peer overrides ({arch, options, lr})
    teacher: Union[TeacherConfig, None] = None
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
            items = [p if isinstance(p, PeerConfig) else _build(PeerConfig, p, "peers") for p in self.peers]
        return [PeerConfig(arch=p.arch or self.model.arch,
                           options=dict(self.model.options if p.options is None else p.options),
                           lr=self.train.lr if p.lr is None else p.lr) for p in items]

    @property
    def num_peers(self) -> int:
        return self.peers if isinstance(self.peers, int) else len(self.peers)

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


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("config", str(path), f"cannot be read ({err.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
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
        value = yaml.safe_load(raw) if raw.strip() else ""
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
                node = node[_list_index(node, part, parts[:depth + 1])]
                continue
            if part == "peers" and isinstance(node.get(part), int):
                node[part] = [{} for _ in range(node[part])]    # `peers.1.arch=...` over a peer count
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, parts)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(".".join(parts[:-1]), node, "is not a mapping; cannot set a key inside it")
    return data


def _list_index(node: list, part: str, parts) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(".".join(parts), part, f"must be an index below {len(node)}")
    return int(part)


def load_config(source=None, overrides=None) -> Config:
    """The public loader: preset name / file / run dir / dict, plus overrides, resolved and validated."""
    from raydistill.methods import method_defaults   # methods sit above config in the layering only by data

    data = apply_overrides(raw_config(source), overrides)
    config = _build(Config, data, "")
    return resolve(config, method_defaults)


# ---- resolution and validation ------------------------------------------------------------------------------------
def resolve(config: Config, method_defaults) -> Config:
    """Fills every default (method defaults, per-peer entries) and validates; the result is what config.yaml holds."""
    config = copy.deepcopy(config)
    defaults = method_defaults(config.method.name)     # raises ConfigError on an unknown method
    m = config.method
    if m.temperature is None:
        m.temperature = defaults["temperature"]
    if m.alpha is None:
        m.alpha = defaults["alpha"]
    if m.ce_weight is None:
        m.ce_weight = defaults["ce_weight"]
    if m.per_peer_views is None:
        m.per_peer_views = defaults["per_peer_views"]
    if isinstance(config.peers, bool) or not isinstance(config.peers, (int, list)):
        raise ConfigError("peers", config.peers, "must be a count or a list of per-peer settings")
    if isinstance(config.peers, int) and config.peers < 1:
        raise ConfigError("peers", config.peers, "must be at least 1")
    config.peers = config.peer_list
    from raydistill.data import dataset_names, default_augment

    if config.data.name in dataset_names():
        augment = default_augment(config.data.name)
        if config.data.crop_pad is None:
            config.data.crop_pad = augment["crop_pad"]
        if config.data.flip is None:
            config.data.flip = augment["flip"]
    if config.teacher is not None and config.resources.gpus_per_teacher is None:
        config.resources.gpus_per_teacher = config.resources.gpus_per_peer
    validate(config, defaults)
    return config


def validate(config: Config, defaults: dict) -> None:
    from raydistill.data import dataset_names
    from raydistill.models import check_arch

    if config.task not in TASKS:
        raise ConfigError("task", config.task, f"one of: {', '.join(TASKS)}")
    if config.data.name not in dataset_names():
        raise ConfigError("data.name", config.data.name, f"one of: {', '.join(dataset_names())}")
    if not 0.0 <= config.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", config.data.val_fraction, "must be in [0, 1)")
    archs = [("model", config.model.arch, config.model.options)]
    archs += [(f"peers.{i}", p.arch, p.options) for i, p in enumerate(config.peers)]
    if config.teacher is not None:
        archs.append(("teacher", config.teacher.arch, config.teacher.options))
    for where, arch, options in archs:
        try:
            check_arch(arch, options)
        except ConfigError as err:           # name the place in this config: peers.1.arch, teacher.options.x, ...
            field = f"{where}.arch" if err.field == "model.arch" else f"{where}.options.{err.field.split('.', 1)[1]}"
            raise ConfigError(field, err.value, err.allowed) from None
    m = config.method
    if not (isinstance(m.temperature, float) and math.isfinite(m.temperature) and m.temperature > 0):
        raise ConfigError("method.temperature", m.temperature, "must be a number > 0")
    if not (math.isfinite(m.alpha) and m.alpha >= 0):
        raise ConfigError("method.alpha", m.alpha, "must be a number >= 0")
    if m.ce_weight == "complement":
        if m.alpha > 1:
            raise ConfigError("method.alpha", m.alpha, "must be in [0, 1] when method.ce_weight is complement")
    elif isinstance(m.ce_weight, str) or m.ce_weight < 0:
        raise ConfigError("method.ce_weight", m.ce_weight, "must be a number >= 0 or 'complement'")
    if m.decay < 0:
        raise ConfigError("method.decay", m.decay, "must be >= 0")
    if config.num_peers < defaults["min_peers"]:
        raise ConfigError("peers", config.num_peers,
                          f"method {m.name} needs at least {defaults['min_peers']} peers")
    if defaults["needs_teacher"]:
        if config.teacher is None or not config.teacher.checkpoint:
            raise ConfigError("teacher.checkpoint", None if config.teacher is None else config.teacher.checkpoint,
                              f"method {m.name} needs a teacher: {{arch, checkpoint}} (a run directory or a .pt file)")
        if not Path(config.teacher.checkpoint).exists():
            raise ConfigError("teacher.checkpoint", config.teacher.checkpoint, "does not exist")
    t = config.train
    for name in ("epochs", "batch_size", "steps_in_flight", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}", getattr(t, name), "must be >= 1")
    if t.lr <= 0 or any(p.lr <= 0 for p in config.peers):
        raise ConfigError("train.lr", t.lr, "must be > 0")
    if t.schedule not in SCHEDULES:
        raise ConfigError("train.schedule", t.schedule, f"one of: {', '.join(SCHEDULES)}")
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError("train.optimizer", t.optimizer, f"one of: {', '.join(OPTIMIZERS)}")
    r = config.resources
    if r.strategy not in STRATEGIES:
        raise ConfigError("resources.strategy", r.strategy, f"one of: {', '.join(STRATEGIES)}")
    for name in ("gpus_per_peer", "gpus_per_teacher"):
        value = getattr(r, name)
        if value is not None and (value < 0 or (value > 1 and value != int(value))):
            raise ConfigError(f"resources.{name}", value, "must be >= 0: a fraction of one GPU or a whole number")
    if r.cpus_per_peer <= 0 or r.cpus_per_coordinator <= 0:
        raise ConfigError("resources.cpus_per_peer", r.cpus_per_peer, "must be > 0")
    if r.threads_per_peer < 1:
        raise ConfigError("resources.threads_per_peer", r.threads_per_peer, "must be >= 1")


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
