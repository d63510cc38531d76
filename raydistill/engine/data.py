"""A run's data: one data set object per run, and one DataView of it per worker. No Ray.

Two kinds of set implement what the engine asks of a data set:
- in memory (``data/memory.py`` ``InMemorySet``): the arrays a source loads (digits, CIFAR, tabular, synthetic...);
- prepared (``data/prepared.py`` ``PreparedSet``): memory maps read by index (``raydistill data prepare``).
The driver opens it once (``load_run_data``) and sends it to every worker: an in-memory set with its arrays (shared
zero-copy by the processes of a node), a prepared set as a handle (its index and labels, no image). What the engine
calls of it:

    spec, digest, resident, source, describe()   what it is; resident: whole in memory (a worker may put each split
                                                 on its device); source: where this process reads it from
    num_samples(split), labels(split[, indices])  small: in memory in every process (train, val, test)
    read(split, indices) -> np.ndarray            a batch's inputs (uint8 images, or float features), in the heap
    arrays(split)                                 a resident set's whole split, without a copy
    train_view(x, seed, epoch, step, view_index, replay=0, rows=None, batch_size=None)
                                                  a peer's view of a batch (of its ``rows``), on x's device: the
                                                  set's own kind (crop-and-pad + flip, or RandomResizedCrop + flip),
                                                  its random numbers drawn on the CPU (the same on every device)
    eval_view(x)                                  the evaluation view (resize + center crop for ImageNet-style)
    on_node() -> the set                          opened on this node at a worker's set-up: a prepared set's folder
                                                  checked against its index, or its copy in data.cache_dir made
"""
from __future__ import annotations

import numpy as np
import torch

from raydistill.data import load_dataset
from raydistill.data.memory import InMemorySet, crop_pad_recipe
from raydistill.data.prefetch import Prefetcher, prefetched
from raydistill.data.prepared import open_prepared
from raydistill.data.views import batch_indices, device_batch_indices, num_steps, to_device
from raydistill.errors import ConfigError
from raydistill.methods.base import tensor_of
from raydistill.seeding import derive_seed

EVAL_BATCH = 512
PREPARED_OPTIONS = ("crop_size",)


def load_run_data(config):
    """(spec, the run's data set) for a resolved config: train, val (carved out of train) and test splits."""
    seed = derive_seed(config.seed, "val-split")
    if config.data.name == "prepared":
        for key, value in config.data.options.items():
            if key not in PREPARED_OPTIONS:
                raise ConfigError(f"data.{key}", value, f"options of prepared: {', '.join(PREPARED_OPTIONS)}")
        prepared = open_prepared(config.data.root, cache_dir=config.data.cache_dir, **config.data.options)
        data = prepared.with_view(config.data.crop_pad, config.data.flip, config.data.pad_mode)
        data = data.with_validation(config.data.val_fraction, seed)
    else:
        options = dict(config.data.options)
        if config.data.download:
            options["download"] = True
        dataset = load_dataset(config.data.name, config.data.root, **options)
        recipe = crop_pad_recipe(config.data.crop_pad, config.data.flip, config.data.pad_mode)
        data = InMemorySet.from_dataset(dataset, config.data.val_fraction, seed, recipe)
    if data.spec.task != config.task:
        raise ConfigError("task", config.task, f"must be {data.spec.task}: data set {config.data.name} is a "
                          f"{data.spec.task} task")
    return data.spec, data


def check_digest(config, data) -> None:
    """A run trains on one data set: a ``data.digest`` written in its config (a resumed run's) must be the set's."""
    recorded = config.data.digest
    if recorded is not None and recorded != data.digest:
        raise ConfigError("data.digest", recorded, f"the digest of the data set this run trained on; "
                          f"{config.data.name} at data.root={config.data.root} is now {data.digest} (another set, or "
                          "changed files: give the set the run trained on, or --set data.digest=null to go on "
                          "with this one)")


def eval_inputs(data, split: str, batch: int = EVAL_BATCH, device="cpu", count: int | None = None):
    """The evaluation views of a split (of its first ``count`` samples), batch by batch, as float tensors on a
    device, each batch read while the one before it is used."""
    n = data.num_samples(split) if count is None else min(count, data.num_samples(split))

    def load(start):
        return torch.from_numpy(data.read(split, np.arange(start, min(start + batch, n))))

    for x in prefetched(range(0, n, batch), load):
        yield data.eval_view(to_device(x, device))


def first_inputs(data, count: int = 2) -> torch.Tensor:
    """The evaluation views of the first training samples, on the CPU: a model's inputs, to try an architecture on.
    Zeros of the views' shape where the set is not on this node (a driver does not copy a set it does not train)."""
    if not data.local:
        return torch.zeros((count, *data.spec.input_shape))
    return next(eval_inputs(data, "train", count, count=count))


def describe_sources(data, nodes: list, sources: list) -> str:
    """The start-up line that says where each node reads a prepared set from: nodes and sources by worker."""
    by_node = {}
    for rank, (node, source) in enumerate(zip(nodes, sources)):
        by_node.setdefault((node, source), []).append(rank)
    where = "; ".join(f"node {str(node)[:12]} from {source} (worker{'s' if len(ranks) > 1 else ''} "
                      f"{', '.join(map(str, ranks))})" for (node, source), ranks in by_node.items())
    return f"data: {data.describe()}, {data.num_samples('train'):,} train samples read by index; {where}"


def _on_device(array, device) -> torch.Tensor:
    tensor = tensor_of(array)
    return tensor if tensor.device == torch.device(device) else to_device(tensor, device)


