"""Projection adapters that carry a student's feature into a teacher's (or a peer's) feature shape, owned and trained
by the student (FitNet's regressor, Romero et al. 2015), and the default hint layer of an architecture.

    student feature      teacher feature     adapter
    map [C_s, H_s, W_s]  map [C_t, H_t, W_t]  resize to H_t x W_t (adaptive average pooling when it shrinks, bilinear
                                              interpolation when it grows), then 1x1 conv C_s -> C_t + BN
    vector [F_s]         vector [F_t]         linear F_s -> F_t
    map                  vector               global average pooling, then linear C_s -> F_t
    vector               map                  linear F_s -> C_t*H_t*W_t, reshaped to the map
Shapes are per sample (no batch dimension).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raydistill.errors import ConfigError
from raydistill.models.taps import FeatureTaps, module_at

FeatureShape = tuple[int, ...]


class Resize(nn.Module):
    """Spatial resize of a map [B, C, H, W] to ``size``: adaptive average pooling to shrink, bilinear to grow."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _check_shape(shape, role: str) -> FeatureShape:
    shape = tuple(int(d) for d in shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ConfigError(f"{role} feature shape", shape, "[features] or [channels, height, width] per sample")
    return shape


def build_adapter(student_shape, teacher_shape, identity_when_equal: bool = False) -> nn.Module:
    """The module that maps a student feature of ``student_shape`` to ``teacher_shape`` (see the module's table).

    ``identity_when_equal``: no parameters when the shapes already agree (self-distillation of the same network);
    FitNet's default keeps a learned regressor even then.
    """
    student_shape = _check_shape(student_shape, "student")
    teacher_shape = _check_shape(teacher_shape, "teacher")
    if identity_when_equal and student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        layers = []
        if student_shape[1:] != teacher_shape[1:]:
            layers.append(Resize(teacher_shape[1:]))
        layers += [nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False),
                   nn.BatchNorm2d(teacher_shape[0])]
        return nn.Sequential(*layers)
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    if len(student_shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(student_shape[0], teacher_shape[0]))
    size = teacher_shape[0] * teacher_shape[1] * teacher_shape[2]
    return nn.Sequential(nn.Linear(student_shape[0], size), nn.Unflatten(1, teacher_shape))


@torch.no_grad()
def feature_shape(model: nn.Module, path: str, input_shape, capture: str = "output") -> FeatureShape:
    """Per-sample shape of what the module at ``path`` gives out (or takes in) for inputs of ``input_shape``.

    Runs one forward pass of two zero samples in eval mode (BN running statistics stay untouched), then restores the
    model's mode.
    """
    taps = FeatureTaps(model, [(path, capture)])
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        model(torch.zeros((2, *input_shape), device=device))
        return tuple(taps[path].shape[1:])
    finally:
        taps.remove()
        model.train(was_training)


def middle_stage(model: nn.Module) -> str:
    """The default hint layer (FitNet: the middle of the network): the module path of the middle stage.

    Networks with stages ``layer1``..``layerK`` (our ResNets, WideResNets, cnn_small, mlp, torchvision's ResNets)
    give ``layer{ceil(K/2)}``; otherwise the middle block of the longest sequential container among the network's
    children (torchvision's ``features``: MobileNet, EfficientNet, VGG...).
    """
    net = model.net if hasattr(model, "net") and hasattr(model, "mean") else model
    prefix = "net." if net is not model else ""
    stages = sorted((name for name, _ in net.named_children() if name.startswith("layer") and name[5:].isdigit()),
                    key=lambda name: int(name[5:]))
    if stages:
        return prefix + stages[(len(stages) - 1) // 2]
    sequences = [(name, child) for name, child in net.named_children() if isinstance(child, nn.Sequential)]
    if not sequences:
        raise ConfigError("method.hint_layer", None, "a module path: this model has no stages to take a default from")
    name, longest = max(sequences, key=lambda item: len(item[1]))
    return f"{prefix}{name}.{len(longest) // 2}"


def check_path(model: nn.Module, path: str, field: str) -> None:
    """ConfigError naming ``field`` unless ``path`` is a module of ``model``."""
    try:
        module_at(model, path)
    except ConfigError as err:
        raise ConfigError(field, path, err.allowed) from None
