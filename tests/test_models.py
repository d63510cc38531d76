"""Architectures by name: shapes, gradients, parameter counts against the papers, normalization, seeding, errors."""

import pytest
import torch
from torch import nn

from raydistill.data import DataSpec
from raydistill.errors import ConfigError
from raydistill.models import Normalized, build_model, check_arch, model_names

CIFAR = DataSpec("classification", (3, 32, 32), 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
DIGITS = DataSpec("classification", (1, 8, 8), 10, (0.3,), (0.4,))
TABULAR = DataSpec("classification", (5,), 3, (1.0, -2.0, 0.5, 0.0, 10.0), (2.0, 1.0, 0.5, 1.0, 4.0))
REGRESSION = DataSpec("regression", (5,), 1, (0.0,) * 5, (1.0,) * 5)

IMAGE_ARCHS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn16_2", "wrn10_1", "cnn_small", "mlp"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_backward(model: nn.Module, x: torch.Tensor, outputs: int) -> None:
    """Logits of shape [N, outputs], and a gradient reaches every parameter."""
    model.train()
    logits = model(x)
    assert logits.shape == (x.shape[0], outputs)
    logits.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in model.parameters())


def test_own_archs_are_listed():
    names = model_names()
    for arch in ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn{depth}_{width}", "cnn_small", "mlp"]:
        assert arch in names


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
@pytest.mark.parametrize("spec", [CIFAR, DIGITS], ids=["cifar", "digits"])
def test_image_archs_give_logits_and_gradients(arch, spec):
    torch.manual_seed(0)
    model = build_model(arch, spec)
    forward_backward(model, torch.rand(3, *spec.input_shape), spec.num_classes)


def test_mlp_on_tabular_and_regression():
    torch.manual_seed(0)
    forward_backward(build_model("mlp", TABULAR), torch.randn(4, 5), 3)
    forward_backward(build_model("mlp", REGRESSION, hidden=[8]), torch.randn(4, 5), 1)


def test_regression_head_has_one_output_per_target():
    spec = DataSpec("regression", (1, 8, 8), 2, (0.5,), (0.25,))
    assert build_model("resnet20", spec)(torch.rand(2, 1, 8, 8)).shape == (2, 2)


def test_mlp_hidden_layers_follow_the_option():
    model = build_model("mlp", TABULAR, hidden=[7, 6, 4])
    widths = [model.net.get_submodule(f"layer{i}")[0].out_features for i in (1, 2, 3)]
    assert widths == [7, 6, 4] and model.net.fc.in_features == 4
    assert n_params(build_model("mlp", TABULAR, hidden=[])) == 5 * 3 + 3  # plain linear model


@pytest.mark.parametrize(
    "arch, paper_params",
    [("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6), ("wrn16_4", 2.7e6), ("wrn40_2", 2.2e6)],
)
def test_parameter_counts_match_the_papers(arch, paper_params):
    # He et al. 2016 Table 6 (CIFAR-10 ResNets); Zagoruyko & Komodakis 2016 Table 4 (WRN-d-k on CIFAR-10).
    assert abs(n_params(build_model(arch, CIFAR)) - paper_params) / paper_params < 0.05


def test_normalized_standardizes_per_channel_images():
    model = Normalized(nn.Identity(), CIFAR.mean, CIFAR.std)
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, c] - CIFAR.mean[c]) / CIFAR.std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(model(x), expected)
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)


def test_normalized_standardizes_per_feature_tabular():
    model = Normalized(nn.Identity(), TABULAR.mean, TABULAR.std, input_ndim=1)
    x = torch.randn(4, 5)
    expected = torch.empty_like(x)
    for f in range(5):
        expected[:, f] = (x[:, f] - TABULAR.mean[f]) / TABULAR.std[f]
    torch.testing.assert_close(model(x), expected)


def test_normalized_leaves_a_constant_feature_centred_not_infinite():
    model = Normalized(nn.Identity(), (1.0, 2.0), (0.0, 2.0), input_ndim=1)
    torch.testing.assert_close(model(torch.tensor([[1.5, 4.0]])), torch.tensor([[0.5, 1.0]]))