class DataView:
    """A worker's window on the run's data set, shared by its peers, teachers and coordinator replica: a step's
    batch read once for all of them (on each device they use), each peer's view of it, the labels, evaluation.

    Every process draws the same sample indices at a step from (seed, epoch[, replay]); a resident (in-memory) set's
    splits go to a device once and a step gathers there; a prepared set's step is read from its memory maps on a
    background thread while the step before it runs (pinned memory for a GPU). ``rows``: a slice of the step's
    batch (rows r*B/k..(r+1)*B/k of B): only those samples are read, and their views are those rows of the whole
    batch's views, bit for bit.
    """

    def __init__(self, config, data):
        self.config = config
        self.data = data
        self.seed = config.seed
        self.batch_size = config.train.batch_size
        self.steps_per_epoch = num_steps(data.num_samples("train"), self.batch_size)
        self._labels = {}               # (split, device) -> the split's labels there
        self._resident = {}             # (split, device) -> a resident set's split there
        self._step = (None, {})         # (the step's key, its inputs by device): read once per step
        self._reader = None             # a prepared set's background reader (made on the first step)
        self._pin = False               # a GPU reads from this view: host batches are pinned

    @classmethod
    def of(cls, config, data) -> "DataView":
        """``data`` itself where it is a DataView (a worker's, shared), else a view of its own over that set."""
        return data if isinstance(data, DataView) else cls(config, data)

    def num_samples(self, split: str) -> int:
        return self.data.num_samples(split)

    def split_labels(self, split: str) -> np.ndarray:
        return self.data.labels(split)

    # ---- a step's batch ----------------------------------------------------------------------------------------------
    def indices(self, epoch: int, step: int, replay: int = 0) -> torch.Tensor:
        """The step's sample indices (CPU); replay: how many times the run rolled back over this epoch
        (train.health)."""
        return batch_indices(self.seed, epoch, step, self.data.num_samples("train"), self.batch_size, replay)

    def _device_indices(self, epoch, step, replay, device, rows):
        idx = device_batch_indices(self.seed, epoch, step, self.data.num_samples("train"), self.batch_size, device,
                                   replay)
        return idx if rows is None else idx[rows]

    def labels(self, epoch: int, step: int, replay: int = 0, device="cpu", rows: slice | None = None):
        """The labels of the step's batch (of its ``rows``), on a device."""
        key = ("train", str(torch.device(device)))
        if key not in self._labels:
            self._labels[key] = _on_device(self.data.labels("train"), device)
        return self._labels[key][self._device_indices(epoch, step, replay, device, rows)]

    def inputs(self, epoch: int, step: int, replay: int = 0, device="cpu", rows: slice | None = None):
        """The step's batch (its ``rows``) as the set stores it (uint8 images or float features), on a device: read
        once for every member of the worker."""
        device = torch.device(device)
        key = (epoch, step, replay, None if rows is None else (rows.start, rows.stop))
        if self._step[0] != key:
            self._step = (key, {})
        read = self._step[1]                    # "host" (a prepared set's batch as read), and each device's copy
        if str(device) not in read:
            read[str(device)] = self._read(key, device, rows, read)
        return read[str(device)]

    def _read(self, key, device, rows, read: dict):
        epoch, step, replay, _ = key
        if self.data.resident:
            split_key = ("train", str(device))
            if split_key not in self._resident:
                self._resident[split_key] = _on_device(self.data.arrays("train"), device)
            return self._resident[split_key][self._device_indices(epoch, step, replay, device, rows)]
        if "host" not in read:
            self._pin = self._pin or device.type == "cuda"
            if self._reader is None:
                self._reader = Prefetcher(self._load)
            read["host"] = self._reader.get(key)
            self._reader.prefetch(self._next(key))           # the next step is read while this one runs
        return to_device(read["host"], device)

    def _load(self, key) -> torch.Tensor:
        """A step's inputs read on the host (pinned for a GPU): what the background reader runs."""
        epoch, step, replay, rows = key
        idx = self.indices(epoch, step, replay)
        if rows is not None:
            idx = idx[rows[0]:rows[1]]
        x = torch.from_numpy(self.data.read("train", idx.numpy()))
        return x.pin_memory() if self._pin else x

    def _next(self, key) -> tuple:
        epoch, step, replay, rows = key
        return (epoch, step + 1, replay, rows) if step + 1 < self.steps_per_epoch else (epoch + 1, 0, 0, rows)

    def view(self, epoch: int, step: int, view_index: int, replay: int = 0, device="cpu",
             rows: slice | None = None) -> torch.Tensor:
        """A peer's augmented view (``view_index``) of the step's batch (of its ``rows``), on a device."""
        x = self.inputs(epoch, step, replay, device, rows)
        batch = min(self.batch_size, self.data.num_samples("train"))
        return self.data.train_view(x, self.seed, epoch, step, view_index, replay, rows,
                                    batch if rows is not None else None)

    # ---- evaluation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: torch.nn.Module, split: str, device="cpu") -> np.ndarray:
        """A model's outputs on a split's evaluation views, in chunks, as a host array."""
        model.eval()
        if self.data.resident:
            key = (split, str(torch.device(device)))
            if key not in self._resident:
                self._resident[key] = _on_device(self.data.arrays(split), device)
            x = self._resident[key]
            batches = (self.data.eval_view(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH))
        else:
            batches = eval_inputs(self.data, split, EVAL_BATCH, device)
        chunks = [model(x).float().cpu() for x in batches]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0,), np.float32)

    def source(self) -> str:
        return self.data.source
