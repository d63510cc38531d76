"""``raydistill data prepare SOURCE DEST``: an image data set decoded once into a prepared set (prepared.py has its
layout).

SOURCE is an image folder (ImageNet's ``train/<class>/*.JPEG`` with ``val/`` as class folders or flat with a labels
file, TinyImageNet, any ``imagefolder``) or the name of a source the project reads (``cifar10``, ``cifar100``,
``digits``, ``synthetic``), whose order, pixels and labels are kept as they are.

- Images are decoded on every core: a pool of worker processes (or Ray tasks on a cluster's nodes with ``--address``),
  each given a chunk of files; the writer takes the chunks back in order, so the files do not depend on the workers.
- A split is written as shards of about ``shard_bytes``; a shard is written to a temporary name and renamed when
  whole, and recorded in ``DEST/.partial/``. An interrupted prepare run again resumes at the first shard not recorded,
  and ends with the very files an uninterrupted one writes (the plan of a prepare, fixed before the first image, is
  checked: another source or size is refused, not mixed in).
- A file that is not an image (by its suffix) or that PIL cannot read (truncated, damaged) is skipped, named in the
  output as it is met, counted, and listed in the index with its reason: one bad file must not stop hours of
  decoding, and the index says exactly which samples the set holds.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydistill.data.layout import (CHECKSUM, FORMAT, INDEX, SIDE_FILES, SPLITS, VERSION, file_checksum, read_index,
                                    set_digest, shard_name, side_name, verify)
from raydistill.data.sources import (channel_histogram, dataset_names, default_augment,
                                     histogram_stats, list_image_folder, load_dataset)
from raydistill.data.views import RRC_RATIO, RRC_SCALE
from raydistill.errors import ConfigError

DEFAULT_SIZE = 128             # an image folder's default side: ImageNet's 1.28M images take ~63 GB
MIN_SIZE = 8                   # the smallest side views are cut from (digits' 8 x 8)
SHARD_BYTES = 1 << 30          # about 1 GiB a file
CHUNK = 32                     # files a worker decodes per task
PARTIAL = ".partial"           # DEST's folder of an unfinished prepare: its plan, progress and finished shards' records
ARRAY_SOURCES = ("cifar10", "cifar100", "digits", "synthetic")   # sources read whole into uint8 image arrays


# ---------------------------------------------------------------------------------------------------------------------
# what is read: an image folder, or a source's arrays


def decode_files(paths: list, size: int):
    """Decode image files to RGB uint8 [n_read, 3, size, size] (whole image resized, bilinear), with each one's
    (height, width) before resizing and a reason for each file that could not be read (None where it was)."""
    from PIL import Image

    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    sizes = np.zeros((len(paths), 2), dtype=np.int32)
    reasons = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                sizes[i] = image.height, image.width
                image.draft("RGB", (size, size))        # a JPEG decodes at 1/2, 1/4 or 1/8 scale where still >= S
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                images[i] = np.asarray(image).transpose(2, 0, 1)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            message = str(err).replace(str(path), Path(path).name)     # the index names files relative to SOURCE
            reasons[i] = f"unreadable ({type(err).__name__}: {message})"
    read = [i for i, reason in enumerate(reasons) if reason is None]
    return images[read], sizes[read], reasons


def resize_arrays(images: np.ndarray, size: int):
    """uint8 [n, C, h, w] (C 1 or 3) resized to [n, C, size, size] (bilinear, PIL) where their size differs."""
    sizes = np.tile(np.asarray(images.shape[2:], dtype=np.int32), (len(images), 1))
    if images.shape[2:] == (size, size):
        return np.ascontiguousarray(images), sizes, [None] * len(images)
    from PIL import Image

    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        resized = np.asarray(pil.resize((size, size), Image.BILINEAR))
        out[i] = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
    return out, sizes, [None] * len(images)


def run_task(task):
    """A worker's task: ``(function, arguments)``."""
    function, arguments = task
    return function(*arguments)


