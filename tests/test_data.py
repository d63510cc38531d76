"""Data sources, the restricted unpickler and the seeded views, on small inputs each test builds itself."""
import codecs
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydistill.data import (
    batch_indices,
    dataset_names,
    default_augment,
    epoch_indices,
    load_dataset,
    make_view,
    num_steps,
    to_float,
)
from raydistill.data.safe_pickle import safe_load
from raydistill.errors import ConfigError
from tests.conftest import reference_view

CIFAR10_SUBSET = Path(
    os.environ.get("RAYDISTILL_CIFAR10_SUBSET", Path(__file__).resolve().parents[2] / "shared/data/cifar10-subset")
)


# ---------------------------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_ranges_and_fixed_test_split():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.train_x.shape == (1438, 1, 8, 8) and ds.test_x.shape == (359, 1, 8, 8)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    assert ds.train_x.min() == 0 and ds.train_x.max() == 255
    assert set(np.unique(ds.train_y)) == set(range(10))
    assert ds.spec.input_shape == (1, 8, 8) and ds.spec.num_classes == 10 and ds.spec.task == "classification"
    assert ds.spec.mean[0] == pytest.approx(ds.train_x.mean() / 255.0)
    assert ds.spec.std[0] == pytest.approx((ds.train_x / 255.0).std())

    # every image is round(v * 255 / 16) of one original, and train + test is the whole set
    full = np.round(load_digits().images * 255.0 / 16.0).astype(np.uint8)
    both = np.concatenate([ds.train_x[:, 0], ds.test_x[:, 0]]).reshape(len(full), -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, full.reshape(len(full), -1)))

    again = load_dataset("digits")
    np.testing.assert_array_equal(again.test_x, ds.test_x)
    np.testing.assert_array_equal(again.test_y, ds.test_y)


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR python batches


