"""Data sets by name: each source returns the whole set as numpy arrays (uint8 NCHW images or float32 features).

Sources: ``digits`` (scikit-learn's embedded 8x8 digits), ``cifar10`` / ``cifar100`` (the python-pickle batches, read
through a restricted unpickler), ``imagefolder`` (ImageNet / TinyImageNet-style class folders), ``diabetes``
(scikit-learn's embedded regression set), ``tabular`` (CSV or Parquet files), ``synthetic`` (seeded random data for
benchmarks), and ``prepared`` (a set made by ``raydistill data prepare``, registered by data/prepared.py).
A source's options are its keyword parameters; ``load_dataset`` refuses any other, and a ``root`` for a data set that
reads no files (digits, diabetes, synthetic).
"""
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydistill.data.safe_pickle import safe_load
from raydistill.errors import ConfigError
from raydistill.seeding import derive_seed, generator

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class DataSpec:
    """What a model builder needs to know about the data."""

    task: str  # "classification" | "regression"
    input_shape: tuple  # (C, H, W) for images, (F,) for tabular
    num_classes: int  # classes; for regression the number of target outputs
    mean: tuple  # per-channel mean of the float input in [0,1] (images) or per-feature (tabular)
    std: tuple
    class_names: tuple | None = None  # label order, where the source knows them (exports carry them as metadata)


@dataclass
class Dataset:
    """A whole data set in memory: images uint8 [N, C, H, W] or tabular float32 [N, F]."""

    spec: DataSpec
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    name: str

    def arrays(self) -> dict:
        """The four arrays by name, ready for ``ray.put``."""
        return {"train_x": self.train_x, "train_y": self.train_y, "test_x": self.test_x, "test_y": self.test_y}

    def split_validation(self, fraction: float, seed: int):
        """Carve ``fraction`` of the train set out as a validation set, the same way for the same seed.

        Returns ``(dataset with the remaining train samples, val_x, val_y)``; both parts keep the original order.
        """
        train_idx, val_idx = validation_indices(len(self.train_x), fraction, seed)
        rest = dataclasses.replace(self, train_x=self.train_x[train_idx], train_y=self.train_y[train_idx])
        return rest, self.train_x[val_idx], self.train_y[val_idx]


