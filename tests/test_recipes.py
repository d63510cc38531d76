"""Recipe knobs and reference presets: the one-cycle schedule is torch's OneCycleLR step for step, reflection padding
is F.pad(mode="reflect") for the crop, every preset loads, and each reference preset carries its source's values."""
import dataclasses
import math

import pytest
import torch

import raydistill
from raydistill.config import ONECYCLE_DEFAULTS, TrainConfig, preset_names
from raydistill.data.views import make_view, reflect_index
from raydistill.engine.optim import learning_rate, onecycle_lr
from raydistill.errors import ConfigError
from tests.conftest import reference_view


# ---------------------------------------------------------------------------------------------------------------------
# train.schedule: onecycle


def torch_onecycle_lrs(max_lr, total_steps, pct_start, div_factor, final_div_factor, cycle_momentum):
    """The learning rate torch's OneCycleLR gives each optimizer step (read before the step, as a loop reads it)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=max_lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy="cos",
        cycle_momentum=cycle_momentum, div_factor=div_factor, final_div_factor=final_div_factor)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total_steps - 1):          # no scheduler step after the last optimizer step
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("max_lr, epochs, steps_per_epoch, pct_start, div_factor, final_div_factor", [
    (0.1, 30, 78, 0.15, 25.0, 1e4),       # the GPU reference recipe: 30 epochs of 10,000 images at batch 128
    (0.1, 3, 7, 0.3, 25.0, 1e4),          # torch's defaults
    (0.05, 5, 11, 0.25, 10.0, 100.0),
    (1.0, 2, 5, 0.5, 1.0, 1.0),           # no warm-up range: constant start, annealing to the same value
    (0.2, 4, 3, 0.0, 25.0, 1e4),          # no warm-up phase at all
    (0.3, 1, 13, 1.0, 5.0, 50.0),         # warm-up over every step
])
@pytest.mark.parametrize("cycle_momentum", [False, True])
def test_onecycle_equals_torch_onecyclelr_at_every_step(max_lr, epochs, steps_per_epoch, pct_start, div_factor,
                                                         final_div_factor, cycle_momentum):
    expected = torch_onecycle_lrs(max_lr, epochs * steps_per_epoch, pct_start, div_factor, final_div_factor,
                                  cycle_momentum)
    train = TrainConfig(epochs=epochs, lr=max_lr, schedule="onecycle", pct_start=pct_start, div_factor=div_factor,
                        final_div_factor=final_div_factor)
    ours = [learning_rate(train, max_lr, epoch, step, steps_per_epoch)
            for epoch in range(epochs) for step in range(steps_per_epoch)]
    assert len(ours) == len(expected)
    for index, (a, b) in enumerate(zip(ours, expected)):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15), f"step {index}: {a} != torch's {b}"
    # the shape, not only the agreement: starts at max_lr / div_factor, peaks at max_lr, ends at the floor
    assert math.isclose(ours[0], max_lr / div_factor) or pct_start == 0.0
    assert max(ours) <= max_lr * (1 + 1e-12)


def test_onecycle_reaches_max_lr_at_the_end_of_warmup_and_the_floor_at_the_last_step():
    total, pct = 100, 0.15
    lrs = [onecycle_lr(0.1, step, total, pct, 25.0, 1e4) for step in range(total)]
    peak = int(pct * total) - 1
    assert lrs[peak] == pytest.approx(0.1, rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))            # rising during warm-up
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1:]))           # falling after it
    assert lrs[-1] == pytest.approx(0.1 / 25.0 / 1e4, rel=1e-9)


def test_onecycle_knobs_are_checked_and_never_silently_ignored():
    config = raydistill.load_config("dml-digits", ["train.schedule=onecycle", "train.pct_start=0.15",
                                                   "train.div_factor=10", "train.final_div_factor=100"])
    assert (config.train.pct_start, config.train.div_factor, config.train.final_div_factor) == (0.15, 10.0, 100.0)
    assert dataclasses.asdict(TrainConfig()) | ONECYCLE_DEFAULTS == dataclasses.asdict(TrainConfig())
    bad = [(["train.pct_start=0.2"], "train.pct_start"),                          # set, but the schedule is cosine
           (["train.schedule=onecycle", "train.pct_start=1.5"], "train.pct_start"),
           (["train.schedule=onecycle", "train.div_factor=0"], "train.div_factor"),
           (["train.schedule=onecycle", "train.final_div_factor=-1"], "train.final_div_factor"),
           (["train.schedule=onecycle", "train.warmup_epochs=2"], "train.warmup_epochs"),
           (["train.schedule=linear"], "train.schedule")]
    for overrides, field in bad:
        with pytest.raises(ConfigError) as err:
            raydistill.load_config("dml-digits", overrides)
        assert err.value.field == field, overrides


# ---------------------------------------------------------------------------------------------------------------------
# data.pad_mode: reflect


@pytest.mark.parametrize("crop_pad, flip, shape", [(4, True, (64, 3, 32, 32)), (4, True, (48, 3, 6, 5)),
                                                   (2, False, (32, 1, 3, 7)), (1, True, (32, 3, 2, 2))])
def test_reflect_view_equals_f_pad_reflect_then_crop(crop_pad, flip, shape):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    view = make_view(x, 11, 1, 4, 2, crop_pad, flip, pad_mode="reflect")
    assert view.dtype == torch.float32 and view.shape == x.shape
    torch.testing.assert_close(view, reference_view(x, 11, 1, 4, 2, crop_pad, flip, mode="reflect")[0], rtol=0, atol=0)
    zeros = make_view(x, 11, 1, 4, 2, crop_pad, flip, pad_mode="zeros")
    assert not torch.equal(view, zeros)          # the border differs: reflection never writes a 0 from the padding


def test_reflect_index_is_numpy_reflect_without_edge_repeat():
    assert reflect_index(torch.arange(-3, 9), 6).tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 5, 4, 3, 2]


def test_zeros_stays_the_default_view():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(make_view(x, 3, 0, 1, 0, 4, True), make_view(x, 3, 0, 1, 0, 4, True, pad_mode="zeros"))
    assert raydistill.load_config("dml-cifar10").data.pad_mode == "zeros"


def test_pad_mode_errors_name_the_field():
    x = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    with pytest.raises(ConfigError) as err:
        make_view(x, 0, 0, 0, 0, 4, True, pad_mode="reflect")       # a pad as large as the image cannot reflect
    assert err.value.field == "data.crop_pad"
    with pytest.raises(ConfigError) as err:
        make_view(x, 0, 0, 0, 0, 1, True, pad_mode="edge")
    assert err.value.field == "data.pad_mode"
    with pytest.raises(ConfigError) as err:
        raydistill.load_config("dml-digits", ["data.pad_mode=mirror"])
    assert err.value.field == "data.pad_mode"


def test_a_peer_trains_on_the_configured_pad_mode():
    from raydistill.engine.data import DataView, load_run_data

    config = raydistill.load_config("dml-digits", ["data.pad_mode=reflect", "data.crop_pad=2"])
    _, arrays = load_run_data(config)
    data = DataView(config, arrays)
    idx = data.indices(0, 0)
    expected = make_view(torch.from_numpy(arrays["train_x"])[idx], config.seed, 0, 0, 1, 2, config.data.flip,
                         pad_mode="reflect")
    assert torch.equal(data.view(0, 0, 1), expected)


# ---------------------------------------------------------------------------------------------------------------------
# presets


def test_every_preset_loads_and_describes_itself_in_one_short_sentence(tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")                      # presets with a teacher name a checkpoint that must exist
    for name in preset_names():
        overrides = [f"teacher.checkpoint={teacher}"] if "teacher" in raydistill.config.raw_config(name) else []
        config = raydistill.load_config(name, overrides)
        assert config.name == name
        first = (raydistill.config.PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and first.rstrip().endswith(".") and len(first) <= 120, name


# The values each reference preset must carry, read from its source (docs/results.md, "Reference presets", cites
# the files and lines). Keys are config paths; a preset that drifts from its source fails here.
REFERENCE_PRESETS = {
    # Zhang et al. 2018, section 4.1, CIFAR-100 (following Zagoruyko & Komodakis 2016 for weight decay)
    "dml-zhang2018-cifar100": {
        "data.name": "cifar100", "data.val_fraction": 0.0, "data.crop_pad": 4, "data.flip": True,
        "data.pad_mode": "reflect", "model.arch": "resnet32", "num_peers": 2,
        "method.name": "dml", "method.temperature": 1.0, "method.alpha": 1.0, "method.ce_weight": 1.0,
        "method.per_peer_views": False, "train.optimizer": "sgd", "train.nesterov": True, "train.momentum": 0.9,
        "train.lr": 0.1, "train.batch_size": 64, "train.epochs": 200, "train.schedule": "step",
        "train.milestones": [60, 120, 180], "train.gamma": 0.1, "train.weight_decay": 5e-4,
    },
    # Guo et al. 2020 (the loss; no code released) with the CIFAR-100 protocol under which PCL/DKEL report KDCL
    "kdcl-guo2020-cifar100": {
        "data.name": "cifar100", "data.val_fraction": 0.0, "data.pad_mode": "zeros", "model.arch": "resnet32",
        "num_peers": 3, "method.name": "kdcl", "method.ensemble": "minlogit", "method.alpha": 1.0,
        "method.ce_weight": 1.0, "method.per_peer_views": True, "method.temperature": 3.0, "train.lr": 0.1,
        "train.batch_size": 128, "train.epochs": 300, "train.schedule": "step", "train.milestones": [150, 225],
        "train.gamma": 0.1, "train.weight_decay": 5e-4, "train.nesterov": True, "train.momentum": 0.9,
    },
    # shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation: configs/20220223_cifar100.yml,
    # src/optimizer/optimizer_config.yml, src/schemes/scheme_config.yml, src/losses/{kd_loss,loss_wrapper}.py
    "pcl-wu2021-cifar100": {
        "data.name": "cifar100", "data.val_fraction": 0.0, "data.pad_mode": "zeros", "model.arch": "resnet32",
        "num_peers": 3, "method.name": "pcl", "method.temperature": 3.0, "method.alpha": 1.0,
        "method.ensemble": "learned_head", "method.rampup_epochs": 80.0, "method.ema_momentum": 0.999,
        "method.teacher_init_steps": 0, "method.per_peer_views": True, "train.lr": 0.1, "train.batch_size": 128,
        "train.epochs": 300, "train.schedule": "step", "train.milestones": [150, 225], "train.gamma": 0.1,
        "train.weight_decay": 5e-4, "train.nesterov": True, "train.momentum": 0.9, "seed": 42,
    },
    # shaoeric/Decoupled-Knowledge-with-Ensemble-Learning-for-Online-Distillation: the same files, plus main.py
    # (--init 1, --exp 0.5) and src/trainer.py (init_mean_model)
    "dkel-shao2023-cifar100": {
        "data.name": "cifar100", "data.val_fraction": 0.0, "data.pad_mode": "zeros", "model.arch": "resnet32",
        "num_peers": 3, "method.name": "dkel", "method.temperature": 3.0, "method.alpha": 0.1,
        "method.decay": 0.5, "method.beta_floor": 0.01, "method.ensemble": "learned_head",
        "method.rampup_epochs": 80.0, "method.ema_momentum": 0.999, "method.teacher_init_steps": 2,
        "method.per_peer_views": True, "train.lr": 0.1, "train.batch_size": 128, "train.epochs": 300,
        "train.schedule": "step", "train.milestones": [150, 225], "train.gamma": 0.1, "train.weight_decay": 5e-4,
        "train.nesterov": True, "train.momentum": 0.9, "seed": 42,
    },
    # megvii-research/mdistiller: mdistiller/engine/cfg.py (KD), configs/cifar100/kd.yaml, engine/trainer.py
    "kd-mdistiller-cifar100": {
        "data.name": "cifar100", "data.val_fraction": 0.0, "data.pad_mode": "zeros", "model.arch": "resnet20",
        "teacher.arch": "resnet56", "num_peers": 1, "method.name": "kd", "method.temperature": 4.0,
        "method.alpha": 0.9, "method.ce_weight": "complement", "train.lr": 0.05, "train.batch_size": 64,
        "train.epochs": 240, "train.schedule": "step", "train.milestones": [150, 180, 210], "train.gamma": 0.1,
        "train.weight_decay": 5e-4, "train.nesterov": False, "train.momentum": 0.9,
    },
}


def config_value(config, path: str):
    if path == "num_peers":
        return config.num_peers
    node = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("name", sorted(REFERENCE_PRESETS))
def test_reference_preset_carries_its_sources_values(name, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    overrides = [f"teacher.checkpoint={teacher}"] if name.startswith("kd-") else []
    config = raydistill.load_config(name, overrides)
    for path, expected in REFERENCE_PRESETS[name].items():
        assert config_value(config, path) == expected, f"{name}: {path}"
    assert all(p.arch == config.model.arch for p in config.peers)          # every peer the source's network


def test_kdcl_cifar10_averages_probabilities_instead_of_minlogit_at_t3():
    """MinLogit at T = 3 inflates the peers' logits and its T²-weighted term dominates CE (docs/results.md, "Why
    kdcl-cifar10 lost"): the CIFAR-10 preset averages the peers' softened probabilities instead."""
    method = raydistill.load_config("kdcl-cifar10").method
    assert (method.ensemble, method.temperature, method.alpha, method.per_peer_views) == ("mean_probs", 3.0, 1.0, True)
