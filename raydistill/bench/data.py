"""The data path, measured: ``raydistill bench --data [IMAGES] [--data-size S] [--data-dir DIR]``.

On JPEGs generated at ImageNet's typical size (about 500 x 375, quality 90; 10 classes), in one run:
- images/s of a plain ``torchvision.datasets.ImageFolder`` + ``DataLoader`` (PIL decode, ``RandomResizedCrop(S)``,
  flip, ``ToTensor``, ``Normalize``; one worker process per core) against the prepared reader + views making the same
  batches (crops S x S, float, normalized) in one process: the next batch read on the background thread, and without
  it (read, then views); the reader alone and the views alone; and the same from the disk (the set's pages dropped
  from the page cache before each pass);
- the prepare itself on worker processes and on Ray tasks (a local Ray of as many CPUs);
- the memory of 1, 2 and 3 processes reading the whole prepared set: PSS (from /proc/PID/smaps_rollup, which shares
  each page out among the processes mapping it) in all and of the set's files alone, and RSS.
Passes after a first (warm-up) round: the JPEGs and the prepared set sit in the page cache, but where said.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 256
CLASSES = 10
VAL_PER_CLASS = 5
SEED = 0


# ---------------------------------------------------------------------------------------------------------------------
# the JPEGs


def _write_jpegs(task):
    """Photo-like JPEGs: a smooth random field (bicubic from a coarse grid) plus grain, ~500 x 375, quality 90."""
    from PIL import Image

    paths, seed = task
    rng = np.random.default_rng(seed)
    for path in paths:
        width, height = int(rng.integers(440, 501)), int(rng.integers(330, 376))
        if rng.random() < 0.2:                                      # some portrait images, as ImageNet has
            width, height = height, width
        coarse = rng.integers(0, 256, (height // 12 + 1, width // 12 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-24, 25, (height, width, 3), dtype=np.int16)
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate(folder: Path, images: int, workers: int) -> Path:
    """``folder/train/<class>/*.JPEG`` (``images`` of them) and a small ``val/``; kept when already there."""
    per_class = images // CLASSES
    paths = [folder / "train" / f"class{c:02d}" / f"{i:05d}.JPEG" for c in range(CLASSES) for i in range(per_class)]
    paths += [folder / "val" / f"class{c:02d}" / f"{i:05d}.JPEG" for c in range(CLASSES) for i in range(VAL_PER_CLASS)]
    missing = [p for p in paths if not p.is_file()]
    for path in missing:
        path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [([str(p) for p in missing[i:i + 64]], SEED + i) for i in range(0, len(missing), 64)]
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        pool.map(_write_jpegs, chunks)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# images/s


def reference_pass(train: Path, size: int, workers: int, mean, std):
    """ImageFolder + DataLoader: PIL decode, RandomResizedCrop, flip, ToTensor, Normalize, in worker processes. Returns
    a function that runs one pass over the set and returns the images it gave."""
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(train), transform=transform), batch_size=BATCH,
                                         shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True,
                                         generator=torch.Generator().manual_seed(SEED))

    def one_pass(epoch):
        return sum(len(x) for x, _ in loader)

    return one_pass


def evict(dest: Path) -> None:
    """Drops the set's pages from the page cache (posix_fadvise DONTNEED on its files; pages no process maps): the
    next pass reads from the disk. Only this set's files: nothing else on the machine is touched."""
    for path in Path(dest).glob("*.u8"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepared_passes(dest: Path, size: int) -> dict:
    """The prepared reader and the views on the same batches, one process, one torch thread (and the background
    reader's): overlapped, one after the other, the read alone and the views alone; from the page cache, and from
    the disk (the set's pages dropped first). Functions running one pass, returning the images they made."""
    import torch

    from raydistill.data.prefetch import host_batch, prefetched
    from raydistill.data.prepared import PreparedSet
    from raydistill.data.views import batch_indices, num_steps, random_resized_crop_view

    spec = PreparedSet(dest, crop_size=size).spec
    n = PreparedSet(dest).num_samples("train")
    steps = num_steps(n, BATCH)
    mean = torch.tensor(spec.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(spec.std).reshape(1, -1, 1, 1)

    def views(x, epoch, step):
        return random_resized_crop_view(x, SEED, epoch, step, 0, size).sub_(mean).div_(std)

    def make(kind: str, cold: bool):
        def one_pass(epoch):
            if cold:
                evict(dest)
            data = PreparedSet(dest, crop_size=size)           # opened for the pass: no page stays mapped after it

            def load(step):
                return host_batch(data, "train", batch_indices(SEED, epoch, step, n, BATCH))

            if kind == "overlapped":
                for step, (x, _) in enumerate(prefetched(range(steps), load)):
                    views(x, epoch, step)
            elif kind == "sequential":
                for step in range(steps):
                    views(load(step)[0], epoch, step)
            elif kind == "read":
                for step in range(steps):
                    load(step)
            else:
                batch = load(0)[0]
                for step in range(steps):
                    views(batch, epoch, step)
            return steps * BATCH

        return one_pass

    passes = {kind: make(kind, False) for kind in ("overlapped", "sequential", "read", "views")}
    passes.update({f"cold {kind}": make(kind, True) for kind in ("overlapped", "sequential", "read")})
    return passes


def interleaved_rates(passes: dict, repeats: int) -> dict:
    """images/s of each pass function, median over ``repeats`` rounds that run every function once in turn (a load
    that drifts during the run falls on every row alike); a first, untimed round starts workers and warms caches."""
    import torch

    timed = {name: [] for name in passes}
    for round_ in range(repeats + 1):
        for name, one_pass in passes.items():
            torch.set_num_threads(1)
            tic = time.perf_counter()
            images = one_pass(round_)
            if round_:
                timed[name].append(images / (time.perf_counter() - tic))
    return {name: statistics.median(rates) for name, rates in timed.items()}


TIMING_SHARD_BYTES = 8 << 20      # small shards for the prepare timing: a rate between shards, start-up aside


def prepare_rate(source: Path, dest: Path, size: int, workers: int, ray_tasks: bool) -> dict:
    """A prepare's images/s: in all (its start-up, workers importing their modules, included) and steady (from the
    first shard written to the last); and the seconds to start Ray, where it is used (not in either rate)."""
    from raydistill.data.prepare import Progress, prepare

    class Timing(Progress):
        def __init__(self):
            super().__init__(echo=lambda line: None)
            self.shards = []

        def shard(self, split, number, shards, count):
            super().shard(split, number, shards, count)
            self.shards.append((time.perf_counter(), count))

    started, tasks = 0.0, None
    if ray_tasks:
        from raydistill.data.prepare import run_task
        from raydistill.runtime.tasks import RayTasks

        tic = time.perf_counter()
        tasks = RayTasks(None, run_task, local_cpus=workers)
        started = time.perf_counter() - tic
    try:
        timing = Timing()
        tic = time.perf_counter()
        index = prepare(str(source), dest, size=size, workers=workers, tasks=tasks,
                        shard_bytes=TIMING_SHARD_BYTES, progress=timing)
        images = index["splits"]["train"]["count"] + index["splits"]["test"]["count"]
        (first, _), (last, _) = timing.shards[0], timing.shards[-1]
        steady = sum(count for _, count in timing.shards[1:]) / (last - first)
        return {"all": images / (time.perf_counter() - tic), "steady": steady, "ray_start": started}
    finally:
        if tasks is not None:
            tasks.close(True)


# ---------------------------------------------------------------------------------------------------------------------
# memory: readers of one set


def _memory_fields(path: str) -> dict:
    """kB fields of /proc/PID/smaps_rollup (or one mapping's block of smaps)."""
    fields = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def set_pss_kb(pid: int, dest: Path) -> int:
    """The PSS of the set's files in a process: its mappings of files under ``dest``, summed from /proc/PID/smaps."""
    total, counting = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:           # a mapping's first line: range, perms, ..., path
            counting = len(head) >= 6 and head[5].startswith(str(dest))
        elif counting and head and head[0] == "Pss:":
            total += int(head[1])
    return total


def _reader(dest: str, ready, measured, results):
    """One process reading the whole set, then reporting its memory while every reader still holds its maps."""
    from raydistill.data.prepared import PreparedSet

    data = PreparedSet(dest)
    n = data.num_samples("train")
    for start in range(0, n, BATCH):
        data.read("train", np.arange(start, min(start + BATCH, n)))
    ready.wait()
    rollup = _memory_fields("/proc/self/smaps_rollup")
    results.put({"pss": rollup["Pss"], "rss": rollup["Rss"], "set_pss": set_pss_kb(os.getpid(), Path(dest))})
    measured.wait()


def reader_memory(dest: Path, readers: int) -> list:
    context = multiprocessing.get_context("spawn")
    ready, measured, results = context.Barrier(readers), context.Barrier(readers), context.Queue()
    processes = [context.Process(target=_reader, args=(str(dest), ready, measured, results)) for _ in range(readers)]
    for process in processes:
        process.start()
    figures = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=600)
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# the run


def run_data(args, machine: str) -> int:
    """The bench's --data run; ``machine``: the bench's line about this machine."""
    from raydistill.data.layout import read_index
    from raydistill.data.prepared import PreparedSet
    from raydistill.errors import ConfigError

    images, size = args.data, args.data_size
    if images < 2 * BATCH:
        raise ConfigError("--data", images, f"an integer >= {2 * BATCH} (two batches of {BATCH})")
    if size < 8:
        raise ConfigError("--data-size", size, "an integer >= 8")
    workers = os.cpu_count()
    keep = args.data_dir is not None
    base = Path(args.data_dir) if keep else Path(tempfile.mkdtemp(prefix="raydistill-bench-data-"))
    try:
        source = generate(base / "jpegs", images, workers)
        jpeg_kb = np.mean([p.stat().st_size for p in (source / "train").rglob("*.JPEG")]) / 1024
        dest = base / f"prepared-{size}"
        scratch = base / "prepare-timing"
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        processes = prepare_rate(source, scratch / "processes", size, workers, ray_tasks=False)
        ray_tasks = prepare_rate(source, scratch / "ray", size, workers, ray_tasks=True)
        shutil.rmtree(scratch, ignore_errors=True)
        if not (dest / "index.json").is_file():
            from raydistill.data.prepare import Progress, prepare

            prepare(str(source), dest, size=size, workers=workers, progress=Progress(echo=lambda line: None))
        memory = {k: reader_memory(dest, k) for k in (1, 2, 3)}     # first: no other process maps the set
        spec = PreparedSet(dest).spec
        passes = {"reference": reference_pass(source / "train", size, workers, spec.mean, spec.std),
                  **prepared_passes(dest, size)}
        rates = interleaved_rates(passes, args.repeats)
        reference, ours = rates["reference"], rates
        set_mb = sum(s["bytes"] for s in read_index(dest)["splits"]["train"]["shards"]) / 2**20
    finally:
        if not keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    print(f"{machine}; {images:,} JPEGs (~500x375, quality 90, mean {jpeg_kb:.0f} KB), crops {size} x {size}, "
          f"batch {BATCH}, median of {args.repeats} rounds (each path one pass a round) after a warm-up round")
    print(f"{'path (from the page cache unless said)':<72}{'images/s':>10}{'ratio':>8}")
    rows = [(f"ImageFolder + DataLoader, {workers} worker processes (PIL decode, RandomResizedCrop, ...)", reference),
            ("prepared reader + views, 1 process, next batch read on a background thread", ours["overlapped"]),
            ("prepared reader + views, 1 process, read then views", ours["sequential"]),
            ("prepared reader alone (gather from the memory maps)", ours["read"]),
            ("views alone (RandomResizedCrop + flip + normalize)", ours["views"]),
            ("from the disk: prepared reader + views, next batch read ahead", ours["cold overlapped"]),
            ("from the disk: prepared reader + views, read then views", ours["cold sequential"]),
            ("from the disk: prepared reader alone", ours["cold read"])]
    for name, rate in rows:
        print(f"{name:<72}{rate:>10,.0f}{rate / reference:>8.2f}")
    print(f"prepare ({size} px, {images + CLASSES * VAL_PER_CLASS:,} images), images/s in all (start-up included) / "
          f"steady (between the first and the last of {TIMING_SHARD_BYTES >> 20} MiB shards):")
    print(f"  {workers} worker processes {processes['all']:,.0f} / {processes['steady']:,.0f}; Ray tasks on a local "
          f"Ray of {workers} CPUs {ray_tasks['all']:,.0f} / {ray_tasks['steady']:,.0f} (and {ray_tasks['ray_start']:.1f} "
          "s before, to start Ray)")
    print(f"memory of processes reading the whole train split ({set_mb:.0f} MiB) from /proc/PID/smaps_rollup:")
    print(f"{'readers':<9}{'PSS of the set per process':>28}{'sum over readers':>18}{'PSS per process':>17}"
          f"{'RSS per process':>17}")
    for readers, figures in memory.items():
        set_pss = [f["set_pss"] / 1024 for f in figures]
        print(f"{readers:<9}{statistics.mean(set_pss):>25.1f} MB{sum(set_pss):>15.1f} MB"
              f"{statistics.mean(f['pss'] for f in figures) / 1024:>14.1f} MB"
              f"{statistics.mean(f['rss'] for f in figures) / 1024:>14.1f} MB")
    return 0