@dataclass
class FolderSource:
    """An image folder: samples in sorted order of class, then file; decoded by the workers."""

    root: Path
    val_labels: str | None = None
    in_memory = False

    def __post_init__(self):
        self.root = Path(self.root)
        listing = list_image_folder(self.root, field="SOURCE", val_labels=self.val_labels)
        self.classes = listing.classes
        self.samples = {"train": listing.train, "test": listing.test}
        self.others = [(self._name(path), reason) for path, reason in listing.others]
        self.channels = 3
        self.view = {"kind": "random_resized_crop", "scale": list(RRC_SCALE), "ratio": list(RRC_RATIO), "flip": True}
        self.stats = None                                  # computed from the stored train pixels

    def display(self) -> str:
        return self.root.name

    def default_size(self) -> int:
        return DEFAULT_SIZE

    def count(self, split: str) -> int:
        return len(self.samples[split])

    def labels(self, split: str, start: int, stop: int) -> np.ndarray:
        return np.asarray([label for _, label in self.samples[split][start:stop]], dtype=np.int64)

    def names(self, split: str, start: int, stop: int) -> list:
        return [self._name(path) for path, _ in self.samples[split][start:stop]]

    def task(self, split: str, start: int, stop: int, size: int):
        return decode_files, ([str(path) for path, _ in self.samples[split][start:stop]], size)

    def fingerprint(self) -> str:
        """What the folder holds: every sample's name, label and byte count (a file replaced by another of another
        size, or a file added, makes another plan)."""
        digest = hashlib.blake2b(digest_size=16)
        for split in SPLITS:
            for path, label in self.samples[split]:
                digest.update(f"{split}\t{self._name(path)}\t{label}\t{path.stat().st_size}\n".encode())
        return digest.hexdigest()

    def _name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass
class ArraySource:
    """A source the project reads (cifar10, digits, ...): its arrays in its own order, resized in this process."""

    name: str
    root: str | None = None
    download: bool = False
    in_memory = True

    def __post_init__(self):
        options = {"download": True} if self.download else {}
        dataset = load_dataset(self.name, self.root, **options)
        train_x = dataset.train_x
        if train_x.dtype != np.uint8 or train_x.ndim != 4 or train_x.shape[1] not in (1, 3):
            raise ConfigError("SOURCE", self.name, "an image data set (uint8 images with 1 or 3 channels)")
        self.arrays = {"train": (train_x, dataset.train_y), "test": (dataset.test_x, dataset.test_y)}
        self.classes = [str(c) for c in range(dataset.spec.num_classes)]
        self.channels = int(train_x.shape[1])
        self.others = []
        augment = default_augment(self.name)
        self.view = {"kind": "crop_pad", "crop_pad": augment["crop_pad"], "flip": augment["flip"], "pad_mode": "zeros"}
        self.stats = (list(dataset.spec.mean), list(dataset.spec.std))    # the source's own: the same model input
        self._fingerprint = hashlib.blake2b(digest_size=16)
        for split in SPLITS:
            x, y = self.arrays[split]
            self._fingerprint.update(np.ascontiguousarray(x).data)
            self._fingerprint.update(np.ascontiguousarray(y.astype(np.int64)).data)

    def display(self) -> str:
        return self.name

    def default_size(self) -> int:
        return int(max(self.arrays["train"][0].shape[2:]))

    def count(self, split: str) -> int:
        return len(self.arrays[split][1])

    def labels(self, split: str, start: int, stop: int) -> np.ndarray:
        return self.arrays[split][1][start:stop].astype(np.int64)

    def names(self, split: str, start: int, stop: int) -> list:
        return [f"{self.name}:{split}[{i}]" for i in range(start, stop)]

    def task(self, split: str, start: int, stop: int, size: int):
        return resize_arrays, (self.arrays[split][0][start:stop], size)

    def fingerprint(self) -> str:
        return self._fingerprint.hexdigest()


def parse_view(view: str | None, source) -> dict:
    """``--view``: ``random-resized-crop`` (ImageNet-style) or ``crop-pad=N`` (CIFAR-style: pad N, crop back, flip);
    None: the source's own (a folder: random-resized-crop; a source name: its usual crop and flip)."""
    if view is None:
        return source.view
    if view == "random-resized-crop":
        return {"kind": "random_resized_crop", "scale": list(RRC_SCALE), "ratio": list(RRC_RATIO), "flip": True}
    kind, _, pad = view.partition("=")
    if kind == "crop-pad" and pad.isdigit():
        return {"kind": "crop_pad", "crop_pad": int(pad), "flip": True, "pad_mode": "zeros"}
    raise ConfigError("--view", view, "random-resized-crop or crop-pad=N (N pixels of padding)")


