"""Architectures by name: one registry (filled by decorator) and the one place that builds a model from a name.

``build_model(arch, spec)`` looks ``arch`` up in our own registry first (CIFAR ResNets, WideResNets, ``cnn_small``,
``mlp``), then among torchvision's classification models, and wraps the network in :class:`Normalized`, so every model
takes float input in [0, 1] (images, NCHW) or raw features ([N, F]) and standardizes it itself.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from raydistill.errors import ConfigError

if TYPE_CHECKING:
    from raydistill.data import DataSpec

# Names whose torchvision builder defaults to auxiliary heads that return tuples instead of one logits tensor.
_AUX_LOGIT_MODELS = ("googlenet", "inception_v3")


@dataclass(frozen=True)
class _Entry:
    name: str
    pattern: re.Pattern
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, pattern: str | None = None):
    """Register ``builder(spec, **options) -> nn.Module`` under ``name``.

    With ``pattern`` (a regular expression matched against the whole arch name) one builder serves a family of names;
    the pattern's named groups reach the builder as int keyword arguments (``wrn(?P<depth>\\d+)_(?P<width>\\d+)``).
    """

    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = _Entry(name, re.compile(pattern or re.escape(name)), builder)
        return builder

    return decorate


def model_names() -> list[str]:
    """Our own architectures in registration order; a family is listed by its template (``wrn{depth}_{width}``).

    ``build_model`` also accepts any torchvision classification model name.
    """
    return list(_REGISTRY)


class Normalized(nn.Module):
    """``net((x - mean) / std)``: the model owns its input normalization, so callers feed [0, 1] images or raw features.

    ``mean`` and ``std`` are per channel (images) or per feature (tabular); ``input_ndim`` is the number of dimensions
    of one sample (3 for C, H, W; 1 for F), which shapes the buffers to broadcast over NCHW or [N, F].
    """

    def __init__(self, net: nn.Module, mean, std, input_ndim: int = 3):
        super().__init__()
        self.net = net
        shape = (1, -1) + (1,) * (input_ndim - 1)
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(shape)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(shape)
        # A constant feature has std 0: centering it is all the standardization it can take.
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def image_shape(spec: DataSpec, arch: str) -> tuple[int, int, int]:
    """(C, H, W) of an image spec; a ConfigError for tabular data, which only ``mlp`` takes."""
    if len(spec.input_shape) != 3:
        shape = tuple(spec.input_shape)
        raise ConfigError("model.arch", arch, f"needs image input (C, H, W), the data has input_shape {shape}: use mlp")
    return tuple(int(d) for d in spec.input_shape)


def in_features(spec: DataSpec) -> int:
    """Number of input values of one sample once flattened."""
    return math.prod(int(d) for d in spec.input_shape)


def _allowed_archs() -> str:
    return "one of: " + ", ".join(model_names()) + ", or any torchvision classification model name"


def _lookup(arch: str) -> tuple[Callable[..., nn.Module], dict[str, int]]:
    """The builder for ``arch`` and the int arguments its name carries; ConfigError when nothing matches."""
    for entry in _REGISTRY.values():
        match = entry.pattern.fullmatch(arch)
        if match:
            return entry.builder, {key: int(value) for key, value in match.groupdict().items()}
    if arch in _torchvision_names():
        return _torchvision_model, {"name": arch}
    raise ConfigError("model.arch", arch, _allowed_archs())


def _check_options(arch: str, builder: Callable, fixed: dict, options: dict) -> None:
    """Unknown options are an error, not silently ignored."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [name for name in params if name != "spec" and name not in fixed]
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(f"model.{key}", value, f"{arch} takes: {', '.join(accepted) or 'no options'}")


def check_arch(arch: str, options: dict | None = None) -> None:
    """Raise ConfigError unless ``build_model`` knows ``arch`` and accepts ``options``; builds nothing."""
    builder, fixed = _lookup(arch)
    _check_options(arch, builder, fixed, options or {})


def build_model(arch: str, spec: DataSpec, **options) -> Normalized:
    """Build ``arch`` for data described by ``spec`` and wrap it in :class:`Normalized`.

    The head has ``spec.num_classes`` outputs: classes, or the number of regression targets. Parameters are drawn
    from torch's global generator only, so ``torch.manual_seed`` fixes them.
    """
    builder, fixed = _lookup(arch)
    _check_options(arch, builder, fixed, options)
    for field in ("mean", "std"):
        values = getattr(spec, field)
        if len(values) != int(spec.input_shape[0]):
            raise ConfigError(f"data.{field}", values, f"one value per channel/feature ({spec.input_shape[0]})")
    net = builder(spec, **fixed, **options)
    return Normalized(net, spec.mean, spec.std, input_ndim=len(spec.input_shape))


def _torchvision_names() -> list[str]:
    import torchvision  # imported on demand: most runs use our own archs

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(spec: DataSpec, name: str, **options) -> nn.Module:
    """A torchvision classification model with fresh weights (none are downloaded) and a ``spec.num_classes`` head.

    Input with other than 3 channels goes through the first conv adapted by :func:`adapt_stem`; extra options go to
    torchvision's builder (e.g. ``dropout``).
    """
    import torchvision

    in_channels = image_shape(spec, name)[0]
    if name in _AUX_LOGIT_MODELS:
        options.setdefault("aux_logits", False)
        options.setdefault("init_weights", True)
    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=spec.num_classes, **options)
    except TypeError as err:
        raise ConfigError("model.options", options, f"options accepted by torchvision's {name} ({err})") from None
    if in_channels != 3:
        adapt_stem(net, in_channels, name)
    return net


def adapt_stem(net: nn.Module, in_channels: int, arch: str) -> None:
    """Make the first conv of an RGB network take ``in_channels`` channels, in place (module paths stay the same).

    Each new input channel gets the sum of the RGB filters divided by ``in_channels``: at initialization the network
    computes exactly what it would on the channel mean repeated to RGB (for grey input: the grey image as RGB).
    """
    stem = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if stem is None or stem.in_channels != 3 or stem.groups != 1:
        allowed = f"a model whose first layer is an RGB conv, to take {in_channels} channels"
        raise ConfigError("model.arch", arch, allowed)
    weight = stem.weight.detach().sum(dim=1, keepdim=True) / in_channels
    stem.weight = nn.Parameter(weight.repeat(1, in_channels, 1, 1))
    stem.in_channels = in_channels
