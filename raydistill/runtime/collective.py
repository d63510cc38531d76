"""The collective exchange: a torch.distributed group over a run's workers, one all_gather per step. No Ray.

Formed once per run the way Ray Train forms its group: rank 0 names its address and a free port, every worker calls
``init_process_group`` with it (gloo for CPU tensors). A group cannot take back a restarted rank: after a lost worker
the driver closes it on every survivor and forms a new one on a new port.

Each worker's outputs of a step are flattened into one float32 buffer; the buffers of all ranks are gathered with one
``all_gather`` (padded to the longest, as gloo needs equal sizes) and split back into arrays by a layout that every
rank learns once per kind of call (``tag``: the step, an evaluation split) with one ``all_gather_object``. A rank's
own outputs are never copied back: only the other ranks' arrays are views of the gathered buffers.
"""
from __future__ import annotations

import datetime
import math
import socket

import numpy as np
import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed (a rank died, or did not answer within resources.collective_timeout_s)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _layout(local: list[dict]) -> list[list[tuple[str, tuple]]]:
    """Per member: (name, shape) of each output, in a fixed order."""
    return [[(name, tuple(np.shape(value))) for name, value in sorted(outputs.items())] for outputs in local]


class GlooExchange:
    """gather(tag, local outputs) -> every member's outputs, over a gloo group of ``world`` workers."""

    def __init__(self, rank: int, world: int, address: str, port: int, timeout_s: float):
        self.rank, self.world = rank, world
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:
            raise CollectiveError(f"rank {rank} could not join the group at {address}:{port} ({err})") from err
        self.layouts: dict[str, list] = {}        # tag -> every rank's member layout

    def _rank_layouts(self, tag: str, local: list[dict]) -> list:
        if tag not in self.layouts:
            found = [None] * self.world
            dist.all_gather_object(found, _layout(local))
            self.layouts[tag] = found
        return self.layouts[tag]

    def gather(self, tag: str, local: list[dict]) -> list[dict]:
        try:
            layouts = self._rank_layouts(tag, local)
            sizes = [sum(math.prod(shape) for member in layout for _, shape in member) for layout in layouts]
            longest = max(sizes)
            parts = [torch.from_numpy(np.ascontiguousarray(outputs[name], dtype=np.float32)).reshape(-1)
                     for outputs in local for name in sorted(outputs)]
            send = torch.zeros(longest, dtype=torch.float32)
            if parts:
                torch.cat(parts, out=send[:sizes[self.rank]])
            received = [torch.empty(longest, dtype=torch.float32) for _ in range(self.world)]
            dist.all_gather(received, send)
        except (RuntimeError, ValueError) as err:
            raise CollectiveError(f"the {tag} exchange failed on rank {self.rank} ({err})") from err
        members = []
        for rank, layout in enumerate(layouts):
            if rank == self.rank:
                members.extend(local)
                continue
            flat, offset = received[rank].numpy(), 0
            for member in layout:
                outputs = {}
                for name, shape in member:
                    size = math.prod(shape)
                    outputs[name] = flat[offset:offset + size].reshape(shape)
                    offset += size
                members.append(outputs)
        return members

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