def validation_indices(n: int, fraction: float, seed: int):
    """(train indices, validation indices), each sorted: ``fraction`` of range(n) carved out by a seeded permutation,
    the same for the same seed in every process (a prepared set carves by index, without copying images)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError("data.val_fraction", fraction, "a fraction in [0, 1)")
    n_val = int(round(fraction * n))
    perm = torch.randperm(n, generator=generator(seed, "validation")).numpy()
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---------------------------------------------------------------------------------------------------------------------
# registry

_SOURCES = {}
_READS_NO_FILES = set()  # embedded or generated: a data.root given for them would be silently ignored
_AUGMENT = {
    "digits": {"crop_pad": 1, "flip": False},  # digits are not mirror-symmetric
    "cifar10": {"crop_pad": 4, "flip": True},
    "cifar100": {"crop_pad": 4, "flip": True},
    "imagefolder": {"crop_pad": 8, "flip": True},
    "synthetic": {"crop_pad": 0, "flip": False},
    "diabetes": {"crop_pad": 0, "flip": False},   # tabular: no augmentation
    "tabular": {"crop_pad": 0, "flip": False},
    "prepared": {"crop_pad": None, "flip": None},   # the set's own view, recorded in its index
}


def register_source(name, reads_files=True):
    """Register a loader ``fn(root, **options) -> Dataset`` under ``name``; ``reads_files=False``: it takes no root."""

    def register(fn):
        _SOURCES[name] = fn
        if not reads_files:
            _READS_NO_FILES.add(name)
        return fn

    return register


def dataset_names() -> list:
    """Names accepted by ``load_dataset``."""
    return sorted(_SOURCES)


def _check_name(name):
    if name not in _SOURCES:
        raise ConfigError("data.name", name, f"one of: {', '.join(dataset_names())}")


def check_root(name: str, root) -> None:
    """A root for a data set that reads no files (embedded, generated) is refused, not silently ignored."""
    _check_name(name)
    if root is not None and name in _READS_NO_FILES:
        raise ConfigError("data.root", root, f"none for data set {name}: it reads no files (its data are "
                          f"{'generated' if name == 'synthetic' else 'embedded in scikit-learn'}); remove data.root")


def load_dataset(name: str, root=None, cache_dir=None, **options) -> Dataset:
    """Load the data set ``name`` from ``root``; ``options`` are the source's keyword options (see each source).
    ``cache_dir``: a node-local folder that a prepared set at a URI is copied into (``data.cache_dir``)."""
    check_root(name, root)
    loader = _SOURCES[name]
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("root", "cache_dir")]
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(f"data.{key}", value, f"options of {name}: {', '.join(accepted) or 'none'}")
    if cache_dir is not None:
        if name != "prepared":
            raise ConfigError("data.cache_dir", cache_dir, "only for data.name prepared (a prepared set copied into a "
                                                           "node-local cache)")
        options["cache_dir"] = cache_dir
    return loader(root, **options)


def default_augment(name) -> dict:
    """The usual augmentation of a data set: random-crop padding and horizontal flip (None for a prepared set: its
    index records its own view)."""
    _check_name(name)
    return dict(_AUGMENT[name])


# ---------------------------------------------------------------------------------------------------------------------
# statistics and checks


def channel_stats(x: np.ndarray):
    """Per-channel mean and std of uint8 images [N, C, H, W] in [0, 1] scale, exact, from 256-bin histograms."""
    return histogram_stats(channel_histogram(x))


def channel_histogram(x: np.ndarray) -> np.ndarray:
    """int64 [C, 256]: how often each value occurs in each channel of uint8 images [N, C, H, W]."""
    hist = np.zeros((x.shape[1], 256), dtype=np.int64)
    for start in range(0, len(x), 1024):  # chunks bound the memory on large sets
        for c in range(x.shape[1]):
            hist[c] += np.bincount(x[start : start + 1024, c].ravel(), minlength=256)
    return hist


def histogram_stats(hist: np.ndarray):
    """(mean, std) per channel in [0, 1] scale from ``channel_histogram`` counts (summed over parts of a set)."""
    hist = np.asarray(hist, dtype=np.int64)
    values = np.arange(256, dtype=np.float64) / 255.0
    count = np.maximum(hist.sum(axis=1), 1)
    mean = hist @ values / count
    var = np.maximum(hist @ values**2 / count - mean**2, 0.0)
    return _stats_tuple(mean, np.sqrt(var))


def feature_stats(x: np.ndarray):
    """Per-feature mean and std of tabular float features [N, F]."""
    x = x.astype(np.float64)
    return _stats_tuple(x.mean(axis=0), x.std(axis=0))


def _stats_tuple(mean, std):
    std = np.where(std > 0, std, 1.0)  # a constant channel must not divide by zero when normalised
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _positive_int(field, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(field, value, f"an integer >= {minimum}")
    return int(value)


def _image_spec(train_x, num_classes, mean=None, std=None, class_names=None) -> DataSpec:
    if mean is None:
        mean, std = channel_stats(train_x)
    names = tuple(str(n) for n in class_names) if class_names is not None else None
    return DataSpec("classification", tuple(train_x.shape[1:]), num_classes, tuple(mean), tuple(std), names)


# ---------------------------------------------------------------------------------------------------------------------
# digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed, not the run seed: every run evaluates on the same test set


def _sklearn_table(name: str, **kwargs) -> np.ndarray:
    """One of the tables scikit-learn ships (sklearn/datasets/data), read as its loaders read it, without importing
    scikit-learn (whose import costs seconds, scipy with it)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.name", name.split("_")[0].split(".")[0], "needs scikit-learn installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        return np.loadtxt(f, **kwargs)