def open_source(source: str, root=None, download: bool = False, val_labels=None):
    """SOURCE as a source name (``cifar10``...) or an image folder."""
    if source in ARRAY_SOURCES:
        return ArraySource(source, root, download)
    if root is not None or download:
        raise ConfigError("--root", root, f"only with a source name ({', '.join(ARRAY_SOURCES)}); SOURCE {source!r} "
                                          "is read as a folder")
    if source in dataset_names() and not Path(source).is_dir():
        raise ConfigError("SOURCE", source, f"an image folder, or one of: {', '.join(ARRAY_SOURCES)} (data set "
                                            f"{source} has no images to prepare)")
    return FolderSource(Path(source), val_labels)


# ---------------------------------------------------------------------------------------------------------------------
# where the work runs


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the writer's to handle: workers are terminated


class ProcessPool:
    """Worker processes on this machine, results in task order. The fork server starts from a clean process (no
    threads of the caller's), and imports this module once for every worker it forks."""

    def __init__(self, workers: int):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self.workers = workers
        self._pool = context.Pool(workers, initializer=_ignore_sigint)

    def describe(self) -> str:
        return f"{self.workers} worker process{'es' if self.workers != 1 else ''}"

    def imap(self, tasks):
        return self._pool.imap(run_task, tasks)

    def close(self, finished: bool) -> None:
        if finished:
            self._pool.close()
        else:
            self._pool.terminate()
        self._pool.join()


class InProcess:
    """Tasks run here, in order: a source already in memory gains nothing from being sent to workers."""

    def describe(self) -> str:
        return "this process (the source is in memory)"

    def imap(self, tasks):
        return map(run_task, tasks)

    def close(self, finished: bool) -> None:
        pass


def executor(source, workers: int | None, tasks=None):
    """Where the decoding runs: here (a source in memory), the given ``tasks`` (runtime/tasks.py's Ray tasks on a
    cluster: anything with ``imap(tasks)``, ``describe()`` and ``close(finished)``), or local worker processes (one
    per core unless ``workers`` says)."""
    if source.in_memory:
        return InProcess()
    if tasks is not None:
        return tasks
    return ProcessPool(workers or os.cpu_count())


# ---------------------------------------------------------------------------------------------------------------------
# the prepare


