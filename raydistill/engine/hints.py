"""The feature side of a peer or teacher: a tap on its hint layer and, for a student, the adapters it owns. No Ray.

Hint layers are module paths (``method.features: {student: layer2, teacher: layer2}``; ``net.`` may be left out),
the middle stage of each network by default (FitNet). A student's adapter maps its hint to the shape of what it
learns from: the teacher's hint (fitnet), each other peer's hint (peer feature alignment), or nothing (self: the same
network, the same shape).
"""
from __future__ import annotations

import torch
from torch import nn

from raydistill.errors import ConfigError
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
    """The configured hint paths {student, teacher} (absent: the middle stage); unknown keys are an error."""
    features = dict(method_config.features or {})
    for key, value in features.items():
        if key not in ("student", "teacher"):
            raise ConfigError(f"method.features.{key}", value, "keys student and teacher (module paths)")
    return features


def hint_shape(arch: str, options: dict, spec, configured: str | None, field: str) -> tuple:
    """Per-sample shape of an architecture's hint (built once with throw-away weights, never trained)."""
    model = build_model(arch, spec, **(options or {}))
    return feature_shape(model, hint_path(model, configured, field), spec.input_shape)


class Hint:
    """A forward-hook tap on a model's hint layer: ``hint.value`` is the feature of the latest forward pass."""

    def __init__(self, model: nn.Module, configured: str | None, field: str, spec):
        self.path = hint_path(model, configured, field)
        self.shape = feature_shape(model, self.path, spec.input_shape)
        self.taps = FeatureTaps(model, [(self.path, "output")])

    @property
    def value(self) -> torch.Tensor:
        return self.taps[self.path]


def student_adapters(config, spec, index: int, own_shape: tuple, feature_target: str | None) -> nn.ModuleDict:
    """The adapters peer ``index`` owns: ``teacher`` (toward the teacher's hint) or ``peer{j}`` (toward each other
    peer's hint); empty when the student compares its hint as it is. Initialized from the run's seed."""
    paths = feature_paths(config.method)
    targets = {}
    if feature_target == "teacher":
        targets["teacher"] = hint_shape(config.teacher.arch, config.teacher.options, spec, paths.get("teacher"),
                                        "method.features.teacher")
        if config.method.at_weight and (len(own_shape) != 3 or len(targets["teacher"]) != 3):
            raise ConfigError("method.at_weight", config.method.at_weight, "0 unless both hints are feature maps "
                              f"(attention transfer; the hints are {own_shape} and {targets['teacher']})")
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