def _write_batch(path, images, labels, label_key="labels"):
    """A batch the way the originals are laid out: data [N, 3072] uint8 rows of R, G, B planes, labels a list."""
    batch = {
        "data": images.reshape(len(images), -1),
        label_key: [int(v) for v in labels],
        "batch_label": f"batch {path.name}",
        "filenames": [f"img_{i}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _fake_cifar10(folder, batch_sizes=(5, 4, 3), n_test=6, seed=0):
    """Write data_batch_1..k and test_batch; returns the train and test images/labels as written (NCHW)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, n in enumerate(batch_sizes, start=1):
        x, y = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)
        _write_batch(folder / f"data_batch_{i}", x, y)
        xs.append(x)
        ys.append(y)
    tx, ty = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test)
    _write_batch(folder / "test_batch", tx, ty)
    return np.concatenate(xs), np.concatenate(ys), tx, ty


@pytest.mark.parametrize("sub_folder", ["", "cifar-10-batches-py"])
def test_cifar10_reads_all_batches_as_root_or_parent(tmp_path, sub_folder):
    train_x, train_y, test_x, test_y = _fake_cifar10(tmp_path / sub_folder)
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_x, train_x)  # batches 1, 2, 3 in order
    np.testing.assert_array_equal(ds.train_y, train_y)
    np.testing.assert_array_equal(ds.test_x, test_x)
    np.testing.assert_array_equal(ds.test_y, test_y)
    assert ds.train_y.dtype == np.int64
    assert ds.spec.mean == pytest.approx((0.4914, 0.4822, 0.4465)) and ds.spec.num_classes == 10


def test_cifar_rows_are_chw_planes(tmp_path):
    # one row: 1024 R values, then 1024 G, then 1024 B, each plane row by row
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 0 * 1024 + 0 * 32 + 1] = 11  # R, row 0, column 1
    data[0, 1 * 1024 + 5 * 32 + 7] = 200  # G, row 5, column 7
    data[0, 2 * 1024 + 31 * 32 + 30] = 99  # B, row 31, column 30
    for name in ("data_batch_1", "test_batch"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"data": data, "labels": [3], "batch_label": "b", "filenames": ["a.png"]}, f, protocol=2)
    x = load_dataset("cifar10", str(tmp_path)).train_x
    assert x[0, 0, 0, 1] == 11 and x[0, 1, 5, 7] == 200 and x[0, 2, 31, 30] == 99
    assert int(x.sum()) == 11 + 200 + 99


def test_cifar10_batches_are_ordered_numerically(tmp_path):
    rng = np.random.default_rng(1)
    for i in (1, 2, 10):  # "10" sorts before "2" as a string
        _write_batch(tmp_path / f"data_batch_{i}", np.full((1, 3, 32, 32), i, np.uint8), [i % 10])
    _write_batch(tmp_path / "test_batch", rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), [0, 1])
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train_x[:, 0, 0, 0].tolist() == [1, 2, 10]


@pytest.mark.parametrize("sub_folder", ["", "cifar-100-python"])
def test_cifar100_layout(tmp_path, sub_folder):
    folder = tmp_path / sub_folder
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 256, (7, 3, 32, 32), dtype=np.uint8), rng.integers(0, 100, 7)
    tx, ty = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8), rng.integers(0, 100, 3)
    _write_batch(folder / "train", x, y, label_key="fine_labels")
    _write_batch(folder / "test", tx, ty, label_key="fine_labels")
    ds = load_dataset("cifar100", str(tmp_path))
    np.testing.assert_array_equal(ds.train_x, x)
    np.testing.assert_array_equal(ds.train_y, y)
    np.testing.assert_array_equal(ds.test_x, tx)
    np.testing.assert_array_equal(ds.test_y, ty)
    assert ds.spec.num_classes == 100 and ds.spec.mean == pytest.approx((0.5071, 0.4865, 0.4409))


class _Reduce:
    """Pickles as a call of ``fn(*args)``: what a malicious data file would contain."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn, refused", [(os.system, "system"), (eval, "builtin.*eval")])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, fn, refused):
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w').close()"
    _fake_cifar10(tmp_path, batch_sizes=(2,), n_test=2)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": _Reduce(fn, (payload,)), "labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=refused):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_safe_load_refuses_codecs_other_than_latin1(tmp_path):
    path = tmp_path / "p"
    with open(path, "wb") as f:
        pickle.dump({"ok": b"\x00\xff", "empty": b""}, f, protocol=2)
    assert safe_load(path) == {"ok": b"\x00\xff", "empty": b""}  # bytes travel as _codecs.encode(str, 'latin1')
    with open(path, "wb") as f:
        pickle.dump(_Reduce(codecs.encode, ("abc", "rot13")), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="only str to latin1"):
        safe_load(path)


@pytest.mark.skipif(not CIFAR10_SUBSET.is_dir(), reason="CIFAR-10 subset folder not present")
def test_real_cifar10_subset_loads():
    ds = load_dataset("cifar10", str(CIFAR10_SUBSET))
    assert ds.train_x.shape == (10000, 3, 32, 32) and ds.test_x.shape == (2000, 3, 32, 32)
    assert np.bincount(ds.train_y).tolist() == [1000] * 10
    assert np.bincount(ds.test_y).tolist() == [200] * 10
    # the subset's documented per-channel train mean (R, G, B) = 125.27, 122.93, 113.86 of the full set, close to it
    assert ds.train_x.mean(axis=(0, 2, 3)) == pytest.approx([125.3, 122.9, 113.9], abs=1.5)


def test_cifar_missing_files_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cifar-10-batches-py") as err:
        load_dataset("cifar10", str(tmp_path))
    assert err.value.field == "data.root"
    with pytest.raises(ConfigError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"^data\.root=None: no CIFAR-10 python batches there") as err:
        load_dataset("cifar10", None)
    assert err.value.field == "data.root"


# ---------------------------------------------------------------------------------------------------------------------
# image folders