@register_source("digits", reads_files=False)
def load_digits_dataset(root=None) -> Dataset:
    """scikit-learn's 1,797 8x8 grey digits (values 0..16, scaled to uint8 0..255), 20% held out as a fixed test set."""
    data = _sklearn_table("digits.csv.gz", delimiter=",")
    x = np.round(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = data[:, -1].astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
    n_test = int(round(DIGITS_TEST_FRACTION * len(x)))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    train_x = x[train_idx]
    return Dataset(_image_spec(train_x, 10, class_names=range(10)), train_x, y[train_idx], x[test_idx], y[test_idx],
                   "digits")


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python batches

# name -> (torchvision class name, title, train files, test file, label key, classes, standard mean, standard std)
_CIFAR = {
    "cifar10": ("CIFAR10", "CIFAR-10", "data_batch_*", "test_batch", "labels", 10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "CIFAR-100", "train", "test", "fine_labels", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}  # fmt: skip
_CIFAR_META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}


def _cifar_class_names(name, folder: Path):
    """The class names in the folder's meta file (beside the test batch), or None where it has none."""
    file_name, key = _CIFAR_META[name]
    if not (folder / file_name).is_file():
        return None
    meta = safe_load(folder / file_name, encoding="latin1")
    names = meta.get(key) if isinstance(meta, dict) else None
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names] if names is not None else None


def _torchvision_cifar(name):
    from torchvision import datasets

    return getattr(datasets, _CIFAR[name][0])


def _cifar_files(folder: Path, train_pattern: str, test_name: str):
    """(train batch paths in numeric order, test batch path) in ``folder``, or None if they are not there."""
    if not folder.is_dir() or not (folder / test_name).is_file():
        return None
    if "*" in train_pattern:
        prefix = train_pattern.rstrip("*")
        found = [p for p in folder.glob(train_pattern) if p.is_file() and p.name[len(prefix):].isdigit()]
        train = sorted(found, key=lambda p: int(p.name[len(prefix):]))
    else:
        train = [folder / train_pattern] if (folder / train_pattern).is_file() else []
    return (train, folder / test_name) if train else None


def _find_cifar(name, root):
    """The batch files under ``root`` itself or under its standard sub-folder."""
    _, _, train_pattern, test_name, *_ = _CIFAR[name]
    base_folder = _torchvision_cifar(name).base_folder
    for folder in (Path(root), Path(root) / base_folder):
        files = _cifar_files(folder, train_pattern, test_name)
        if files:
            return files
    return None


def _read_cifar_batch(path: Path, label_key: str):
    """One python batch -> (uint8 [N, 3, 32, 32], int64 [N]); rows are stored R, G, B planes, each row-major."""
    batch = safe_load(path, encoding="latin1")
    if not isinstance(batch, dict):
        raise ConfigError("data.root", str(path), "not a CIFAR python batch (expected a pickled dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise ConfigError("data.root", str(path), f"not a CIFAR python batch: no {key!r} entry")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ConfigError("data.root", str(path), f"a CIFAR batch has data [N, 3072] and N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name, root, download) -> Dataset:
    _, title, train_pattern, test_name, label_key, num_classes, mean, std = _CIFAR[name]
    base_folder = _torchvision_cifar(name).base_folder
    missing = (
        f"no {title} python batches there (expected {train_pattern}/{test_name} or {base_folder}/); "
        "set data.download: true to fetch them"
    )
    if root is None:
        raise ConfigError("data.root", root, missing)
    files = _find_cifar(name, root)
    if files is None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        source = _torchvision_cifar(name)
        download_and_extract_archive(source.url, str(root), filename=source.filename, md5=source.tgz_md5)
        files = _find_cifar(name, root)
    if files is None:
        raise ConfigError("data.root", root, missing)
    train_paths, test_path = files
    train = [_read_cifar_batch(p, label_key) for p in train_paths]
    train_x, train_y = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    test_x, test_y = _read_cifar_batch(test_path, label_key)
    spec = _image_spec(train_x, num_classes, mean, std, _cifar_class_names(name, test_path.parent))
    return Dataset(spec, train_x, train_y, test_x, test_y, name)


@register_source("cifar10")
def load_cifar10(root=None, download=False) -> Dataset:
    """CIFAR-10 python batches: all ``data_batch_*`` present (a subset may hold only some) and ``test_batch``."""
    return _load_cifar("cifar10", root, download)


@register_source("cifar100")
def load_cifar100(root=None, download=False) -> Dataset:
    """CIFAR-100 python batches ``train`` / ``test`` with the 100 fine labels."""
    return _load_cifar("cifar100", root, download)


