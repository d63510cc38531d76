"""The collective exchange: a group over a run's workers, one all-gather of the step's outputs per step. No Ray.

The group is a torch.distributed gloo group, formed once per run the way Ray Train forms its group: rank 0 names its
address and a free port, every worker calls ``init_process_group`` with it. A group cannot take back a restarted rank:
after a lost worker the driver closes it on every survivor and forms a new one on a new port.

The data path of a step's all-gather:
- workers on one node (the common case on CPU): shared memory. Each rank writes its flattened outputs into its slot
  of a double-buffered file in /dev/shm, then wakes every other rank through its named pipe; a rank reads the others'
  slots once it has heard from all of them. ~20 µs per step where a gloo all_gather over loopback TCP costs 0.7-1 ms
  between 2 processes on 2 cores and ~4 ms among 3 (gloo hands every message to its own threads). Two buffers by
  step parity suffice: a rank writes step s+2 only after every rank has written step s+1, which each does only after
  it has read step s.
- workers on several nodes, and workers on GPUs: an ``all_gather`` of tensors (padded to the longest, as the
  backends need equal sizes) over gloo for CPU workers and NCCL for GPU workers (one rank per GPU), the outputs never
  leaving the device: each rank flattens its members' outputs into one device buffer, and the other ranks' outputs
  are views of the gathered buffers.
Evaluation and set-up (each rank's output layout, learned once per kind of call) always go through gloo.

Each worker's outputs of a call are flattened into one float32 buffer, split back into arrays by the layouts. A rank's
own outputs are never copied back: only the other ranks' arrays are views of the gathered buffers.
"""
from __future__ import annotations

import datetime
import math
import mmap
import os
import select
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEP = "step"
SHM_ROOT = "/dev/shm"
LIVENESS_S = 1.0          # how often a rank waiting on shared memory checks that the others still live


class CollectiveError(RuntimeError):
    """A collective failed (a rank died, or did not answer within resources.collective_timeout_s)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _layout(local: list[dict]) -> list[list[tuple[str, tuple]]]:
    """Per member: (name, shape) of each output, in a fixed order."""
    return [[(name, tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(np.shape(value)))
             for name, value in sorted(outputs.items())] for outputs in local]


def _flatten_tensors(local: list[dict], size: int, device) -> torch.Tensor:
    """The members' outputs as one float32 buffer of ``size`` on the device (zero-padded)."""
    parts = [torch.as_tensor(outputs[name]).to(device=device, dtype=torch.float32).reshape(-1)
             for outputs in local for name in sorted(outputs)]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32, device=device)
    return torch.nn.functional.pad(flat, (0, size - flat.numel())) if flat.numel() < size else flat


def _size(layout: list) -> int:
    return sum(math.prod(shape) for member in layout for _, shape in member)


def _flatten(local: list[dict], out: np.ndarray) -> None:
    offset = 0
    for outputs in local:
        for name in sorted(outputs):
            value = np.asarray(outputs[name], dtype=np.float32).reshape(-1)
            out[offset:offset + value.size] = value
            offset += value.size


def _split(flat: np.ndarray, layout: list) -> list[dict]:
    members, offset = [], 0
    for member in layout:
        outputs = {}
        for name, shape in member:
            size = math.prod(shape)
            outputs[name] = flat[offset:offset + size].reshape(shape)
            offset += size
        members.append(outputs)
    return members


