"""Wide Residual Networks (Zagoruyko & Komodakis 2016): WRN-depth-width, named ``wrn{depth}_{width}``.

A 3x3 conv to 16 channels, three stages (``layer1``..``layer3``) of n = (depth - 4) / 6 pre-activation blocks with
16k, 32k, 64k channels (k = width), a final BN-ReLU, global average pooling and a linear head ``fc``. A block is
BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3; where it changes the shape the shortcut is a 1x1 conv of the pre-activated
input. Dropout (the paper's 0.3 on CIFAR) is an option, 0 by default.
"""

from __future__ import annotations

from torch import nn

from raydistill.errors import ConfigError
from raydistill.models.cifar_resnet import conv3x3, init_conv_bn
from raydistill.models.registry import image_shape, register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: conv(dropout(relu(bn(conv(relu(bn(x))))))) + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU()
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if reshapes else None

    def forward(self, x):
        activated = self.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-width: stages ``layer1``..``layer3``, final ``bn_final`` + ReLU, head ``fc``."""

    def __init__(self, depth: int, width: int, in_channels: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10 or width < 1:
            raise ValueError(f"WideResNet needs depth = 6n+4 and width >= 1, got {depth}, {width}")
        blocks = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = conv3x3(in_channels, channels[0])
        self.layer1 = _stage(channels[0], channels[1], blocks, 1, dropout)
        self.layer2 = _stage(channels[1], channels[2], blocks, 2, dropout)
        self.layer3 = _stage(channels[2], channels[3], blocks, 2, dropout)
        self.bn_final = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_outputs)
        init_conv_bn(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn_final(x))
        return self.fc(self.avgpool(x).flatten(1))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
    layers = [WideBasicBlock(in_channels, out_channels, stride, dropout)]
    layers += [WideBasicBlock(out_channels, out_channels, 1, dropout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@register_model("wrn{depth}_{width}", pattern=r"wrn(?P<depth>\d+)_(?P<width>\d+)")
def build_wide_resnet(spec, depth: int, width: int, dropout: float = 0.0) -> WideResNet:
    arch = f"wrn{depth}_{width}"
    if (depth - 4) % 6 != 0 or depth < 10 or width < 1:
        allowed = "wrn{depth}_{width} with depth = 6n+4 (10, 16, 22, 28, 40, ...), width >= 1"
        raise ConfigError("model.arch", arch, allowed)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("model.dropout", dropout, "a probability in [0, 1)")
    return WideResNet(depth, width, image_shape(spec, arch)[0], spec.num_classes, dropout)
