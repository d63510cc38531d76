"""A teacher's outputs computed once per view seed and streamed from Parquet files (``teacher.cache: true``).

Every view a student trains on is fixed by (seed, epoch, step, view index), so a frozen teacher's outputs for a whole
epoch can be computed once and read back instead of running the teacher every step: by every student of a run, by a
resumed run, and by the next run with the same teacher and data. One file per epoch,
``<folder>/epoch_NNNN.parquet``, one row per step; each output (``logits``, ``features``) is a column of fixed-size
float32 lists holding that step's [V, B, ...] array. The file's metadata holds its key (teacher weights, data,
views); a file with another key is recomputed, never read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from raydistill.engine.step import host_outputs

KEY_FIELD = b"raydistill.teacher_cache.key"
SHAPES_FIELD = b"raydistill.teacher_cache.shapes"


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of a model's state (names and bytes): the cache belongs to these weights only."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher) -> dict:
    """What a teacher's outputs depend on: its weights, the data, the batches and the views (``teacher`` is an
    engine Teacher)."""
    config = teacher.config
    return {"weights": weights_digest(teacher.model), "data": config.data.name, "seed": config.seed,
            "train_samples": int(teacher.data.num_samples("train")), "batch_size": config.train.batch_size,
            "crop_pad": config.data.crop_pad, "flip": config.data.flip, "pad_mode": config.data.pad_mode,
            "views": list(teacher.views),
            "outputs": list(getattr(teacher, "output_names", ["logits"])),
            "hint_layer": teacher.hint.path if getattr(teacher, "hint", None) is not None else None,
            **attention_key(teacher), **prepared_key(teacher)}


def prepared_key(teacher) -> dict:
    """A prepared set's digest and views: two prepared sets share the name ``prepared`` (an in-memory set's key
    stays as it was, so the caches written before prepared sets existed stay valid)."""
    data = teacher.data.data
    return {} if data.resident else {"data_digest": data.digest, "recipe": data.recipe}


def attention_key(teacher) -> dict:
    """The layers of a teacher's attention-transfer outputs, where it has some (a key without them stays as it was,
    so the caches written before attention pairs existed stay valid)."""
    paths = list(getattr(getattr(teacher, "hint", None), "attention_paths", []))
    return {"attention_layers": paths} if paths else {}


def write_epoch(path: Path, key: dict, steps: list[dict[str, np.ndarray]]) -> None:
    """Writes one epoch's outputs (a dict of arrays per step, the same shapes at every step) atomically."""
    import pyarrow as pa                # here, not at the top: a worker without a cached teacher never loads Arrow
    import pyarrow.parquet as pq

    names = sorted(steps[0])
    shapes = {name: list(steps[0][name].shape) for name in names}
    columns = {"step": pa.array(np.arange(len(steps), dtype=np.int32))}
    for name in names:
        flat = np.stack([np.ascontiguousarray(step[name], dtype=np.float32) for step in steps]).reshape(len(steps), -1)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    metadata = {KEY_FIELD: json.dumps(key, sort_keys=True).encode(), SHAPES_FIELD: json.dumps(shapes).encode()}
    table = pa.table(columns).replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)   # readers see a whole file or none


def read_key(path: Path) -> dict | None:
    """The key stored in a cache file, or None when there is no readable file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(metadata[KEY_FIELD]) if KEY_FIELD in metadata else None


def read_epoch(path: Path) -> dict[str, np.ndarray]:
    """One epoch's outputs: name -> [steps, V, B, ...] float32 (memory-mapped, read-only)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, memory_map=True)
    shapes = json.loads(table.schema.metadata[SHAPES_FIELD])
    outputs = {}
    for name, shape in shapes.items():
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        outputs[name] = values.reshape(table.num_rows, *shape)
    return outputs


class CachedTeacher:
    """A teacher whose ``forward(epoch, step)`` reads its outputs from the cache, computing an epoch's file with the
    live teacher the first time that epoch is asked for. Same interface as the engine's Teacher."""

    def __init__(self, teacher, folder):
        self.teacher = teacher
        self.folder = Path(folder)
        self.key = cache_key(teacher)
        self.computed_epochs: list[int] = []     # epochs this object ran the teacher for (the rest were read)
        self._epoch = None
        self._outputs = None

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:04d}.parquet"

    def precompute(self, epochs) -> None:
        """Fills the files of ``epochs`` that are missing or stale."""
        for epoch in epochs:
            if read_key(self.path(epoch)) != self.key:
                self._compute(epoch)

    def _compute(self, epoch: int) -> None:
        live = getattr(self.teacher, "live_forward", self.teacher.forward)   # a Teacher that owns its cache
        steps = [host_outputs(live(epoch, step)) for step in range(self.teacher.data.steps_per_epoch)]
        write_epoch(self.path(epoch), self.key, steps)
        self.computed_epochs.append(epoch)

    def forward(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """The teacher's outputs for the views of this step, as the live teacher returns them."""
        if self._epoch != epoch:
            self.precompute([epoch])
            self._outputs, self._epoch = read_epoch(self.path(epoch)), epoch
        return {name: values[step] for name, values in self._outputs.items()}

    def evaluate(self, split: str) -> np.ndarray:
        return self.teacher.evaluate(split)

    def __getattr__(self, name):
        # the rest of the Teacher interface (index, config, device, model...) is the live teacher's
        if name == "teacher":
            raise AttributeError(name)
        return getattr(self.teacher, name)