# ---------------------------------------------------------------------------------------------------------------------
# image folders (ImageNet / TinyImageNet layout)


@dataclass
class ImageFolderListing:
    """An image folder's samples by split, read from its layout alone (no image is opened): ``(path, label)`` pairs in
    sorted order of class, then file name; ``others``: ``(path, reason)`` of files that are not samples."""

    classes: list
    train: list
    test: list
    others: list


def _image_files(folder: Path, field: str, others: list) -> list:
    """Image files of a class folder, or of its ``images/`` sub-folder (TinyImageNet), sorted by name; other files go
    to ``others``. A class folder without an image is refused: it would be a class no sample has."""
    if (folder / "images").is_dir():
        folder = folder / "images"
    files, kept = sorted(p for p in folder.iterdir() if p.is_file()), []
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            kept.append(path)
        else:
            others.append((path, "not an image file (its suffix)"))
    if not kept:
        raise ConfigError(field, str(folder), f"a class folder with at least one image ({', '.join(IMAGE_SUFFIXES)});"
                                              " remove the empty folder or fill it")
    return kept


def _class_folders(split: Path, field: str, others: list, classes=None):
    """(samples, classes) of ``split/<class>/[images/]*``; with ``classes`` given, val classes must be among them."""
    names = sorted(d.name for d in split.iterdir() if d.is_dir())
    if not names:
        raise ConfigError(field, str(split), "class folders <class>/ holding images; found none")
    if classes is None:
        classes = names
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in names:
        if name not in index:
            raise ConfigError(field, str(split / name), f"a class of train/: val class {name!r} has no train/{name}/")
        samples += [(path, index[name]) for path in _image_files(split / name, field, others)]
    return samples, classes


def _labels_file_rows(labels_file: Path):
    """(file, class) of each line of a val labels file: TinyImageNet's ``val_annotations.txt`` (tab-separated: file,
    class, box) or ImageNet's ``LOC_val_solution.csv`` (ImageId,PredictionString whose first word is the class)."""
    for number, line in enumerate(labels_file.read_text().splitlines()):
        fields = line.split(",") if "," in line else line.split()
        if not line.strip() or (number == 0 and fields[0].strip() == "ImageId"):
            continue
        if len(fields) < 2 or not fields[1].split():
            raise ConfigError("val labels", str(labels_file), f"lines 'FILE CLASS ...'; line {number + 1} is {line!r}")
        yield fields[0].strip(), fields[1].split()[0]


def _flat_val(val: Path, labels_file: Path, field: str, classes: list, others: list):
    """A flat ``val/`` (or TinyImageNet's ``val/images/``) labelled by a labels file -> samples in file-name order."""
    folder = val / "images" if (val / "images").is_dir() else val
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    stems = {p.stem: p for p in files.values()}
    index = {c: i for i, c in enumerate(classes)}
    labelled = {}
    for name, class_name in _labels_file_rows(labels_file):
        path = files.get(name) or stems.get(name)
        if path is None:
            raise ConfigError(field, str(folder / name), f"an image named by {labels_file.name}; it is not in {folder}")
        if class_name not in index:
            raise ConfigError(field, str(labels_file), f"classes of train/; it names {class_name!r}, which has no "
                                                       "train folder")
        labelled[path] = index[class_name]
    for path in sorted(files.values()):
        if path not in labelled and path != labels_file:
            others.append((path, f"not in {labels_file.name}" if path.suffix.lower() in IMAGE_SUFFIXES
                           else "not an image file (its suffix)"))
    return sorted(labelled.items())


