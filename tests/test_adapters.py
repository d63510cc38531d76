"""Projection adapters between the middle stages of every pair of supported architectures, and the hint layer."""
import itertools

import pytest
import torch

from raydistill.data import DataSpec
from raydistill.errors import ConfigError
from raydistill.models import build_model
from raydistill.models.adapters import Resize, build_adapter, feature_shape, middle_stage
from raydistill.models.taps import FeatureTaps

ARCHS = ("resnet20", "resnet32", "resnet56", "wrn16_4", "cnn_small", "mlp", "mobilenet_v2")
SPEC = DataSpec("classification", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
# the middle stage each architecture's hint is taken from, and its per-sample shape on 32x32 RGB input
EXPECTED = {
    "resnet20": ("net.layer2", (32, 16, 16)),
    "resnet32": ("net.layer2", (32, 16, 16)),
    "resnet56": ("net.layer2", (32, 16, 16)),
    "wrn16_4": ("net.layer2", (128, 16, 16)),
    "cnn_small": ("net.layer2", (64, 16, 16)),
    "mlp": ("net.layer1", (256,)),
    "mobilenet_v2": ("net.features.9", (64, 2, 2)),
}


@pytest.fixture(scope="module")
def middle_shapes():
    shapes = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = build_model(arch, SPEC)
        path = middle_stage(model)
        shapes[arch] = (path, feature_shape(model, path, SPEC.input_shape))
    return shapes


def test_middle_stage_and_its_shape(middle_shapes):
    assert middle_shapes == EXPECTED


def test_taps_capture_the_stage_output_the_network_computes():
    torch.manual_seed(0)
    model = build_model("resnet20", SPEC).eval()
    taps = FeatureTaps(model, [("net.layer2", "output"), ("net.fc", "input")])
    x = torch.rand(3, 3, 32, 32)
    logits = model(x)
    net = model.net
    with torch.no_grad():
        stem = net.relu(net.bn1(net.conv1((x - model.mean) / model.std)))
        layer2 = net.layer2(net.layer1(stem))
        pooled = net.avgpool(net.layer3(layer2)).flatten(1)
    torch.testing.assert_close(taps["net.layer2"], layer2)
    torch.testing.assert_close(taps["net.fc"], pooled)
    torch.testing.assert_close(net.fc(taps["net.fc"]), logits)


@pytest.mark.parametrize("student,teacher", list(itertools.product(ARCHS, ARCHS)))
def test_adapter_maps_student_feature_to_teacher_shape(middle_shapes, student, teacher):
    student_shape, teacher_shape = middle_shapes[student][1], middle_shapes[teacher][1]
    adapter = build_adapter(student_shape, teacher_shape)
    features = torch.randn(4, *student_shape, requires_grad=True)
    out = adapter(features)
    assert tuple(out.shape) == (4, *teacher_shape)
    out.square().mean().backward()                    # trained by the student: gradients reach its feature
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert sum(p.numel() for p in adapter.parameters()) > 0


def test_adapter_kinds():
    conv = build_adapter((32, 16, 16), (64, 8, 8))
    assert isinstance(conv[0], Resize) and isinstance(conv[1], torch.nn.Conv2d) and conv[1].kernel_size == (1, 1)
    assert isinstance(conv[2], torch.nn.BatchNorm2d)
    same_size = build_adapter((32, 8, 8), (64, 8, 8))
    assert [type(m) for m in same_size] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]
    assert isinstance(build_adapter((10,), (20,)), torch.nn.Linear)
    assert isinstance(build_adapter((16, 4, 4), (16, 4, 4), identity_when_equal=True), torch.nn.Identity)
    # shrinking averages: a constant map stays constant; growing interpolates
    resize = Resize((2, 2))
    torch.testing.assert_close(resize(torch.arange(16.0).reshape(1, 1, 4, 4)),
                               torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert Resize((8, 8))(torch.ones(1, 2, 4, 4)).shape == (1, 2, 8, 8)
    with pytest.raises(ConfigError, match=r"^student feature shape=\(3, 4\): \[features\] or \[channels, height"):
        build_adapter((3, 4), (3,))


def test_feature_shape_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model("resnet20", SPEC).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert feature_shape(model, "net.layer3", SPEC.input_shape) == (64, 8, 8)
    assert model.training and not model.net.layer3._forward_hooks
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
