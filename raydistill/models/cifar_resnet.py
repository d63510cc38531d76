"""CIFAR ResNets, the 6n+2 family of He et al. 2016 ("Deep Residual Learning for Image Recognition", section 4.2).

A 3x3 conv to 16 channels, then three stages (``layer1``..``layer3``) of n BasicBlocks with 16, 32, 64 channels (the
last two halve the spatial size), global average pooling and a linear head ``fc``. Where a block changes the shape
its shortcut is a 1x1 conv + BN projection (the paper's option B). The pooling is adaptive, so any input size works.
"""

from __future__ import annotations

from torch import nn

from raydistill.models.registry import image_shape, register_model

# Our ReLUs are not in place: a forward hook on a BN layer (a feature tap) must see the BN output, not its ReLU.

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: stages ``layer1``..``layer3`` of n blocks each, head ``fc``."""

    def __init__(self, depth: int, in_channels: int, num_outputs: int):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _stage(16, 16, blocks, stride=1)
        self.layer2 = _stage(16, 32, blocks, stride=2)
        self.layer3 = _stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_outputs)
        init_conv_bn(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_conv_bn(model: nn.Module) -> None:
    """He-normal convs (fan_out, as torchvision's ResNet), BN scale 1 and shift 0; linears keep torch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}")
    def build(spec) -> CifarResNet:
        return CifarResNet(depth, image_shape(spec, f"resnet{depth}")[0], spec.num_classes)


for _depth in CIFAR_RESNET_DEPTHS:
    _register(_depth)