def list_image_folder(root, field: str = "data.root", val_labels=None) -> ImageFolderListing:
    """The samples of ``root/train/<class>/[images/]*`` and of ``root/val/``: class folders, TinyImageNet's
    ``val/images/`` + ``val/val_annotations.txt``, or ImageNet's flat ``val/`` with a labels file (``val_labels``).
    Classes are the train folder names in sorted order; ``field`` names the input in errors."""
    expected = "expected train/<class>/ and val/ image folders (ImageNet or TinyImageNet layout)"
    if root is None or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise ConfigError(field, root, expected)
    root, others = Path(root), []
    train, classes = _class_folders(root / "train", field, others)
    val = root / "val"
    labels_file = Path(val_labels) if val_labels else val / "val_annotations.txt"
    if val_labels and not labels_file.is_file():
        raise ConfigError("val labels", str(labels_file), "a labels file: lines 'FILE CLASS ...'")
    if labels_file.is_file():
        test = _flat_val(val, labels_file, field, classes, others)
    elif any(d.is_dir() for d in val.iterdir()):
        test, _ = _class_folders(val, field, others, classes)
    else:
        raise ConfigError(field, str(val), "class folders val/<class>/, or a flat val/ with a labels file (TinyImageNet's"
                                           " val/val_annotations.txt, or ImageNet's LOC_val_solution.csv: --val-labels)")
    if not test:
        raise ConfigError(field, str(val), f"at least one val image; {expected}")
    return ImageFolderListing(classes, train, test, others)


def read_image(path, image_size: int) -> np.ndarray:
    """One image file as RGB uint8 [3, S, S], resized (bilinear) where its size differs; an unreadable file is refused
    by name (a truncated JPEG, a file that is no image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ConfigError("data.root", str(path), f"an image file PIL can read ({type(err).__name__}: {err})") from None


def _read_images(samples, image_size: int) -> np.ndarray:
    """RGB images resized to image_size x image_size where needed -> uint8 [N, 3, S, S]."""
    out = np.empty((len(samples), 3, image_size, image_size), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        out[i] = read_image(path, image_size)
    return out


@register_source("imagefolder")
def load_imagefolder(root=None, image_size=64) -> Dataset:
    """``root/train/<class>/[images/]*.{jpg,png,...}``; test split ``root/val/`` as class folders or TinyImageNet's
    ``val/images/`` + ``val/val_annotations.txt``. Classes are the train folder names in sorted order; a class folder
    without an image is refused."""
    image_size = _positive_int("data.image_size", image_size)
    listing = list_image_folder(root)
    train_x = _read_images(listing.train, image_size)
    test_x = _read_images(listing.test, image_size)
    train_y = np.asarray([label for _, label in listing.train], np.int64)
    test_y = np.asarray([label for _, label in listing.test], np.int64)
    return Dataset(_image_spec(train_x, len(listing.classes), class_names=listing.classes), train_x, train_y, test_x,
                   test_y, "imagefolder")


# ---------------------------------------------------------------------------------------------------------------------
# synthetic


@register_source("synthetic", reads_files=False)
def load_synthetic(
    root=None, num_train=1024, num_test=256, shape=(3, 32, 32), num_classes=10, task="classification", seed=0
) -> Dataset:
    """Seeded random data for benchmarks: uint8 images for a 3-element ``shape``, float32 features for a 1-element one.

    Classification labels are random; regression targets (``task="regression"``) are a fixed random linear function
    of the float input plus noise, so that a model can fit them.
    """
    num_train = _positive_int("data.num_train", num_train)
    num_test = _positive_int("data.num_test", num_test, minimum=0)
    num_classes = _positive_int("data.num_classes", num_classes)
    if isinstance(shape, (str, bytes)) or len(tuple(shape)) not in (1, 3):
        raise ConfigError("data.shape", shape, "[features] for tabular data or [channels, height, width] for images")
    shape = tuple(_positive_int("data.shape", s) for s in shape)
    if task not in ("classification", "regression"):
        raise ConfigError("data.options.task", task, "classification or regression")
    rng = np.random.default_rng(derive_seed("synthetic", seed))
    n = num_train + num_test
    if len(shape) == 3:
        x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        features = x.reshape(n, -1) / 255.0
    else:
        x = rng.standard_normal((n, *shape), dtype=np.float32)
        features = x.astype(np.float64)
    if task == "classification":
        y = rng.integers(0, num_classes, size=n).astype(np.int64)
    else:
        num_classes = 1
        weights = rng.standard_normal(features.shape[1]) / np.sqrt(features.shape[1])
        y = (features @ weights + 0.1 * rng.standard_normal(n)).astype(np.float32)
    train_x, test_x = x[:num_train], x[num_train:]
    mean, std = channel_stats(train_x) if len(shape) == 3 else feature_stats(train_x)
    spec = DataSpec(task, shape, num_classes, mean, std)
    return Dataset(spec, train_x, y[:num_train], test_x, y[num_train:], "synthetic")


# ---------------------------------------------------------------------------------------------------------------------
# tabular: diabetes and CSV / Parquet files

TABULAR_TEST_FRACTION = 0.2
TABULAR_SPLIT_SEED = 0  # fixed, not the run seed: every run evaluates on the same test set
MAX_INFERRED_CLASSES = 20  # an integer or string target with at most this many values is read as class labels
TABULAR_SUFFIXES = (".csv", ".parquet", ".pq")


def fixed_split(n: int, fraction: float = TABULAR_TEST_FRACTION, seed: int = TABULAR_SPLIT_SEED):
    """(test indices, train indices), each sorted: ``fraction`` of range(n) held out by a fixed seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(fraction * n))
    return np.sort(perm[:n_test]), np.sort(perm[n_test:])