def _png(path, colour, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _image_tree(root, tiny_imagenet_val):
    """Two classes; class 'b' keeps TinyImageNet's images/ sub-folder, class 'a' does not."""
    colours = {"a": (255, 0, 0), "b": (0, 0, 255)}
    _png(root / "train/a/0.png", colours["a"])
    _png(root / "train/a/1.PNG", colours["a"])
    _png(root / "train/b/images/0.png", colours["b"], size=(12, 10))  # resized to 8x8
    if tiny_imagenet_val:
        _png(root / "val/images/v0.png", colours["b"])
        _png(root / "val/images/v1.png", colours["a"])
        (root / "val/val_annotations.txt").write_text("v0.png\tb\t0\t0\t8\t8\nv1.png\ta\t0\t0\t8\t8\n")
    else:
        _png(root / "val/b/v0.png", colours["b"])
        _png(root / "val/a/v1.png", colours["a"])


@pytest.mark.parametrize("tiny_imagenet_val", [False, True])
def test_imagefolder_both_val_layouts(tmp_path, tiny_imagenet_val):
    _image_tree(tmp_path, tiny_imagenet_val)
    ds = load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert ds.train_x.shape == (3, 3, 8, 8) and ds.train_x.dtype == np.uint8
    assert ds.train_y.tolist() == [0, 0, 1]
    assert ds.train_x[0, :, 3, 3].tolist() == [255, 0, 0] and ds.train_x[2, :, 3, 3].tolist() == [0, 0, 255]
    assert ds.spec.num_classes == 2 and ds.spec.input_shape == (3, 8, 8)
    assert ds.spec.mean == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert ds.spec.std[0] == pytest.approx(np.sqrt(2) / 3) and ds.spec.std[1] == 1.0  # constant channel: no div by 0
    order = np.argsort(ds.test_y)
    assert ds.test_y[order].tolist() == [0, 1]
    assert ds.test_x[order][:, :, 0, 0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_imagefolder_resizes_to_default_size_and_checks_layout(tmp_path):
    _image_tree(tmp_path, False)
    assert load_dataset("imagefolder", str(tmp_path)).train_x.shape == (3, 3, 64, 64)
    with pytest.raises(ConfigError, match=r"^data\.root='.*absent': expected train/<class>/ and val/") as err:
        load_dataset("imagefolder", str(tmp_path / "absent"))
    assert err.value.field == "data.root"
    _png(tmp_path / "val/zebra/z.png", (0, 0, 0))
    with pytest.raises(ConfigError, match="zebra"):
        load_dataset("imagefolder", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# synthetic, names, options, validation split


def test_synthetic_images_and_tabular():
    ds = load_dataset("synthetic", num_train=40, num_test=10, shape=[3, 5, 6], num_classes=4)
    assert ds.train_x.shape == (40, 3, 5, 6) and ds.test_x.shape == (10, 3, 5, 6) and ds.train_x.dtype == np.uint8
    assert ds.train_y.dtype == np.int64 and set(ds.train_y.tolist()) <= set(range(4))
    assert ds.spec.input_shape == (3, 5, 6) and ds.spec.num_classes == 4
    same = load_dataset("synthetic", num_train=40, num_test=10, shape=[3, 5, 6], num_classes=4)
    np.testing.assert_array_equal(same.train_x, ds.train_x)
    other = load_dataset("synthetic", num_train=40, num_test=10, shape=[3, 5, 6], num_classes=4, seed=1)
    assert not np.array_equal(other.train_x, ds.train_x)

    tab = load_dataset("synthetic", num_train=50, num_test=5, shape=[7])
    assert tab.train_x.shape == (50, 7) and tab.train_x.dtype == np.float32
    assert tab.spec.input_shape == (7,) and tab.spec.mean == pytest.approx(tab.train_x.mean(axis=0), abs=1e-6)

    reg = load_dataset("synthetic", num_train=50, num_test=5, shape=[7], task="regression")
    assert reg.spec.task == "regression" and reg.spec.num_classes == 1 and reg.train_y.dtype == np.float32


def test_names_options_and_defaults():
    assert dataset_names() == ["cifar10", "cifar100", "diabetes", "digits", "imagefolder", "prepared", "synthetic",
                               "tabular"]
    with pytest.raises(ConfigError, match=r"^data\.name='mnist': one of: ") as err:
        load_dataset("mnist")
    assert err.value.field == "data.name" and "cifar10" in str(err.value)
    with pytest.raises(ConfigError, match=r"^data\.num_samples=3: options of synthetic: ") as err:
        load_dataset("synthetic", num_samples=3)
    assert err.value.field == "data.num_samples" and "num_train" in str(err.value)
    with pytest.raises(ConfigError, match=r"^data\.image_size=8: options of digits: none$") as err:
        load_dataset("digits", image_size=8)
    assert err.value.field == "data.image_size"
    with pytest.raises(ConfigError, match=r"^data\.shape=\[3, 4\]: \[features\] for tabular data or") as err:
        load_dataset("synthetic", shape=[3, 4])
    assert err.value.field == "data.shape"
    assert default_augment("cifar10") == {"crop_pad": 4, "flip": True}
    assert default_augment("imagefolder") == {"crop_pad": 8, "flip": True}
    assert default_augment("digits") == {"crop_pad": 1, "flip": False}
    assert default_augment("synthetic") == {"crop_pad": 0, "flip": False}
    assert default_augment("prepared") == {"crop_pad": None, "flip": None}      # the set's own, from its index


def test_split_validation_is_deterministic_and_disjoint():
    ds = load_dataset("synthetic", num_train=100, num_test=10, shape=[2, 3, 3])
    ds.train_y = np.arange(100)  # labels as sample ids
    rest, val_x, val_y = ds.split_validation(0.2, seed=5)
    assert len(val_y) == 20 and len(rest.train_y) == 80
    assert sorted(np.concatenate([val_y, rest.train_y]).tolist()) == list(range(100))
    np.testing.assert_array_equal(val_x, ds.train_x[val_y])
    np.testing.assert_array_equal(rest.test_x, ds.test_x)
    assert np.array_equal(ds.split_validation(0.2, seed=5)[2], val_y)
    assert not np.array_equal(ds.split_validation(0.2, seed=6)[2], val_y)

    rest, val_x, val_y = ds.split_validation(0.0, seed=5)
    assert val_x.shape == (0, 2, 3, 3) and val_y.shape == (0,) and len(rest.train_x) == 100
    with pytest.raises(ConfigError, match=r"^data\.val_fraction=1\.0: a fraction in \[0, 1\)$"):
        ds.split_validation(1.0, seed=5)


# ---------------------------------------------------------------------------------------------------------------------
# views


def test_indices_are_seeded_permutations():
    perm = epoch_indices(3, 0, 50)
    assert sorted(perm.tolist()) == list(range(50))
    assert torch.equal(perm, epoch_indices(3, 0, 50))
    assert not torch.equal(perm, epoch_indices(3, 1, 50))
    assert num_steps(50, 16) == 3 and num_steps(50, 64) == 1 and num_steps(0, 8) == 0
    steps = [batch_indices(3, 0, s, 50, 16) for s in range(3)]
    assert torch.equal(torch.cat(steps), perm[:48])
    assert torch.equal(batch_indices(3, 0, 0, 50, 64), perm)  # batch larger than the set: one step of all
    with pytest.raises(ConfigError, match=r"^step=3: a step of the epoch, 0\.\.2$"):
        batch_indices(3, 0, 3, 50, 16)


@pytest.mark.parametrize("crop_pad, flip", [(4, True), (1, False), (0, True), (3, True)])
def test_make_view_equals_per_sample_reference(crop_pad, flip):
    x = torch.randint(0, 256, (64, 3, 6, 5), dtype=torch.uint8)  # H != W catches swapped axes
    view = make_view(x, 7, 2, 3, 1, crop_pad, flip)
    expected, flips = reference_view(x, 7, 2, 3, 1, crop_pad, flip)
    assert view.dtype == torch.float32 and view.shape == x.shape
    torch.testing.assert_close(view, expected, rtol=0, atol=0)
    assert 0 < int(flips.sum()) < 64  # both flipped and unflipped samples were exercised


def test_make_view_seeding_and_passthrough():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    a = make_view(x, 1, 0, 0, 0, 4, True)
    assert torch.equal(a, make_view(x, 1, 0, 0, 0, 4, True))
    assert not torch.equal(a, make_view(x, 1, 0, 0, 1, 4, True))  # another peer's view
    assert not torch.equal(a, make_view(x, 1, 0, 1, 0, 4, True))  # another step
    assert torch.equal(make_view(x, 1, 0, 0, 0, 0, False), x.float() / 255.0)
    assert torch.equal(to_float(x), x.float() / 255.0)
    tabular = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(make_view(tabular, 1, 0, 0, 0, 4, True), tabular.float())
    assert make_view(tabular, 1, 0, 0, 0, 4, True).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_make_view_same_on_cpu_and_gpu():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    cpu = make_view(x, 4, 1, 2, 0, 4, True)
    gpu = make_view(x.cuda(), 4, 1, 2, 0, 4, True)
    assert gpu.is_cuda
    assert torch.equal(cpu, gpu.cpu())


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet-style views: RandomResizedCrop + flip, and resize + center crop, against torchvision per sample


def test_random_resized_crop_view_equals_torchvision_per_sample():
    from torchvision.transforms.v2 import functional as TF

    from raydistill.data.views import random_resized_crop_view, resized_crop_boxes
    from raydistill.seeding import generator

    x = torch.randint(0, 256, (48, 3, 40, 40), dtype=torch.uint8)
    view = random_resized_crop_view(x, 7, 2, 3, 1, 24)
    assert view.shape == (48, 3, 24, 24) and view.dtype == torch.float32
    gen = generator(7, "view", 2, 3, 1)                         # make_view's seeding: (seed, epoch, step, view)
    top, left, h, w = resized_crop_boxes(48, 40, 40, gen)
    flips = torch.randint(0, 2, (48,), generator=gen)
    for i in range(48):
        expected = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [24, 24], antialias=True)
        expected = expected.flip(-1) if flips[i] else expected
        assert torch.equal(view[i], expected.float() / 255.0), i
    assert 0 < int(flips.sum()) < 48 and len(set(h.tolist())) > 10         # flipped and not, crops of many sizes
    assert torch.equal(view, random_resized_crop_view(x, 7, 2, 3, 1, 24))
    assert not torch.equal(view, random_resized_crop_view(x, 7, 2, 3, 2, 24))        # another peer's view
    assert not torch.equal(view, random_resized_crop_view(x, 7, 2, 3, 1, 24, replay=1))  # a replayed epoch


def test_resized_crop_boxes_follow_torchvisions_draws():
    from raydistill.data.views import RRC_RATIO, resized_crop_boxes
    from raydistill.seeding import generator

    top, left, h, w = resized_crop_boxes(4000, 60, 80, generator(0, "boxes"))
    area = (h * w).double() / (60 * 80)
    # sides are rounded to whole pixels: the bounds hold up to a pixel of rounding
    assert area.min() >= 0.08 * (1 - 0.1) and area.max() <= 1.0
    ratio = w.double() / h.double()
    assert ratio.min() >= RRC_RATIO[0] * 0.85 and ratio.max() <= RRC_RATIO[1] / 0.85
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 80).all()
    assert top.float().std() > 1 and left.float().std() > 1                   # offsets drawn, not centred
    # no draw fits: torchvision's fallback, the central crop with the ratio clamped into range
    top, left, h, w = resized_crop_boxes(3, 20, 100, generator(0, "wide"), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert h.tolist() == [20] * 3 and w.tolist() == [round(20 * 1.0)] * 3 and left.tolist() == [40] * 3
    top, left, h, w = resized_crop_boxes(2, 30, 30, generator(0, "square"), scale=(2.0, 2.0))
    assert (h.tolist(), w.tolist(), top.tolist()) == ([30, 30], [30, 30], [0, 0])


def test_the_gpu_form_of_the_crop_resize_is_within_a_level_of_the_cpu_form():
    """The two batched matrix products a GPU runs, checked here on the CPU against the per-sample uint8 kernel."""
    from raydistill.data import views
    from raydistill.seeding import generator

    x = torch.randint(0, 256, (32, 3, 36, 36), dtype=torch.uint8)
    cpu = views.random_resized_crop_view(x, 1, 0, 0, 0, 28)
    gen = generator(1, "view", 0, 0, 0)
    top, left, h, w = views.resized_crop_boxes(32, 36, 36, gen)
    flips = torch.randint(0, 2, (32,), generator=gen).bool()
    cols = views.resize_weights(left, w, 28, 36)
    rows, cols = views.resize_weights(top, h, 28, 36), torch.where(flips[:, None, None], cols.flip(1), cols)
    dense = views._resample_matmul(x, rows, cols).float() / 255.0
    assert (dense - cpu).abs().max() <= 1.0 / 255.0 + 1e-6
    assert (dense == cpu).float().mean() > 0.6


def test_center_crop_view_equals_torchvision_resize_and_center_crop():
    from torchvision.transforms.v2 import functional as TF

    from raydistill.data.views import center_crop_view

    x = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    for size, resized in ((56, 64), (48, 55)):                   # 56 / 0.875 = 64: the stored image uncut by resize
        view = center_crop_view(x, size)
        for i in range(6):
            expected = TF.center_crop(TF.resize(x[i], [resized, resized], antialias=True), [size, size])
            assert torch.equal(view[i], expected.float() / 255.0)


@pytest.mark.parametrize("kind", ["crop_pad", "random_resized_crop"])
def test_a_view_of_rows_of_a_batch_is_those_rows_of_the_whole_batchs_view(kind):
    """A peer that trains on a slice of the step's batch (rows r*B/k..(r+1)*B/k) gets, bit for bit, those rows of the
    view the whole batch gets: the random numbers are drawn for the whole batch, then the rows' used."""
    from raydistill.data.memory import crop_pad_recipe
    from raydistill.data.views import RRC_RATIO, RRC_SCALE, train_view

    x = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8)
    recipe = crop_pad_recipe(4, True) if kind == "crop_pad" else \
        {"kind": "random_resized_crop", "size": 16, "flip": True, "scale": RRC_SCALE, "ratio": RRC_RATIO}
    whole = train_view(recipe, x, 5, 1, 2, 0)
    for r in range(4):                                          # k = 4 slices of B = 12
        rows = slice(3 * r, 3 * r + 3)
        assert torch.equal(train_view(recipe, x[rows], 5, 1, 2, 0, rows=rows, batch_size=12), whole[rows]), rows
    # a batch of those 3 samples alone draws other numbers: the rows' view is not that
    assert not torch.equal(train_view(recipe, x[3:6], 5, 1, 2, 0), whole[3:6])
    assert torch.equal(train_view(recipe, x[11:], 5, 1, 2, 0, rows=slice(11, 12), batch_size=12), whole[11:])
    with pytest.raises(ConfigError, match=r"^rows=slice\(10, 13, None\): a slice start:stop of the batch's 0\.\.12"):
        train_view(recipe, x[:3], 5, 1, 2, 0, rows=slice(10, 13), batch_size=12)
    with pytest.raises(ConfigError, match=r"^rows=slice\(0, 4, None\): as many rows as the 3 samples given"):
        train_view(recipe, x[:3], 5, 1, 2, 0, rows=slice(0, 4), batch_size=12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_random_resized_crop_view_on_a_gpu_cuts_the_cpus_crops():
    from raydistill.data.views import center_crop_view, random_resized_crop_view

    x = torch.randint(0, 256, (64, 3, 48, 48), dtype=torch.uint8)
    cpu, gpu = random_resized_crop_view(x, 4, 1, 2, 0, 40), random_resized_crop_view(x.cuda(), 4, 1, 2, 0, 40)
    assert gpu.is_cuda and (gpu.cpu() - cpu).abs().max() <= 1.0 / 255.0 + 1e-6
    assert (center_crop_view(x.cuda(), 40).cpu() - center_crop_view(x, 40)).abs().max() <= 1.0 / 255.0 + 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# image folders: files that are no class or no image


def test_an_empty_class_folder_is_refused_not_a_silent_extra_class(tmp_path):
    _image_tree(tmp_path, False)
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(ConfigError, match=r"^data\.root='.*train/c': a class folder with at least one image"):
        load_dataset("imagefolder", str(tmp_path), image_size=8)


def test_a_truncated_jpeg_is_named_in_the_error(tmp_path):
    import io

    _image_tree(tmp_path, False)
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noisy, "JPEG")
    bad = tmp_path / "train" / "a" / "2.jpg"
    bad.write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    with pytest.raises(ConfigError, match=r"^data\.root='.*train/a/2\.jpg': an image file PIL can read \(OSError: "
                                          r"image file is truncated"):
        load_dataset("imagefolder", str(tmp_path), image_size=8)