def test_build_model_normalizes_before_the_net():
    model = build_model("cnn_small", CIFAR).eval()
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(CIFAR.mean).view(1, 3, 1, 1), torch.tensor(CIFAR.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net((x - mean) / std))
    assert set(model.state_dict()) >= {"mean", "std"}
    assert all(key in ("mean", "std") or key.startswith("net.") for key in model.state_dict())


@pytest.mark.parametrize("arch", ["resnet20", "wrn10_2", "cnn_small", "mlp", "mobilenet_v2"])
def test_same_seed_same_parameters(arch):
    def params(seed):
        torch.manual_seed(seed)
        return list(build_model(arch, CIFAR).state_dict().values())

    first, again, other = params(3), params(3), params(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("arch", ["resnet20", "resnet110", "wrn16_4", "cnn_small", "mlp"])
def test_stages_can_be_hooked_by_module_path(arch):
    modules = dict(build_model(arch, CIFAR).net.named_modules())
    assert {"layer1", "layer2", "fc"} <= set(modules)
    if arch != "mlp":
        assert "layer3" in modules


def test_cnn_small_pools_only_inputs_large_enough():
    assert isinstance(build_model("cnn_small", CIFAR).net.pool, nn.MaxPool2d)
    assert isinstance(build_model("cnn_small", DIGITS).net.pool, nn.Identity)


def test_wrn_dropout_option():
    model = build_model("wrn10_1", CIFAR, dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.3}


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_torchvision_model_by_name(arch):
    torch.manual_seed(0)
    forward_backward(build_model(arch, CIFAR), torch.rand(2, 3, 32, 32), 10)
    forward_backward(build_model(arch, DIGITS), torch.rand(2, 1, 8, 8), 10)


def test_grey_torchvision_model_equals_the_rgb_model_on_the_repeated_image():
    # The adapted stem sums the RGB filters: at init a grey model computes the RGB model on the grey image as RGB.
    grey = DataSpec("classification", (1, 32, 32), 10, (0.5,), (0.25,))
    rgb = DataSpec("classification", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(1)
    grey_model = build_model("resnet18", grey).eval()
    torch.manual_seed(1)
    rgb_model = build_model("resnet18", rgb).eval()
    assert grey_model.net.conv1.weight.shape[1] == 1
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(grey_model(x), rgb_model(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_unknown_arch_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"^model\.arch='resnet21': one of: ") as err:
        build_model("resnet21", CIFAR)
    message = str(err.value)
    assert message.startswith("model.arch='resnet21'")
    assert "resnet20" in message and "mlp" in message and "torchvision" in message
    with pytest.raises(ConfigError, match="model.arch"):
        check_arch("not_a_model")
    check_arch("wrn28_10")
    check_arch("resnet18")


def test_bad_wrn_depth_is_rejected():
    with pytest.raises(ConfigError, match=r"model\.arch='wrn15_4'.*6n\+4"):
        build_model("wrn15_4", CIFAR)


@pytest.mark.parametrize(
    "arch, options, field",
    [
        ("resnet20", {"width": 2}, "model.width"),
        ("mlp", {"hidden": [0]}, "model.hidden"),
        ("mlp", {"hidden": 256}, "model.hidden"),
        ("wrn10_1", {"dropout": 1.5}, "model.dropout"),
    ],
)
def test_bad_options_are_rejected(arch, options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_model(arch, CIFAR, **options)


@pytest.mark.parametrize("arch", ["resnet20", "wrn10_1", "cnn_small", "resnet18"])
def test_image_archs_reject_tabular_data(arch):
    with pytest.raises(ConfigError, match="model.arch.*use mlp"):
        build_model(arch, TABULAR)


def test_mean_with_wrong_length_is_rejected():
    spec = DataSpec("classification", (3, 8, 8), 10, (0.5,), (0.25,))
    with pytest.raises(ConfigError, match=r"data\.mean"):
        build_model("cnn_small", spec)
