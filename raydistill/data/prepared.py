"""A prepared data set: images decoded once (``raydistill data prepare``), stored S x S as uint8 in a few large files
with an index, and read as memory maps: no process holds the set in its heap, and a node holds one copy of it, in its
page cache, whatever the number of processes reading it.

The layout of a prepared set (a folder)::

    index.json          classes, size S, channels C, the view the set is trained with, channel mean and std, per
                        split its files with their byte counts and checksums, the source files skipped, the digest
    train-00000.u8 ...  uint8 [n, C, S, S], row-major, the split's samples in source order, a shard per file
    train-labels.npy    int64 [N]
    train-sizes.npy     int32 [N, 2]: each image's height and width before it was resized to S x S
    train-names.txt     each sample's source: a file relative to the source folder, or NAME:SPLIT[i]
    test-...            the same for the test split (ImageNet's official val)

Images are stored S x S (the whole image resized, its aspect ratio not kept), as the downsampled ImageNets
(Chrabaszcz et al. 2017) are: a fixed shape makes a split one array per shard, a sample one slice, a batch one gather
and a view one batched op; docs/data.md weighs it against FFCV's variable-shape storage.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import threading
from pathlib import Path

import numpy as np

from raydistill.errors import ConfigError

FORMAT = "raydistill-prepared"
VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "test")
SIDE_FILES = ("labels", "sizes", "names")          # beside a split's shards: {split}-labels.npy, ...
SIDE_SUFFIX = {"labels": ".npy", "sizes": ".npy", "names": ".txt"}
VIEW_KINDS = ("random_resized_crop", "crop_pad")
CHECKSUM = "blake2b"
READ_BLOCK = 8 << 20                                 # bytes hashed or copied at a time


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.u8"


def side_name(split: str, kind: str) -> str:
    return f"{split}-{kind}{SIDE_SUFFIX[kind]}"


def file_checksum(path) -> str:
    """The blake2b (16 bytes, hex) of a file, read in blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def set_digest(index: dict) -> str:
    """The digest of a prepared set: of everything its index says but where it came from, so the same images, labels
    and settings give the same digest wherever they were prepared (every file enters through its checksum)."""
    content = {k: v for k, v in index.items() if k not in ("digest", "source")}
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


def index_files(index: dict) -> list:
    """Every file the index lists, as its entries ``{file, bytes, blake2b}``: shards, then labels, sizes, names."""
    files = []
    for split in SPLITS:
        entry = index["splits"][split]
        files += entry["shards"] + [entry[kind] for kind in SIDE_FILES]
    return files


def _refuse(path, allowed):
    raise ConfigError("data.root", str(path), allowed)


