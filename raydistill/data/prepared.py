"""A prepared data set read as memory maps: no process holds the set in its heap, and a node holds one copy of it, in
its page cache, whatever the number of processes reading it (layout.py has the files; prepare.py writes them).

Images are stored S x S (the whole image resized, its aspect ratio not kept), as the downsampled ImageNets
(Chrabaszcz et al. 2017) are: a fixed shape makes a split one array per shard, a sample one slice, a batch one gather
and a view one batched op; docs/data.md weighs it against FFCV's variable-shape storage.
"""
from __future__ import annotations

import io
import mmap
import socket
import threading

import numpy as np

from raydistill.data.cache import is_uri, localize, read_remote, remote_index
from raydistill.data.layout import SPLITS, read_index
from raydistill.data.prefetch import host_batch, to_device
from raydistill.data.sources import DataSpec, Dataset, register_source, validation_indices
from raydistill.data.views import CROP_PAD, eval_view, train_view
from raydistill.errors import ConfigError


class PreparedSet:
    """A prepared set opened for reading: ``read(split, indices)`` gathers the samples' uint8 pixels from memory maps
    (only the batch lands in the heap), ``labels(split)`` gives the labels, ``spec`` what a model builder needs.

    Splits: ``train`` and ``test`` as prepared, and after ``with_validation`` a ``val`` split carved out of train by
    index (no image is copied). ``crop_size`` is the side of the views (default: the stored size S); the model sees
    (C, crop_size, crop_size). ``root``: the set's folder, or a ``pyarrow.fs`` URI with ``cache_dir``, a node-local
    folder it is copied into by ``on_node`` (or the first read) on each node. The labels are read at once (small:
    every process holds them); an instance pickles without its maps (a process reopens them on its first read) and,
    for a URI, without its node's copy.
    """

    resident = False                  # read by index, batch by batch: never whole in a process

    def __init__(self, root, crop_size: int | None = None, index: dict | None = None, cache_dir=None):
        self.location = str(root)                         # as given: a folder or a URI
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.root = None if self.copied else localize(root)         # this node's folder (a copy: by on_node)
        if index is None:
            index = remote_index(root) if self.copied else read_index(self.root)
        self.index = index
        self.size = int(self.index["size"])
        self.channels = int(self.index["channels"])
        self.classes = list(self.index["classes"])
        self.view = dict(self.index["view"])
        self.crop_size = self.size if crop_size is None else crop_size
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 1:
            raise ConfigError("data.options.crop_size", crop_size, "an integer >= 1 (the side of the views)")
        if self.view["kind"] == CROP_PAD and self.crop_size != self.size:
            raise ConfigError("data.options.crop_size", crop_size, f"{self.size}: a set with crop-and-pad views is "
                                                                   "trained at its stored size")
        self._offsets = {}
        for split in SPLITS:
            counts = [s["count"] for s in self.index["splits"][split]["shards"]]
            self._offsets[split] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._rows = {split: (split, None) for split in SPLITS}     # split -> (stored split, its rows or all)
        self._labels = {split: self._read_labels(split) for split in SPLITS}
        self._maps = {}
        self._lock = threading.Lock()

    # -- what the set is ------------------------------------------------------------------------------------------

    @property
    def copied(self) -> bool:
        """Read through a node-local copy: a URI with a cache folder (a file:// URI without one is read in place)."""
        return self.cache_dir is not None and is_uri(self.location)

    @property
    def local(self) -> bool:
        """Its samples are read here without copying the set (a URI's set: once this node has its copy)."""
        return self.root is not None

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

    @property
    def source(self) -> str:
        """Where this process reads the set from."""
        if not self.copied:
            return str(self.root)
        return f"{self.root} (copied from {self.location})" if self.root is not None else self.location

    def describe(self) -> str:
        return f"prepared set {self.digest[:12]}"

    def num_samples(self, split: str) -> int:
        stored, rows = self._split(split)
        return int(self._offsets[stored][-1]) if rows is None else len(rows)

    def with_validation(self, fraction: float, seed: int) -> "PreparedSet":
        """The same set with ``val`` carved out of ``train`` by index as ``Dataset.split_validation`` carves it (the
        same samples for the same seed), sharing this one's maps; ``train`` keeps the rest."""
        train_rows, val_rows = validation_indices(self.num_samples("train"), fraction, seed)
        carved = self._sibling()
        carved._rows = {"train": ("train", train_rows), "val": ("train", val_rows), "test": ("test", None)}
        return carved

    def with_view(self, crop_pad=None, flip=None, pad_mode=None) -> "PreparedSet":
        """The same set with its views' settings changed where given (``data.crop_pad``, ``data.flip``,
        ``data.pad_mode``); None keeps the index's. A set with random-resized-crop views takes a flip only."""
        changed = self._sibling()
        changed.view = dict(self.view)
        if self.view["kind"] == CROP_PAD:
            given = {"crop_pad": crop_pad, "flip": flip, "pad_mode": pad_mode}
            changed.view.update({key: value for key, value in given.items() if value is not None})
            return changed
        if crop_pad is not None:
            raise ConfigError("data.crop_pad", crop_pad, "null for a prepared set with random-resized-crop views "
                                                         "(their side is data.options.crop_size)")
        if pad_mode not in (None, "zeros"):
            raise ConfigError("data.pad_mode", pad_mode, "zeros for a prepared set with random-resized-crop views "
                                                         "(they pad nothing)")
        if flip is not None:
            changed.view["flip"] = flip
        return changed

    def _sibling(self) -> "PreparedSet":
        """A shallow copy sharing this one's maps, lock and labels (copy.copy would drop them, as pickling does)."""
        sibling = object.__new__(PreparedSet)
        sibling.__dict__.update(self.__dict__)
        return sibling

    def on_node(self) -> "PreparedSet":
        """The set as this node reads it, checked before training starts: its folder holding every file of the index
        at its size, with the digest the run began with; for a URI, its copy in ``cache_dir``, made now if this node
        has none (once per node: the node's other processes wait for it)."""
        if self.copied:
            self.root = localize(self.location, self.cache_dir)
        found = read_index(self.root)
        if found["digest"] != self.digest:
            raise ConfigError("data.root", self.location, f"the prepared set of digest {self.digest} this run reads; "
                                                          f"this node ({socket.gethostname()}) finds digest "
                                                          f"{found['digest']} there")
        return self

    # -- reading ----------------------------------------------------------------------------------------------------

    def labels(self, split: str, indices=None) -> np.ndarray:
        """int64 labels of a split (of ``indices`` of it)."""
        stored, rows = self._split(split)
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

    def __getitem__(self, key: str) -> np.ndarray:
        """``{split}_y``: a split's labels (every process holds them); a prepared set's images are read by index."""
        split, _, part = key.rpartition("_")
        if part != "y" or split not in self._rows:
            raise KeyError(f"{key}: a prepared set gives its labels whole ({', '.join(s + '_y' for s in self._rows)})"
                           "; its images are read by index (read)")
        return self.labels(split)

    def _split(self, split: str):
        if split not in self._rows:
            raise ConfigError("split", split, f"one of: {', '.join(self._rows)}")
        return self._rows[split]

    def _read_labels(self, split: str) -> np.ndarray:
        name = self.index["splits"][split]["labels"]["file"]
        if self.copied:
            return np.load(io.BytesIO(read_remote(self.location, name)))
        return np.load(self.root / name)

    def _shard(self, split: str, number: int):
        """(the shard's memory map, the same as a uint8 [n, C, S, S] array), opened on first use."""
        key = (split, number)
        with self._lock:
            if key not in self._maps:
                if self.root is None:
                    self.on_node()                 # a URI read before on_node: this node's copy first
                entry = self.index["splits"][split]["shards"][number]
                with open(self.root / entry["file"], "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                shape = (entry["count"], self.channels, self.size, self.size)
                self._maps[key] = mapped, np.frombuffer(mapped, dtype=np.uint8).reshape(shape)
            return self._maps[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_lock"] = {}, None
        if self.copied:
            state["root"] = None                   # another node makes its own copy
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- views --------------------------------------------------------------------------------------------------------

    @property
    def recipe(self) -> dict:
        """How its views are made (``views.train_view``): the index's view, its settings changed by ``with_view``,
        with the crop's side for random-resized-crop views."""
        return dict(self.view) if self.view["kind"] == CROP_PAD else {**self.view, "size": self.crop_size}

    def train_view(self, x, seed: int, epoch: int, step: int, view_index: int, replay: int = 0, rows=None,
                   batch_size=None):
        """A peer's augmented view of a step's uint8 batch (on any device): the set's own recipe, RandomResizedCrop +
        flip for ImageNet-style sets, crop-with-padding + flip for CIFAR-style ones. rows: ``x`` holds these rows of
        a batch of ``batch_size`` (``views.make_view``)."""
        return train_view(self.recipe, x, seed, epoch, step, view_index, replay, rows, batch_size)

    def eval_view(self, x):
        """The evaluation view of a uint8 batch: the image as stored (CIFAR-style), or resized to crop / 0.875 and
        center-cropped to crop (ImageNet-style, torchvision's Resize(256) + CenterCrop(224) proportion)."""
        return eval_view(self.recipe, x)


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
    node-local copy in ``cache_dir`` (made once per node, by ``on_node`` or the first read, and checked against the
    index); its index and labels are read at once, no image."""
    return PreparedSet(root, crop_size, cache_dir=cache_dir)


@register_source("prepared")
def load_prepared(root=None, crop_size=None, cache_dir=None) -> Dataset:
    """A prepared set (``raydistill data prepare``) read whole into arrays, the in-memory form every source gives, for
    a set made with crop-and-pad views (CIFAR-style, from a source such as cifar10): its pixels, labels, order and
    channel statistics are the source's. A run with ``data.name: prepared`` does not come here: it reads any
    prepared set by index (``PreparedSet``). An ImageNet-style set (random-resized-crop views) is never read whole:
    it is refused here."""
    prepared = open_prepared(root, crop_size, cache_dir)
    if prepared.view["kind"] != CROP_PAD:
        raise ConfigError("data.root", str(root), "a prepared set with crop-and-pad views to read whole into memory; "
                                                  f"this one ({prepared.view['kind']} views) is read by index from its "
                                                  "memory maps (train with data.name prepared)")
    return Dataset(prepared.spec, prepared.arrays("train"), prepared.labels("train"), prepared.arrays("test"),
                   prepared.labels("test"), "prepared")