def _remove_stale(root: str) -> None:
    """Folders of groups whose creating process is gone (it was killed before it could remove them)."""
    for folder in Path(root).glob("raydistill-*-*"):
        try:
            pid = int(folder.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


class SharedMemoryChannel:
    """The step all-gather of ranks on one node: slots in a shared file, named pipes to say a slot is written."""

    def __init__(self, rank: int, world: int, folder: str, pids: list[int], timeout_s: float):
        self.rank, self.world, self.folder, self.pids, self.timeout_s = rank, world, Path(folder), pids, timeout_s
        self.own = os.open(self.folder / f"pipe{rank}", os.O_RDWR | os.O_NONBLOCK)
        self.others = [os.open(self.folder / f"pipe{r}", os.O_RDWR) for r in range(world) if r != rank]
        self.slots = None
        self.count = 0

    @staticmethod
    def create_pipe(folder: str, rank: int) -> None:
        os.mkfifo(Path(folder) / f"pipe{rank}")

    @staticmethod
    def create_buffer(folder: str, world: int, longest: int) -> None:
        with open(Path(folder) / "step.buf", "wb") as f:
            f.truncate(2 * world * max(longest, 1) * 4)

    def map_buffer(self, longest: int) -> None:
        with open(self.folder / "step.buf", "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self.slots = np.ndarray((2, self.world, max(longest, 1)), np.float32, buffer=self._map)

    def all_gather(self, local: list[dict], size: int) -> np.ndarray:
        """Every rank's slot of this step, [world, longest] (views of the shared buffer)."""
        parity = self.count % 2
        self.count += 1
        _flatten(local, self.slots[parity, self.rank, :size])
        for fd in self.others:
            os.write(fd, b"s")
        self._wait(self.world - 1)
        return self.slots[parity]

    def _wait(self, signals: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while signals:
            ready, _, _ = select.select([self.own], [], [], LIVENESS_S)
            if ready:
                try:
                    signals -= len(os.read(self.own, signals))
                except BlockingIOError:
                    pass
                continue
            for pid in self.pids:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    raise CollectiveError(f"rank {self.rank}: the worker process {pid} is gone") from None
            if time.monotonic() > deadline:
                raise CollectiveError(f"rank {self.rank}: no answer within resources.collective_timeout_s="
                                      f"{self.timeout_s:g}")

    def close(self) -> None:
        for fd in [self.own, *self.others]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.slots = None
        if getattr(self, "_map", None) is not None:
            try:
                self._map.close()
            except BufferError:             # a view still alive somewhere: the mapping goes with the process
                pass


class GroupExchange:
    """gather(tag, local outputs) -> every member's outputs (member order = rank order), over a group of workers."""

    def __init__(self, rank: int, world: int, address: str, port: int, timeout_s: float, one_node: bool,
                 device: str = "cpu", peer_groups: dict | None = None):
        """device: where the rank's outputs live; on a GPU the step's all-gather goes through NCCL (gloo stays for
        evaluation, set-up and CPU tensors), never through the host. peer_groups: peer index -> the group ranks of
        a peer of several ranks (engine/grid.py), each formed as a group of its own for its gradients."""
        self.rank, self.world = rank, world
        self.peer_groups = {}
        self.device = torch.device(device)
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
            self.layouts: dict[str, list] = {}        # tag -> every rank's member layout
            self.channel = self._shared_memory(timeout_s) if one_node and self.device.type == "cpu" else None
            for peer, ranks in sorted((peer_groups or {}).items()):     # every rank forms every group, in order
                group = dist.new_group(ranks=list(ranks), timeout=datetime.timedelta(seconds=timeout_s))
                if rank in ranks:
                    self.peer_groups[peer] = (group, list(ranks))
        except (RuntimeError, ValueError, OSError) as err:
            raise CollectiveError(f"rank {rank} could not join the group at {address}:{port} ({err})") from err

    def _shared_memory(self, timeout_s: float) -> SharedMemoryChannel | None:
        """The one-node data path, set up through the gloo group (None where there is no /dev/shm)."""
        folder = [None]
        if self.rank == 0 and os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK):
            _remove_stale(SHM_ROOT)
            folder = [tempfile.mkdtemp(prefix=f"raydistill-{os.getpid()}-", dir=SHM_ROOT)]
        dist.broadcast_object_list(folder, src=0)
        if folder[0] is None:
            return None
        SharedMemoryChannel.create_pipe(folder[0], self.rank)
        pids = [None] * self.world
        dist.all_gather_object(pids, os.getpid())
        return SharedMemoryChannel(self.rank, self.world, folder[0], [p for p in pids if p != os.getpid()],
                                   timeout_s)

    def _rank_layouts(self, tag: str, local: list[dict]) -> list:
        if tag not in self.layouts:
            found = [None] * self.world
            dist.all_gather_object(found, _layout(local))
            self.layouts[tag] = found
            if tag == STEP and self.channel is not None:
                longest = max(_size(layout) for layout in found)
                if self.rank == 0:
                    SharedMemoryChannel.create_buffer(str(self.channel.folder), self.world, longest)
                dist.barrier()
                self.channel.map_buffer(longest)
        return self.layouts[tag]

    @property
    def carries_tensors(self) -> bool:
        """Whether the step's exchange takes the outputs as tensors where they lie (else as host arrays)."""
        return self.channel is None

    def gather(self, tag: str, local: list[dict]) -> list[dict]:
        try:
            layouts = self._rank_layouts(tag, local)
            sizes = [_size(layout) for layout in layouts]
            if tag == STEP and self.channel is not None:
                received = self.channel.all_gather(local, sizes[self.rank])
            else:       # the step's outputs where they lie (NCCL on GPUs); evaluation and weights on the host
                send = _flatten_tensors(local, max(sizes), self.device if tag == STEP else "cpu")
                received = [torch.empty_like(send) for _ in range(self.world)]
                dist.all_gather(received, send)
                if tag != STEP:
                    received = [b.numpy() for b in received]
        except (RuntimeError, ValueError, OSError) as err:
            if isinstance(err, CollectiveError):
                raise
            raise CollectiveError(f"the {tag} exchange failed on rank {self.rank} ({err})") from err
        members = []
        for rank, layout in enumerate(layouts):
            # a rank's own outputs as they are; the others' as views of what was gathered
            members.extend(local if rank == self.rank else _split(received[rank], layout))
        return members

    def gather_peer(self, peer: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` of a peer of several ranks, in rank order (its gradients: engine/grid.py sums
        them in that order), over the peer's own group (gloo on CPUs, NCCL on GPUs)."""
        group, ranks = self.peer_groups[peer]
        try:
            received = [torch.empty_like(tensor) for _ in ranks]
            dist.all_gather(received, tensor, group=group)
        except (RuntimeError, ValueError, OSError) as err:
            raise CollectiveError(f"the gradients of peer {peer} could not be gathered on rank {self.rank} "
                                  f"({err})") from err
        return received

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            if self.rank == 0:
                shutil.rmtree(self.channel.folder, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()