def standardize_targets(train_y: np.ndarray, test_y: np.ndarray):
    """(train_y - mean) / std and the same for test_y, with mean and std of the train targets only."""
    mean, std = train_y.mean(axis=0), train_y.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((train_y - mean) / std).astype(np.float32), ((test_y - mean) / std).astype(np.float32)


def _tabular_dataset(train_x, train_y, test_x, test_y, task, num_classes, name, class_names=None) -> Dataset:
    mean, std = feature_stats(train_x)
    spec = DataSpec(task, (train_x.shape[1],), num_classes, mean, std,
                    tuple(str(c) for c in class_names) if class_names is not None else None)
    return Dataset(spec, train_x, train_y, test_x, test_y, name)


@register_source("diabetes", reads_files=False)
def load_diabetes_dataset(root=None, standardize_target=True) -> Dataset:
    """scikit-learn's diabetes regression set (442 patients, 10 features, disease progression after one year), 20% held
    out as a fixed test set. Features are the raw values (the model standardizes its input itself).

    Targets are standardized with the train split's mean and std by default (``standardize_target: false`` keeps the
    raw scale, about 25..346), so MSE is in units of the target's variance: a model predicting the mean scores ~1.
    """
    x = _sklearn_table("diabetes_data_raw.csv.gz").astype(np.float32)
    y = _sklearn_table("diabetes_target.csv.gz").astype(np.float32)
    test_idx, train_idx = fixed_split(len(x))
    train_y, test_y = y[train_idx], y[test_idx]
    if standardize_target:
        train_y, test_y = standardize_targets(train_y, test_y)
    return _tabular_dataset(x[train_idx], train_y, x[test_idx], test_y, "regression", 1, "diabetes")


def _read_table(path: Path):
    """A pyarrow Table from a CSV or Parquet file; a file pyarrow cannot read as a table (an empty CSV) is refused by
    name."""
    import pyarrow as pa

    try:
        if path.suffix.lower() == ".csv":
            from pyarrow import csv

            return csv.read_csv(path)
        from pyarrow import parquet

        return parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ConfigError("data.root", str(path), f"a table with a header and rows ({str(err).splitlines()[0]})") \
            from None