def _positive(flag: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(flag, value, f"an integer >= {minimum}")
    return value


def _write_json(path: Path, content) -> None:
    """Written whole or not at all: a temporary file renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, sort_keys=True, indent=1) + "\n")
    os.replace(temporary, path)


def _plan(source, size: int, shard_bytes: int, view: dict) -> dict:
    sample_bytes = source.channels * size * size
    return {"format": FORMAT, "version": VERSION, "source": source.display(), "fingerprint": source.fingerprint(),
            "size": size, "channels": source.channels, "classes": source.classes, "view": view,
            "counts": {split: source.count(split) for split in SPLITS},
            "shard_samples": max(1, shard_bytes // sample_bytes)}


def _plan_digest(plan: dict) -> str:
    return hashlib.blake2b(json.dumps(plan, sort_keys=True).encode(), digest_size=16).hexdigest()


def _start(dest: Path, plan: dict):
    """The shards an earlier run of this plan finished ({} for a new prepare), or None when DEST holds this very set
    already. Anything else in DEST is refused."""
    partial = dest / PARTIAL
    if (dest / INDEX).is_file():
        index = read_index(dest)
        if index.get("source", {}).get("plan") == _plan_digest(plan):
            return None
        raise ConfigError("DEST", str(dest), "a new or empty folder: it holds a prepared set of another source or "
                                             "settings (remove it, or choose another DEST)")
    if (partial / "plan.json").is_file():
        earlier = json.loads((partial / "plan.json").read_text())
        if earlier != plan:
            differ = sorted(k for k in set(plan) | set(earlier) if plan.get(k) != earlier.get(k))
            raise ConfigError("DEST", str(dest), f"a new or empty folder, or the same prepare to resume: it holds an "
                                                 f"unfinished prepare whose {', '.join(differ)} differ (remove it to "
                                                 "start again)")
        progress = json.loads((partial / "progress.json").read_text()) if (partial / "progress.json").is_file() else {}
        return {name: shard for name, shard in progress.items()
                if shard["count"] == 0 or ((dest / name).is_file() and (dest / name).stat().st_size == shard["bytes"])}
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError("DEST", str(dest), "a new or empty folder (it holds other files)")
    try:
        partial.mkdir(parents=True, exist_ok=True)
        _write_json(partial / "plan.json", plan)
    except OSError as err:
        raise ConfigError("DEST", str(dest), f"a folder this machine can write ({err.strerror or err})") from None
    return {}


def _shards(plan: dict, split: str):
    """(shard number, first sample, stop) of a split."""
    count, per_shard = plan["counts"][split], plan["shard_samples"]
    return [(k, k * per_shard, min((k + 1) * per_shard, count)) for k in range(math.ceil(count / per_shard))]


class Progress:
    """Console lines of a prepare: its start, each shard, each skipped file, its end."""

    def __init__(self, echo=print):
        self.echo = echo
        self.started = time.perf_counter()
        self.images = 0

    def begin(self, source, dest, plan, pool, done: int, total: int):
        counts = plan["counts"]
        self.echo(f"prepare {source.display()} -> {dest}: {len(plan['classes'])} classes, train {counts['train']:,} "
                  f"and test {counts['test']:,} samples at {plan['size']} x {plan['size']}, {total} shards, "
                  f"on {pool.describe()}" + (f"; resuming: {done} shards were written before" if done else ""))

    def skipped(self, name: str, reason: str):
        self.echo(f"skipped {name}: {reason}")

    def shard(self, split: str, number: int, shards: int, count: int):
        self.images += count
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        self.echo(f"{split} shard {number + 1}/{shards} written ({count:,} images; {rate:,.0f} images/s)")

    def end(self, dest, index: dict):
        skipped = len(index["skipped"])
        self.echo(f"prepared {dest}: train {index['splits']['train']['count']:,}, test "
                  f"{index['splits']['test']['count']:,} images; {skipped} file{'s' if skipped != 1 else ''} skipped"
                  f"{' (each named in index.json)' if skipped else ''}; digest {index['digest']}")


def prepare(source: str, dest, size: int | None = None, workers: int | None = None, tasks=None,
            root=None, download: bool = False, val_labels=None, view: str | None = None,
            shard_bytes: int = SHARD_BYTES, progress: Progress | None = None) -> dict:
    """Prepares SOURCE into DEST (see the module's docstring); returns the index. Run again after an interruption,
    it resumes; run again on a finished DEST, it checks it and returns its index. ``workers``: decoding processes
    (default: one per core); ``tasks``: where else to decode (runtime/tasks.py's ``RayTasks``, a cluster's nodes);
    ``view``: the views the set is trained with (``parse_view``)."""
    if size is not None:
        _positive("--size", size, MIN_SIZE)
    if workers is not None:
        _positive("--workers", workers)
    _positive("--shard-bytes", shard_bytes)
    progress = progress or Progress()
    src = open_source(str(source), root, download, val_labels)
    size = size or src.default_size()
    _positive("--size", size, MIN_SIZE)
    dest = Path(dest)
    plan = _plan(src, size, shard_bytes, parse_view(view, src))
    done = _start(dest, plan)
    if done is None:
        index = read_index(dest)
        progress.echo(f"{dest} holds this prepared set already (digest {index['digest']})")
        return index
    shards = {split: _shards(plan, split) for split in SPLITS}
    todo = [(split, k, a, b) for split in SPLITS for k, a, b in shards[split] if shard_name(split, k) not in done]
    pool = executor(src, workers, tasks)
    progress.begin(src, dest, plan, pool, len(done), sum(len(s) for s in shards.values()))
    for name, reason in src.others:
        progress.skipped(name, reason)
    finished = False
    try:
        tasks = (src.task(split, c, min(c + CHUNK, b), size) for split, _, a, b in todo for c in range(a, b, CHUNK))
        results = pool.imap(tasks)
        for split, k, a, b in todo:
            done[shard_name(split, k)] = _write_shard(src, dest, plan, split, k, a, b, results, progress)
            _write_json(dest / PARTIAL / "progress.json", done)
            progress.shard(split, k, len(shards[split]), done[shard_name(split, k)]["count"])
        finished = True
    finally:
        pool.close(finished)
    index = _finish(src, dest, plan, shards, done)
    progress.end(dest, index)
    return index


def _write_shard(src, dest: Path, plan: dict, split: str, k: int, start: int, stop: int, results, progress) -> dict:
    """One shard from its chunks' results, written to a temporary name and renamed; its labels, sizes and names kept
    in DEST/.partial/ until the set is finished. Returns its record."""
    name = shard_name(split, k)
    temporary = dest / PARTIAL / f"{name}.tmp"
    digest = hashlib.blake2b(digest_size=16)
    histogram = np.zeros((plan["channels"], 256), dtype=np.int64)
    labels, sizes, names, skipped = [], [], [], []
    with open(temporary, "wb") as out:
        for chunk in range(start, stop, CHUNK):
            end = min(chunk + CHUNK, stop)
            images, chunk_sizes, reasons = next(results)
            data = memoryview(np.ascontiguousarray(images)).cast("B")
            out.write(data)
            digest.update(data)
            if split == "train":
                histogram += channel_histogram(images)
            read = [i for i, reason in enumerate(reasons) if reason is None]
            chunk_names = src.names(split, chunk, end)
            labels.append(src.labels(split, chunk, end)[read])
            sizes.append(chunk_sizes)
            names += [chunk_names[i] for i in read]
            for i, reason in enumerate(reasons):
                if reason is not None:
                    skipped.append([chunk_names[i], reason])
                    progress.skipped(chunk_names[i], reason)
        out.flush()
        os.fsync(out.fileno())
    count = len(names)
    if count:
        os.replace(temporary, dest / name)
    else:
        temporary.unlink()
    np.savez(dest / PARTIAL / f"{name}.npz", labels=np.concatenate(labels), sizes=np.concatenate(sizes),
             names=np.asarray(names, dtype=str))
    return {"count": count, "bytes": count * plan["channels"] * plan["size"] ** 2, CHECKSUM: digest.hexdigest(),
            "histogram": histogram.tolist() if split == "train" else None, "skipped": skipped}


def _finish(src, dest: Path, plan: dict, shards: dict, done: dict) -> dict:
    """The split files beside the shards, the channel statistics, the index (written last), and no .partial."""
    index = {"format": FORMAT, "version": VERSION, "size": plan["size"], "channels": plan["channels"],
             "classes": plan["classes"], "view": plan["view"], "splits": {},
             "source": {"name": plan["source"], "plan": _plan_digest(plan)},
             "skipped": [{"file": name, "reason": reason} for name, reason in src.others]}
    histogram = np.zeros((plan["channels"], 256), dtype=np.int64)
    for split in SPLITS:
        entry = {"shards": [], "count": 0}
        labels, sizes, names = [], [], []
        for k, _, _ in shards[split]:
            name = shard_name(split, k)
            record = done[name]
            index["skipped"] += [{"file": file, "reason": reason} for file, reason in record["skipped"]]
            if record["histogram"] is not None:
                histogram += np.asarray(record["histogram"], dtype=np.int64)
            with np.load(dest / PARTIAL / f"{name}.npz") as kept:
                labels.append(kept["labels"])
                sizes.append(kept["sizes"])
                names += kept["names"].tolist()
            if record["count"]:
                entry["shards"].append({"file": name, "count": record["count"], "bytes": record["bytes"],
                                        CHECKSUM: record[CHECKSUM]})
                entry["count"] += record["count"]
        np.save(dest / side_name(split, "labels"), np.concatenate(labels).astype(np.int64))
        np.save(dest / side_name(split, "sizes"), np.concatenate(sizes).astype(np.int32))
        (dest / side_name(split, "names")).write_text("".join(f"{n}\n" for n in names))
        for kind in SIDE_FILES:
            path = dest / side_name(split, kind)
            entry[kind] = {"file": path.name, "bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}
        index["splits"][split] = entry
    for split in SPLITS:
        if index["splits"][split]["count"] == 0:
            raise ConfigError("SOURCE", plan["source"], f"readable images in every split; none in {split} (the files "
                                                        "skipped are named above)")
    mean, std = src.stats if src.stats is not None else histogram_stats(histogram)
    index["mean"], index["std"] = list(mean), list(std)
    index["digest"] = set_digest(index)
    _write_json(dest / INDEX, index)
    shutil.rmtree(dest / PARTIAL)
    return index
