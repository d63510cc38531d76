"""A prepared data set read as memory maps: no process holds the set in its heap, and a node holds one copy of it, in
its page cache, whatever the number of processes reading it (layout.py has the files; prepare.py writes them).

Images are stored S x S (the whole image resized, its aspect ratio not kept), as the downsampled ImageNets
(Chrabaszcz et al. 2017) are: a fixed shape makes a split one array per shard, a sample one slice, a batch one gather
and a view one batched op; docs/data.md weighs it against FFCV's variable-shape storage.
"""
from __future__ import annotations

import mmap
import threading
from pathlib import Path

import numpy as np

from raydistill.data.cache import localize
from raydistill.data.layout import SPLITS, read_index
from raydistill.data.prefetch import host_batch, to_device
from raydistill.data.sources import DataSpec, Dataset, register_source, validation_indices
from raydistill.data.views import center_crop_view, make_view, random_resized_crop_view, to_float
from raydistill.errors import ConfigError


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
            mapped, array = self._shard(stored, int(shard))
            local = rows[at] - offsets[shard]
            _will_need(mapped, local, array[0].nbytes)
            out[at] = array[local]
        return out

    def batch(self, split: str, indices, device=None):
        """(uint8 images, int64 labels) of ``indices`` as torch tensors on ``device``: through pinned memory, without
        waiting, to a GPU; the host arrays themselves on a CPU."""
        return to_device(host_batch(self, split, indices, device), device)

    def arrays(self, split: str) -> np.ndarray:
        """The whole split in the heap: only for the in-memory path of small sets."""
        return self.read(split, np.arange(self.num_samples(split)))

    def _split(self, split: str):
        if split not in self._rows:
            raise ConfigError("split", split, f"one of: {', '.join(self._rows)}")
        return self._rows[split]

    def _shard(self, split: str, number: int):
        """(the shard's memory map, the same as a uint8 [n, C, S, S] array), opened on first use."""
        key = (split, number)
        with self._lock:
            if key not in self._maps:
                entry = self.index["splits"][split]["shards"][number]
                with open(self.root / entry["file"], "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                shape = (entry["count"], self.channels, self.size, self.size)
                self._maps[key] = mapped, np.frombuffer(mapped, dtype=np.uint8).reshape(shape)
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
        if self.view["kind"] == "crop_pad":
            return make_view(x, seed, epoch, step, view_index, self.view["crop_pad"], self.view["flip"],
                             self.view.get("pad_mode", "zeros"), replay=replay)
        return random_resized_crop_view(x, seed, epoch, step, view_index, self.crop_size, flip=self.view["flip"],
                                        scale=tuple(self.view["scale"]), ratio=tuple(self.view["ratio"]),
                                        replay=replay)

    def eval_view(self, x):
        """The evaluation view of a uint8 batch: the image as stored (CIFAR-style), or resized to crop / 0.875 and
        center-cropped to crop (ImageNet-style, torchvision's Resize(256) + CenterCrop(224) proportion)."""
        if self.view["kind"] == "crop_pad":
            return to_float(x)
        return center_crop_view(x, self.crop_size)


def _will_need(mapped: mmap.mmap, samples: np.ndarray, sample_bytes: int) -> None:
    """Asks the kernel to read every sample of a batch now (MADV_WILLNEED), so that a batch on disk is read as many
    requests at once instead of one page fault after another (measured: docs/benchmarks.md, "The data path"); on
    pages in the page cache it costs a system call per sample."""
    page = mmap.PAGESIZE
    for sample in samples.tolist():
        start = sample * sample_bytes
        first = start - start % page
        mapped.madvise(mmap.MADV_WILLNEED, first, start + sample_bytes - first)


def open_prepared(root, crop_size: int | None = None, cache_dir=None) -> PreparedSet:
    """A prepared set from a local folder, or from a ``pyarrow.fs`` URI (s3://, gs://, hdfs://, file://) through a
    node-local copy in ``cache_dir`` (made once per node and checked against the index)."""
    return PreparedSet(localize(root, cache_dir), crop_size)


@register_source("prepared")
def load_prepared(root=None, crop_size=None, cache_dir=None) -> Dataset:
    """A prepared set (``raydistill data prepare``) in its folder, or at a ``pyarrow.fs`` URI copied once per node into
    ``cache_dir``. ``crop_size``: the side of the views (default: the stored size).

    Read whole into arrays, the in-memory form every source gives, for a set made with crop-and-pad views
    (CIFAR-style, from a source such as cifar10): its pixels, labels, order and channel statistics are the source's.
    An ImageNet-style set (random-resized-crop views) is read from its memory maps, batch by batch
    (``raydistill.data.prepared.PreparedSet``), never whole: it is refused here."""
    prepared = open_prepared(root, crop_size, cache_dir)
    if prepared.view["kind"] != "crop_pad":
        raise ConfigError("data.root", str(root), "a prepared set with crop-and-pad views to read whole into memory; "
                                                  f"this one ({prepared.view['kind']} views) is read by index from its "
                                                  "memory maps, which the training runtime does not do yet")
    return Dataset(prepared.spec, prepared.arrays("train"), prepared.labels("train"), prepared.arrays("test"),
                   prepared.labels("test"), "prepared")