def _split_files(folder: Path, root):
    """The ``train.*`` and ``test.*`` table files of a folder."""
    found = {}
    for split in ("train", "test"):
        files = [folder / f"{split}{suffix}" for suffix in TABULAR_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
        if not files:
            raise ConfigError("data.root", root, f"a folder with train and test files ({', '.join(TABULAR_SUFFIXES)})")
        found[split] = files[0]
    return found["train"], found["test"]


def _columns(table, target: str, root):
    """(feature matrix float32 [N, F], target column as numpy) of a table; every other column must be numeric."""
    import pyarrow as pa

    if target not in table.column_names:
        raise ConfigError("data.options.target", target, f"a column of {root}: {', '.join(table.column_names)}")
    features = [name for name in table.column_names if name != target]
    if not features:
        raise ConfigError("data.root", root, "a table with at least one feature column beside the target")
    for name in features:
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise ConfigError("data.root", root, f"numeric feature columns; column {name!r} is {kind}")
    x = np.stack([table.column(name).to_numpy(zero_copy_only=False).astype(np.float32) for name in features], axis=1)
    if not np.isfinite(x).all():
        row, column = np.argwhere(~np.isfinite(x))[0]
        _refuse_missing(root, features[column], row)
    target_column = table.column(target)
    if target_column.null_count:
        _refuse_missing(root, target, int(np.flatnonzero(target_column.is_null().to_numpy(zero_copy_only=False))[0]))
    values = target_column.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        _refuse_missing(root, target, int(np.flatnonzero(~np.isfinite(values))[0]))
    return x, values


def _refuse_missing(path, column: str, row: int):
    """A missing, NaN or infinite cell, named by file, column and row: at load time, not as a non-finite loss later."""
    raise ConfigError("data.root", str(path), f"a number in every cell; column {column!r} is missing, NaN or infinite "
                                              f"at row {int(row) + 1} (data rows counted from 1, the header not counted)")


def infer_task(target_values: np.ndarray) -> str:
    """classification for an integer, boolean or string target with at most MAX_INFERRED_CLASSES values; else
    regression."""
    discrete = target_values.dtype.kind in "iubOSU"
    return "classification" if discrete and len(np.unique(target_values)) <= MAX_INFERRED_CLASSES else "regression"


@register_source("tabular")
def load_tabular(root=None, target=None, task=None, test_fraction=TABULAR_TEST_FRACTION,
                 standardize_target=True) -> Dataset:
    """A CSV or Parquet table (read with pyarrow): ``root`` is one file (a fixed ``test_fraction`` of its rows is held
    out, seed 0) or a folder with ``train.{csv,parquet}`` and ``test.{csv,parquet}``.

    ``target`` names the label column; every other column is a numeric feature. ``task`` is ``classification`` or
    ``regression``; when absent, see :func:`infer_task`. Class labels are mapped to 0..K-1 in sorted order of the
    train values. Regression targets are standardized with the train split's mean and std unless
    ``standardize_target`` is false.
    """
    if not isinstance(target, str) or not target:
        raise ConfigError("data.options.target", target, "the name of the target column (data.options.target)")
    if task not in (None, "classification", "regression"):
        raise ConfigError("data.options.task", task, "classification or regression")
    if root is None or not Path(root).exists():
        raise ConfigError("data.root", root, "a CSV/Parquet file or a folder with train and test files")
    root_path = Path(root)
    if root_path.is_dir():
        train_path, test_path = _split_files(root_path, root)
        train_x, train_t = _columns(_read_table(train_path), target, train_path)
        test_x, test_t = _columns(_read_table(test_path), target, test_path)
    else:
        if root_path.suffix.lower() not in TABULAR_SUFFIXES:
            raise ConfigError("data.root", root, f"a file ending in one of: {', '.join(TABULAR_SUFFIXES)}")
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError("data.options.test_fraction", test_fraction, "a fraction in (0, 1)")
        x, t = _columns(_read_table(root_path), target, root)
        test_idx, train_idx = fixed_split(len(x), test_fraction)
        train_x, train_t, test_x, test_t = x[train_idx], t[train_idx], x[test_idx], t[test_idx]
    if len(train_x) == 0 or len(test_x) == 0:
        raise ConfigError("data.root", root, "train and test rows (one of them is empty)")
    task = task or infer_task(train_t)
    if task == "classification":
        classes = np.unique(train_t)
        unknown = np.setdiff1d(np.unique(test_t), classes)
        if len(unknown):
            raise ConfigError("data.root", root, f"test labels among the train labels; unseen: {unknown[:5].tolist()}")
        train_y = np.searchsorted(classes, train_t).astype(np.int64)
        test_y = np.searchsorted(classes, test_t).astype(np.int64)
        return _tabular_dataset(train_x, train_y, test_x, test_y, task, len(classes), "tabular", classes.tolist())
    try:
        train_y, test_y = train_t.astype(np.float32), test_t.astype(np.float32)
    except ValueError:
        raise ConfigError("data.options.task", task, "classification for a non-numeric target column") from None
    if standardize_target:
        train_y, test_y = standardize_targets(train_y, test_y)
    return _tabular_dataset(train_x, train_y, test_x, test_y, task, 1, "tabular")
