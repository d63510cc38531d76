"""Small networks for quick runs on a CPU: ``cnn_small`` for images, ``mlp`` for images (flattened) and tabular data."""

from __future__ import annotations

from torch import nn

from raydistill.errors import ConfigError
from raydistill.models.registry import image_shape, in_features, register_model

CNN_SMALL_CHANNELS = (32, 64, 128)
# Pool only inputs of at least this side, so the last two blocks still see 8x8 or more.
CNN_SMALL_MIN_POOL_SIZE = 16


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """Three conv3x3-BN-ReLU blocks ``layer1``..``layer3`` (32/64/128 channels), optional 2x2 max-pool ``pool`` after
    ``layer1``, global average pooling and a linear head ``fc``."""

    def __init__(self, in_channels: int, num_outputs: int, pool: bool):
        super().__init__()
        self.layer1 = conv_bn_relu(in_channels, CNN_SMALL_CHANNELS[0])
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.layer2 = conv_bn_relu(CNN_SMALL_CHANNELS[0], CNN_SMALL_CHANNELS[1])
        self.layer3 = conv_bn_relu(CNN_SMALL_CHANNELS[1], CNN_SMALL_CHANNELS[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(CNN_SMALL_CHANNELS[2], num_outputs)

    def forward(self, x):
        x = self.layer3(self.layer2(self.pool(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class MLP(nn.Module):
    """Flatten, hidden Linear-ReLU layers ``layer1``, ``layer2``, ..., and a linear head ``fc``."""

    def __init__(self, in_features: int, num_outputs: int, hidden: tuple[int, ...]):
        super().__init__()
        self.flatten = nn.Flatten()
        width = in_features
        for index, size in enumerate(hidden, start=1):
            self.add_module(f"layer{index}", nn.Sequential(nn.Linear(width, size), nn.ReLU()))
            width = size
        self.num_hidden = len(hidden)
        self.fc = nn.Linear(width, num_outputs)

    def forward(self, x):
        x = self.flatten(x)
        for index in range(1, self.num_hidden + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(x)


@register_model("cnn_small")
def build_cnn_small(spec) -> SmallCNN:
    channels, height, width = image_shape(spec, "cnn_small")
    return SmallCNN(channels, spec.num_classes, pool=min(height, width) >= CNN_SMALL_MIN_POOL_SIZE)


@register_model("mlp")
def build_mlp(spec, hidden=(256, 256)) -> MLP:
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ConfigError("model.hidden", hidden, "a list of positive layer widths, e.g. [256, 256]")
    return MLP(in_features(spec), spec.num_classes, tuple(hidden))
