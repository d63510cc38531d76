"""The next step's batch read on a background thread while the current step runs.

Reading a batch of a prepared set is a gather from memory maps (page-cache copies, or disk reads on a cold cache),
during which numpy releases the GIL; a step's compute runs in torch, which releases it too: on one background thread
the read of step k + 1 overlaps step k. On a GPU the batch is pinned on that thread, so that its copy to the device
does not wait for the device (``non_blocking``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def host_batch(prepared, split: str, indices, device=None):
    """(uint8 images, int64 labels) of ``indices`` as host tensors, pinned when they go to a GPU."""
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    x = torch.from_numpy(prepared.read(split, indices))
    y = torch.from_numpy(prepared.labels(split, indices))
    if device is not None and torch.device(device).type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def to_device(batch, device=None):
    """A host batch on ``device``: asynchronously from pinned memory to a GPU; unchanged on a CPU."""
    if device is None or torch.device(device).type != "cuda":
        return batch
    return tuple(t.to(device, non_blocking=True) for t in batch)


class Prefetcher:
    """``get(key)`` returns ``load(key)`` on ``device``; ``prefetch(key)`` starts loading a key on the background
    thread, so that a later ``get`` of it finds it read. ``load`` returns host tensors (``host_batch``).

    A training loop asks for step k and announces step k + 1::

        batch = prefetcher.get(step)
        prefetcher.prefetch(step + 1)
        ... step k runs while step k + 1 is read ...
    """

    def __init__(self, load, device=None):
        self._load = load
        self._device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending = {}

    def prefetch(self, key) -> None:
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._load, key)

    def get(self, key):
        future = self._pending.pop(key, None)
        batch = future.result() if future is not None else self._load(key)
        for stale in [k for k in self._pending if k != key]:   # a jump (rollback, new epoch) drops the rest
            self._pending.pop(stale).cancel()
        return to_device(batch, self._device)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prefetched(keys, load, device=None):
    """``load(key)`` for each key in order, on ``device``, each read while the one before it is used."""
    keys = list(keys)
    with Prefetcher(load, device) as prefetcher:
        for i, key in enumerate(keys):
            batch = prefetcher.get(key)
            if i + 1 < len(keys):
                prefetcher.prefetch(keys[i + 1])
            yield batch