def read_index(root) -> dict:
    """The index of the prepared set at ``root`` (a local folder), checked against its files' presence and byte counts
    (cheap: no file is read; ``verify`` reads them all)."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        _refuse(root, f"a prepared set (a folder with {INDEX}: raydistill data prepare SOURCE {root})")
    try:
        index = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        _refuse(path, f"the index of a prepared set, in JSON ({err})")
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        _refuse(path, f"the index of a prepared set ({FORMAT} version {VERSION}); prepare the set again")
    try:
        sample_bytes = index["channels"] * index["size"] * index["size"]
        for split in SPLITS:
            entry = index["splits"][split]
            if sum(s["count"] for s in entry["shards"]) != entry["count"]:
                _refuse(path, f"an index whose {split} shards add up to its {split} count; prepare the set again")
            for shard in entry["shards"]:
                if shard["bytes"] != shard["count"] * sample_bytes:
                    _refuse(path, f"{shard['file']}: {shard['count']} samples of {sample_bytes} bytes; the index "
                                  f"says {shard['bytes']} bytes")
        files = index_files(index)
    except (KeyError, TypeError) as err:
        _refuse(path, f"the index of a prepared set ({type(err).__name__}: {err}); prepare the set again")
    for entry in files:
        file = root / entry["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != entry["bytes"]:
            found = "it is missing" if size is None else f"it has {size}"
            _refuse(file, f"a file of {entry['bytes']} bytes, as {INDEX} lists it ({found}); the set is incomplete "
                          "or damaged: copy or prepare it again")
    if index.get("digest") != set_digest(index):
        _refuse(path, "an index whose digest matches its content (it was edited); prepare the set again")
    return index


def verify(root) -> dict:
    """Reads every file of a prepared set and checks it against its checksum in the index; returns the index."""
    root = Path(root)
    index = read_index(root)
    for entry in index_files(index):
        if file_checksum(root / entry["file"]) != entry[CHECKSUM]:
            _refuse(root / entry["file"], f"the bytes {INDEX} lists ({CHECKSUM} {entry[CHECKSUM]}); the file was "
                                          "changed or damaged: copy or prepare the set again")
    return index


class PreparedSet:
    """A prepared set opened for reading: ``read(split, indices)`` gathers the samples' uint8 pixels from memory maps
    (only the batch lands in the heap), ``labels(split)`` gives the labels, ``spec`` what a model builder needs.

    Splits: ``train`` and ``test`` as prepared, and after ``with_validation`` a ``val`` split carved out of train by
    index (no image is copied). ``crop_size`` is the side of the views (default: the stored size S); the model sees
    (C, crop_size, crop_size). An instance pickles without its maps (a process reopens them on its first read).
    """

    def __init__(self, root, crop_size: int | None = None, index: dict | None = None):
        self.root = Path(root)
        self.index = index if index is not None else read_index(self.root)
        self.size = int(self.index["size"])
        self.channels = int(self.index["channels"])
        self.classes = list(self.index["classes"])
        self.view = dict(self.index["view"])
        self.crop_size = self.size if crop_size is None else crop_size
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 1:
            raise ConfigError("data.options.crop_size", crop_size, "an integer >= 1 (the side of the views)")
        if self.view["kind"] == "crop_pad" and self.crop_size != self.size:
            raise ConfigError("data.options.crop_size", crop_size, f"{self.size}: a set with crop-and-pad views is "
                                                                   "trained at its stored size")
        self._offsets = {}
        for split in SPLITS:
            counts = [s["count"] for s in self.index["splits"][split]["shards"]]
            self._offsets[split] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._rows = {split: (split, None) for split in SPLITS}     # split -> (stored split, its rows or all)
        self._maps = {}
        self._labels = {}
        self._lock = threading.Lock()

    # -- what the set is ------------------------------------------------------------------------------------------

    @property
    def digest(self) -> str:
        return self.index["digest"]

    @property
    def spec(self):
        """The DataSpec a model is built from: the views' shape, the classes, the channel statistics of the index."""
        from raydistill.data.sources import DataSpec

        shape = (self.channels, self.crop_size, self.crop_size)
        return DataSpec("classification", shape, len(self.classes), tuple(self.index["mean"]), tuple(self.index["std"]))

    @property
    def splits(self) -> tuple:
        return tuple(self._rows)

    def num_samples(self, split: str) -> int:
        stored, rows = self._split(split)
        return int(self._offsets[stored][-1]) if rows is None else len(rows)

    def with_validation(self, fraction: float, seed: int) -> "PreparedSet":
        """The same set with ``val`` carved out of ``train`` by index as ``Dataset.split_validation`` carves it (the
        same samples for the same seed), sharing this one's maps; ``train`` keeps the rest."""
        from raydistill.data.sources import validation_indices

        train_rows, val_rows = validation_indices(self.num_samples("train"), fraction, seed)
        carved = PreparedSet(self.root, self.crop_size, self.index)
        carved._maps, carved._lock = self._maps, self._lock
        carved._rows = {"train": ("train", train_rows), "val": ("train", val_rows), "test": ("test", None)}
        return carved

    # -- reading ----------------------------------------------------------------------------------------------------

    def labels(self, split: str, indices=None) -> np.ndarray:
        """int64 labels of a split (of ``indices`` of it)."""
        stored, rows = self._split(split)
        if stored not in self._labels:
            self._labels[stored] = np.load(self.root / self.index["splits"][stored]["labels"]["file"])
        labels = self._labels[stored] if rows is None else self._labels[stored][rows]
        return labels if indices is None else labels[np.asarray(indices, dtype=np.int64)]

    def read(self, split: str, indices) -> np.ndarray:
        """uint8 [len(indices), C, S, S]: the samples at ``indices`` of ``split``, gathered shard by shard."""
        stored, rows = self._split(split)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = indices if rows is None else rows[indices]
        offsets = self._offsets[stored]
        if len(rows) and (rows.min() < 0 or rows.max() >= offsets[-1]):
            raise IndexError(f"{split}: indices must lie in 0..{self.num_samples(split) - 1}")
        out = np.empty((len(rows), self.channels, self.size, self.size), dtype=np.uint8)
        shards = np.searchsorted(offsets, rows, side="right") - 1
        for shard in np.unique(shards):
            at = np.flatnonzero(shards == shard)
            out[at] = self._shard(stored, int(shard))[rows[at] - offsets[shard]]
        return out

    def batch(self, split: str, indices, device=None):
        """(uint8 images, int64 labels) of ``indices`` as torch tensors on ``device``: through pinned memory, without
        waiting, to a GPU; the host arrays themselves on a CPU."""
        from raydistill.data.prefetch import host_batch, to_device

        return to_device(host_batch(self, split, indices, device), device)

    def arrays(self, split: str) -> np.ndarray:
        """The whole split in the heap: only for the in-memory path of small sets."""
        return self.read(split, np.arange(self.num_samples(split)))

    def _split(self, split: str):
        if split not in self._rows:
            raise ConfigError("split", split, f"one of: {', '.join(self._rows)}")
        return self._rows[split]

    def _shard(self, split: str, number: int) -> np.ndarray:
        key = (split, number)
        with self._lock:
            if key not in self._maps:
                entry = self.index["splits"][split]["shards"][number]
                with open(self.root / entry["file"], "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                mapped.madvise(mmap.MADV_RANDOM)   # a step reads scattered samples: read-ahead would read in vain
                shape = (entry["count"], self.channels, self.size, self.size)
                self._maps[key] = np.frombuffer(mapped, dtype=np.uint8).reshape(shape)
            return self._maps[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_labels"], state["_lock"] = {}, {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- views --------------------------------------------------------------------------------------------------------

    def train_view(self, x, seed: int, epoch: int, step: int, view_index: int, replay: int = 0):
        """A peer's augmented view of a step's uint8 batch (on any device): the set's own recipe, RandomResizedCrop +
        flip for ImageNet-style sets, crop-with-padding + flip for CIFAR-style ones."""
        from raydistill.data.views import make_view, random_resized_crop_view

        if self.view["kind"] == "crop_pad":
            return make_view(x, seed, epoch, step, view_index, self.view["crop_pad"], self.view["flip"],
                             self.view.get("pad_mode", "zeros"), replay=replay)
        return random_resized_crop_view(x, seed, epoch, step, view_index, self.crop_size, flip=self.view["flip"],
                                        scale=tuple(self.view["scale"]), ratio=tuple(self.view["ratio"]),
                                        replay=replay)

    def eval_view(self, x):
        """The evaluation view of a uint8 batch: the image as stored (CIFAR-style), or resized to crop / 0.875 and
        center-cropped to crop (ImageNet-style, torchvision's Resize(256) + CenterCrop(224) proportion)."""
        from raydistill.data.views import center_crop_view, to_float

        if self.view["kind"] == "crop_pad":
            return to_float(x)
        return center_crop_view(x, self.crop_size)


def open_prepared(root, crop_size: int | None = None, cache_dir=None) -> PreparedSet:
    """A prepared set from a local folder, or from a ``pyarrow.fs`` URI (s3://, gs://, hdfs://, file://) through a
    node-local copy in ``cache_dir`` (made once per node and checked against the index)."""
    from raydistill.data.cache import localize

    return PreparedSet(localize(root, cache_dir), crop_size)
