"""The feature side of a peer or teacher: a tap on its hint layer and, for a student, the adapters it owns. No Ray.

Hint layers are module paths (``method.features: {student: layer2, teacher: layer2}``; ``net.`` may be left out;
with several teachers ``teacher`` may be a list, one path per teacher), the middle stage of each network by default
(FitNet). A student's adapter maps its hint to the shape of what it learns from: each teacher's hint (fitnet: the
adapter ``teacher``, or ``teacher0``, ``teacher1``... with several teachers), each other peer's hint (peer feature
alignment: ``peer{j}``), or nothing (self: the same network, the same shape).

Attention transfer (fitnet's ``at_weight``) compares the hint pair, or the layer pairs of ``features.attention``
(methods/fitnet.py reads that list): each network taps those layers too, beside its hint.
"""
from __future__ import annotations

import torch
from torch import nn

from raydistill.errors import ConfigError
from raydistill.methods.fitnet import attention_layers
from raydistill.models import build_model
from raydistill.models.adapters import build_adapter, feature_shape, middle_stage
from raydistill.models.taps import FeatureTaps, module_at
from raydistill.seeding import derive_seed


def hint_path(model: nn.Module, configured: str | None, field: str) -> str:
    """The module path of the hint layer: ``configured`` (with or without the ``net.`` prefix), or the middle stage."""
    if configured is None:
        return middle_stage(model)
    for path in (configured, f"net.{configured}"):
        try:
            module_at(model, path)
            return path
        except ConfigError as err:
            allowed = err.allowed
    raise ConfigError(field, configured, allowed)


def feature_paths(method_config) -> dict:
    """The configured hint paths {student, teacher} (absent: the middle stage), and ``attention`` where attention
    transfer is on (fitnet, ``at_weight`` > 0; the method checks its shape); other keys are an error."""
    features = dict(method_config.features or {})
    for key, value in features.items():
        if key == "attention" and not method_config.at_weight:
            raise ConfigError("method.features.attention", value, "layer pairs of attention transfer: only with "
                              "method.at_weight > 0 (method fitnet)")
        if key not in ("student", "teacher", "attention"):
            raise ConfigError(f"method.features.{key}", value, "keys student and teacher (module paths), and "
                              "attention (fitnet: layer pairs of attention transfer)")
    return features


def per_teacher_paths(configured, field: str, count: int) -> list[tuple[str | None, str]]:
    """(configured module path or None for the middle stage, the field that names it) of each of ``count`` teachers:
    ``configured`` names one layer for every teacher, or is a list of one per teacher."""
    if not isinstance(configured, list):
        return [(configured, field)] * count
    if len(configured) != count or not all(path is None or isinstance(path, str) for path in configured):
        raise ConfigError(field, configured, f"one module path for every teacher, or a list of {count} (one per "
                          "teacher, null for its middle stage)")
    return [(path, f"{field}.{j}") for j, path in enumerate(configured)]


def teacher_hint_layers(method_config, count: int) -> list[tuple[str | None, str]]:
    """The hint layer of each of ``count`` teachers: ``features.teacher``, one path for all or a list of one each."""
    return per_teacher_paths(feature_paths(method_config).get("teacher"), "method.features.teacher", count)


def attention_taps(method_config, role: str, count: int = 1, index: int = 0) -> list[tuple[str, str]]:
    """(module path, field) of each attention-transfer layer a network taps beside its hint: the student's side of
    every ``features.attention`` pair (``role`` "student"), or teacher ``index``'s of ``count`` teachers. None
    configured (attention on the hint pair, or off): no extra tap."""
    pairs = attention_layers(method_config) if method_config.at_weight else None
    if not pairs:
        return []
    if role == "student":
        return [(pair.student, f"{pair.field}.student" if pair.named else pair.field) for pair in pairs]
    return [per_teacher_paths(pair.teacher, f"{pair.field}.teacher" if pair.named else pair.field, count)[index]
            for pair in pairs]


