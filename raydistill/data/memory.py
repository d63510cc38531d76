"""A data set held whole in memory (the arrays a source loads: digits, CIFAR, tabular, synthetic...), read by index
as a prepared set is read (data/prepared.py): the two kinds of set a run trains on, behind one interface.

The arrays travel through Ray's object store as they are (numpy arrays inside an object are shared zero-copy by the
processes of a node), and a worker copies each split to its device once, for all of its peers and teachers.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from raydistill.data.sources import Dataset, DataSpec
from raydistill.data.views import CROP_PAD, eval_view, train_view

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("x", "y"))


def crop_pad_recipe(crop_pad: int, flip: bool, pad_mode: str = "zeros") -> dict:
    return {"kind": CROP_PAD, "crop_pad": crop_pad, "flip": flip, "pad_mode": pad_mode}


def arrays_digest(spec: DataSpec, arrays: dict) -> str:
    """blake2b (16 bytes, hex) of a set's spec and of every array's dtype, shape and bytes, in key order."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((spec.task, tuple(spec.input_shape), spec.num_classes, tuple(spec.mean),
                        tuple(spec.std))).encode())
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class InMemorySet(Mapping):
    """The train, val and test arrays of a run, whole in memory: ``read(split, indices)`` gathers samples,
    ``labels(split)`` gives the labels, the views are crop-with-padding + flip (``recipe``). As a mapping it is the
    arrays by name (``train_x`` ... ``test_y``), as the runtime first passed them around."""

    resident = True                   # whole in memory: a worker may hold each split on its device
    local = True                      # its samples are read here without copying anything
    source = "memory"

    def __init__(self, spec: DataSpec, arrays: dict, recipe: dict, name: str = "", digest: str | None = None):
        """digest: the set's own (before validation was carved out of train); None: of these arrays."""
        self.spec = spec
        self._arrays = {key: arrays[key] for key in KEYS}
        self.recipe = recipe
        self.name = name
        self._digest = digest

    @classmethod
    def from_dataset(cls, dataset: Dataset, val_fraction: float, seed: int, recipe: dict) -> "InMemorySet":
        """A loaded source with ``val_fraction`` of its train set carved out as validation
        (``Dataset.split_validation``)."""
        rest, val_x, val_y = dataset.split_validation(val_fraction, seed)
        arrays = {"train_x": rest.train_x, "train_y": rest.train_y, "val_x": val_x, "val_y": val_y,
                  "test_x": dataset.test_x, "test_y": dataset.test_y}
        return cls(dataset.spec, arrays, recipe, dataset.name, arrays_digest(dataset.spec, dataset.arrays()))

    # -- what the set is ------------------------------------------------------------------------------------------

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = arrays_digest(self.spec, self._arrays)
        return self._digest

    @property
    def splits(self) -> tuple:
        return SPLITS

    def num_samples(self, split: str) -> int:
        return len(self._arrays[f"{split}_y"])

    def describe(self) -> str:
        return f"{self.name or 'a data set'} in memory"

    def on_node(self) -> "InMemorySet":
        """Itself: its arrays came with it."""
        return self

    # -- reading ----------------------------------------------------------------------------------------------------

    def labels(self, split: str, indices=None) -> np.ndarray:
        labels = self._arrays[f"{split}_y"]
        return labels if indices is None else labels[np.asarray(indices, dtype=np.int64)]

    def read(self, split: str, indices) -> np.ndarray:
        """The inputs at ``indices`` of ``split`` (uint8 images or float features), a copy."""
        return self._arrays[f"{split}_x"][np.asarray(indices, dtype=np.int64).reshape(-1)]

    def arrays(self, split: str) -> np.ndarray:
        """The whole split's inputs, without a copy."""
        return self._arrays[f"{split}_x"]

    # -- views ------------------------------------------------------------------------------------------------------

    def train_view(self, x, seed: int, epoch: int, step: int, view_index: int, replay: int = 0, rows=None,
                   batch_size=None):
        return train_view(self.recipe, x, seed, epoch, step, view_index, replay, rows, batch_size)

    def eval_view(self, x):
        return eval_view(self.recipe, x)

    # -- the arrays by name -----------------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)