def teacher_adapter_names(count: int) -> list[str]:
    """The names of a student's adapters toward ``count`` teachers, in teacher order: ``teacher`` for one teacher (the
    name every one-teacher checkpoint holds), ``teacher0``, ``teacher1``... for several."""
    return ["teacher"] if count == 1 else [f"teacher{j}" for j in range(count)]


def hint_shape(arch: str, options: dict, spec, configured: str | None, field: str) -> tuple:
    """Per-sample shape of an architecture's hint (built once with throw-away weights, never trained)."""
    model = build_model(arch, spec, **(options or {}))
    return feature_shape(model, hint_path(model, configured, field), spec.input_shape)


class Hint:
    """Forward-hook taps on a model's hint layer and its attention-transfer layers (``attention``: (configured path,
    field) each): ``hint.value`` is the hint of the latest forward pass, ``hint.attention`` the maps, in pair order."""

    def __init__(self, model: nn.Module, configured: str | None, field: str, spec,
                 attention: list[tuple[str, str]] = ()):
        self.path = hint_path(model, configured, field)
        self.shape = feature_shape(model, self.path, spec.input_shape)
        self.attention_paths = [hint_path(model, layer, where) for layer, where in attention]
        for path, (layer, where) in zip(self.attention_paths, attention):
            shape = feature_shape(model, path, spec.input_shape)
            if len(shape) != 3:
                raise ConfigError(where, layer, f"a layer whose output is a feature map [C, H, W] (attention "
                                  f"transfer compares spatial maps); {path} gives {shape}")
        self.taps = FeatureTaps(model, [(path, "output") for path in dict.fromkeys([self.path, *self.attention_paths])])

    @property
    def value(self) -> torch.Tensor:
        return self.taps[self.path]

    @property
    def attention(self) -> list[torch.Tensor]:
        return [self.taps[path] for path in self.attention_paths]


def student_hint(model: nn.Module, config, spec) -> Hint:
    """A peer's taps: its hint layer (``features.student``) and the student side of the attention pairs."""
    return Hint(model, feature_paths(config.method).get("student"), "method.features.student", spec,
                attention_taps(config.method, "student"))


def teacher_hint(model: nn.Module, config, index: int, spec) -> Hint:
    """Teacher ``index``'s taps: its hint layer and its side of the attention pairs."""
    layer, field = teacher_hint_layers(config.method, config.num_teachers)[index]
    return Hint(model, layer, field, spec, attention_taps(config.method, "teacher", config.num_teachers, index))


def student_adapters(config, spec, index: int, own_shape: tuple, feature_target: str | None) -> nn.ModuleDict:
    """The adapters peer ``index`` owns: ``teacher`` / ``teacher{j}`` (toward each teacher's hint, in teacher order)
    or ``peer{j}`` (toward each other peer's hint); empty when the student compares its hint as it is. Initialized
    from the run's seed, in this order (so a one-teacher run's adapter is drawn as it always was)."""
    paths = feature_paths(config.method)
    targets = {}
    if feature_target == "teacher":
        teachers = config.teacher_list
        layers = teacher_hint_layers(config.method, len(teachers))
        for name, teacher, (layer, field) in zip(teacher_adapter_names(len(teachers)), teachers, layers):
            targets[name] = hint_shape(teacher.arch, teacher.options, spec, layer, field)
            on_hints = config.method.at_weight and not attention_layers(config.method)
            if on_hints and (len(own_shape) != 3 or len(targets[name]) != 3):
                raise ConfigError("method.at_weight", config.method.at_weight, "0 unless both hints are feature maps "
                                  f"(attention transfer; the hints are {own_shape} and {targets[name]}), or with "
                                  "layer pairs of maps in method.features.attention")
    elif feature_target == "peers":
        for j, peer in enumerate(config.peers):
            if j != index:
                targets[f"peer{j}"] = hint_shape(peer.arch, peer.options, spec, paths.get("student"),
                                                 "method.features.student")
    state = torch.random.get_rng_state()
    torch.manual_seed(derive_seed(config.seed, "init", "adapters", index))
    adapters = nn.ModuleDict({name: build_adapter(own_shape, shape) for name, shape in targets.items()})
    torch.random.set_rng_state(state)          # the adapters do not shift any other draw of the peer
    return adapters
