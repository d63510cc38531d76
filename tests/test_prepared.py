"""Prepared data sets: ``raydistill data prepare`` on real JPEG files and CIFAR pickles each test writes, the reader's
memory maps, validation carved by index, the background reader, the node-local cache, and the presets that train on
prepared sets.

This test covers:
- an ImageNet-style folder (10 classes, JPEGs of mixed sizes, grayscale and CMYK JPEGs, a PNG named .JPEG, a truncated
  JPEG, a text file, ImageNet's flat val/ with LOC_val_solution.csv) prepared on worker processes: every bad file
  named, the images and labels where the source has them, the index's statistics exact;
- a prepare interrupted after two shards (and a shard half written, as a kill leaves it) and run again: the very
  files of an uninterrupted prepare; the same on Ray tasks;
- CIFAR-10 pickles prepared straight from the source: its order, pixels, labels and channel statistics, and a run
  that trains to the in-memory source's parameters; the same images as PNG class folders: a lossless round trip;
- bad input: one line naming the path or flag, exit 2, nothing written.
"""
import io
import json
import pickle
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import raydistill
from raydistill.cli import main
from raydistill.config import load_config
from raydistill.data import load_dataset
from raydistill.data.cache import localize
from raydistill.data.prefetch import Prefetcher, host_batch, prefetched
from raydistill.data.prepare import PARTIAL, Progress, prepare
from raydistill.data.layout import INDEX, read_index, verify
from raydistill.data.prepared import PreparedSet
from raydistill.data.sources import channel_stats
from raydistill.errors import ConfigError
from tests.conftest import one_line, set_keys
from tests.test_equivalence import assert_identical, peer_states

CLASSES = [f"n{c:08d}" for c in range(10)]
SIZE = 16
SHARD = 8 * 3 * SIZE * SIZE          # 8 images a shard: train (34 listed) is 5 shards, test (20) 3


def colour(c: int) -> tuple:
    return (37 * c) % 256, (91 * c + 50) % 256, (151 * c + 100) % 256


def write_imagenet(root):
    """ImageNet's layout and its odd files: class folders of JPEGs, a flat val/ labelled by LOC_val_solution.csv."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(CLASSES):
        (root / "train" / wnid).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (23, 50), (64, 48)]):
            Image.new("RGB", size, colour(c)).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=90)
    train = root / "train"
    Image.new("L", (30, 40), 128).save(train / CLASSES[1] / "gray.JPEG", quality=90)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(train / CLASSES[2] / "cmyk.JPEG", quality=90)
    Image.new("RGB", (20, 20), (0, 0, 255)).save(train / CLASSES[3] / "png.JPEG", format="PNG")
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy, "JPEG", quality=90)
    (train / CLASSES[4] / "truncated.JPEG").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) * 2 // 3])
    (train / CLASSES[5] / "notes.txt").write_text("not an image")
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate(CLASSES):
        for i in range(2):
            name = f"ILSVRC2012_val_{2 * c + i + 1:08d}"
            Image.new("RGB", (36, 28), colour(c)).save(root / "val" / f"{name}.JPEG", quality=90)
            rows.append(f"{name},{wnid} 1 2 30 20 {wnid} 3 4 10 10")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def files_of(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Lines(Progress):
    """The console lines of a prepare, kept; after ``stop_after`` shards, an interruption (what Ctrl-C raises)."""

    def __init__(self, stop_after=None):
        self.lines = []
        super().__init__(echo=self.lines.append)
        self.stop_after = stop_after

    def shard(self, *args):
        super().shard(*args)
        if self.stop_after is not None:
            self.stop_after -= 1
            if self.stop_after == 0:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """The source folder and its set prepared in one go on two worker processes."""
    base = tmp_path_factory.mktemp("imagenet")
    source = write_imagenet(base / "source")
    progress = Lines()
    dest = base / "prepared"
    prepare(str(source), dest, size=SIZE, workers=2, val_labels=source / "LOC_val_solution.csv", shard_bytes=SHARD,
            progress=progress)
    return source, dest, progress.lines


# ---------------------------------------------------------------------------------------------------------------------
# an ImageNet-style folder


def test_an_imagenet_folder_is_prepared_with_every_bad_file_named(imagenet):
    source, dest, lines = imagenet
    assert f"skipped train/{CLASSES[4]}/truncated.JPEG: unreadable (OSError: image file is truncated" in "\n".join(lines)
    assert f"skipped train/{CLASSES[5]}/notes.txt: not an image file (its suffix)" in lines
    index = verify(dest)
    assert [s["file"] for s in index["skipped"]] == [f"train/{CLASSES[5]}/notes.txt", f"train/{CLASSES[4]}/truncated.JPEG"]
    assert index["classes"] == CLASSES and index["size"] == SIZE and index["channels"] == 3
    assert index["view"]["kind"] == "random_resized_crop"
    assert [len(index["splits"][s]["shards"]) for s in ("train", "test")] == [5, 3]

    data = PreparedSet(dest)
    assert data.num_samples("train") == 33 and data.num_samples("test") == 20
    names = (dest / "train-names.txt").read_text().splitlines()
    labels, x = data.labels("train"), data.read("train", np.arange(33))
    assert x.shape == (33, 3, SIZE, SIZE) and x.dtype == np.uint8
    for i, name in enumerate(names):
        wnid, file = name.split("/")[1:]
        assert labels[i] == CLASSES.index(wnid), name
        pixel = x[i].reshape(3, -1).mean(axis=1)
        expected = {"gray.JPEG": (128, 128, 128), "cmyk.JPEG": (255, 0, 0), "png.JPEG": (0, 0, 255)}.get(
            file, colour(CLASSES.index(wnid)))
        assert np.abs(pixel - expected).max() <= 4, (name, pixel, expected)
    assert (x[names.index(f"train/{CLASSES[3]}/png.JPEG")] == np.array([0, 0, 255])[:, None, None]).all()  # lossless
    sizes = np.load(dest / "train-sizes.npy")
    assert sizes[names.index(f"train/{CLASSES[0]}/{CLASSES[0]}_1.JPEG")].tolist() == [50, 23]   # height, width
    # ImageNet's flat val/ takes its labels from the labels file, in file-name order
    assert data.labels("test").tolist() == [c for c in range(10) for _ in range(2)]
    assert np.abs(data.read("test", [5]).reshape(3, -1).mean(axis=1) - colour(2)).max() <= 4
    # the statistics in the index are those of the stored train pixels, exactly
    mean, std = channel_stats(x)
    assert data.spec.mean == pytest.approx(mean, abs=1e-12) and data.spec.std == pytest.approx(std, abs=1e-12)
    assert data.spec.input_shape == (3, SIZE, SIZE) and data.spec.num_classes == 10


def test_an_interrupted_prepare_resumed_writes_the_files_of_an_uninterrupted_one(imagenet, tmp_path):
    source, reference, _ = imagenet
    dest = tmp_path / "resumed"
    options = dict(size=SIZE, workers=2, val_labels=source / "LOC_val_solution.csv", shard_bytes=SHARD)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(source), dest, progress=Lines(stop_after=2), **options)
    assert not (dest / INDEX).exists() and (dest / "train-00001.u8").is_file()
    assert not (dest / "train-00002.u8").exists()
    (dest / PARTIAL / "train-00002.u8.tmp").write_bytes(b"half a shard, as a kill leaves it")
    with pytest.raises(ConfigError, match=r"^DEST=.*unfinished prepare whose shard_samples, size differ"):
        prepare(str(source), dest, **{**options, "size": SIZE * 2})            # another plan is not mixed in
    resumed = Lines()
    prepare(str(source), dest, progress=resumed, **options)
    assert "resuming: 2 shards were written before" in resumed.lines[0]
    assert not (dest / PARTIAL).exists()
    assert files_of(dest) == files_of(reference)
    again = Lines()
    prepare(str(source), dest, progress=again, **options)                     # finished: checked, nothing rewritten
    assert again.lines == [f"{dest} holds this prepared set already (digest {read_index(dest)['digest']})"]


def test_prepare_on_ray_tasks_writes_the_same_files(ray_session, imagenet, tmp_path):
    source, reference, _ = imagenet
    progress = Lines()
    from raydistill.data.prepare import run_task
    from raydistill.runtime.tasks import RayTasks

    prepare(str(source), tmp_path / "ray", size=SIZE, workers=2, tasks=RayTasks("auto", run_task, 2),
            val_labels=source / "LOC_val_solution.csv", shard_bytes=SHARD, progress=progress)
    assert "on Ray tasks (" in progress.lines[0]
    assert files_of(tmp_path / "ray") == files_of(reference)


# ---------------------------------------------------------------------------------------------------------------------
# reading


def test_the_reader_gathers_from_memory_maps_and_carves_validation_by_index(imagenet):
    _, dest, _ = imagenet
    data = PreparedSet(dest)
    whole = data.arrays("train")
    picked = [32, 0, 7, 8, 31, 8]                      # across shards, repeated, out of order
    np.testing.assert_array_equal(data.read("train", picked), whole[picked])
    _, shard = data._shard("train", 0)
    assert not shard.flags.writeable and not shard.flags.owndata    # a view of the map, not a heap copy
    carved = data.with_validation(0.25, seed=3)
    assert carved.splits == ("train", "val", "test") and carved.num_samples("val") == 8
    assert carved.num_samples("train") == 25 and carved._maps is data._maps
    ds = load_dataset("synthetic", num_train=33, num_test=1, shape=[1, 1, 1])
    ds.train_x, ds.train_y = whole, data.labels("train")
    rest, val_x, val_y = ds.split_validation(0.25, seed=3)         # the in-memory sources' carving: the same samples
    np.testing.assert_array_equal(carved.read("val", np.arange(8)), val_x)
    np.testing.assert_array_equal(carved.labels("val"), val_y)
    np.testing.assert_array_equal(carved.read("train", np.arange(25)), rest.train_x)
    with pytest.raises(ConfigError, match=r"^split='val': one of: train, test$"):
        data.read("val", [0])
    copy = pickle.loads(pickle.dumps(carved))                      # a worker receives it without its maps
    assert copy._maps == {}
    np.testing.assert_array_equal(copy.read("val", [1, 2]), val_x[[1, 2]])


def test_the_next_batch_is_read_on_a_background_thread(imagenet):
    import threading

    _, dest, _ = imagenet
    data = PreparedSet(dest)
    readers = []

    def load(step):
        readers.append(threading.current_thread().name)
        return host_batch(data, "train", np.arange(step * 4, step * 4 + 4))

    batches = list(prefetched(range(5), load))
    for step, (x, y) in enumerate(batches):
        assert torch.equal(x, torch.from_numpy(data.read("train", np.arange(step * 4, step * 4 + 4))))
        assert torch.equal(y, torch.from_numpy(data.labels("train", np.arange(step * 4, step * 4 + 4))))
    assert readers[0] == threading.current_thread().name                  # the first: nothing was announced
    assert all(name.startswith("prefetch") for name in readers[1:])
    with Prefetcher(load) as prefetcher:                                    # a jump drops what was announced
        prefetcher.prefetch(3)
        assert torch.equal(prefetcher.get(1)[0], batches[1][0])
        assert prefetcher._pending == {}


def test_a_prepared_set_at_a_uri_is_copied_once_into_the_node_cache_and_checked(imagenet, tmp_path):
    _, dest, _ = imagenet
    uri = f"file://{dest}"
    cached = localize(uri, tmp_path / "cache")
    assert cached.parent == tmp_path / "cache" and files_of(dest).items() <= files_of(cached).items()
    stamp = (cached / "train-00000.u8").stat().st_mtime_ns
    assert localize(uri, tmp_path / "cache") == cached and (cached / "train-00000.u8").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(PreparedSet(cached).read("test", [3]), PreparedSet(dest).read("test", [3]))
    assert localize(str(dest)) == dest                                      # a local folder is read in place
    # a source file that differs from its index is refused by name, and nothing is left half-copied
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, content in files_of(dest).items():
        (damaged / name).write_bytes(content)
    shard = bytearray((damaged / "test-00001.u8").read_bytes())
    shard[5] ^= 0xFF
    (damaged / "test-00001.u8").write_bytes(bytes(shard))
    with pytest.raises(ConfigError, match=r"^data\.root='file://.*/test-00001\.u8': the bytes index\.json lists"):
        localize(f"file://{damaged}", tmp_path / "cache2")
    assert [p.name for p in (tmp_path / "cache2").iterdir() if not p.name.endswith(".lock")] == []
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match=r"^data\.cache_dir='.*a-file/cache': a folder this node can write"):
        localize(uri, blocked / "cache")
    with pytest.raises(ConfigError, match=r"^data\.cache_dir=None: a node-local folder to copy s3://b/set into"):
        localize("s3://b/set")


# ---------------------------------------------------------------------------------------------------------------------
# training from a prepared set: a worker's view of it, an ImageNet-style run on Ray


def imagenet_dml(root, **overrides) -> dict:
    """2 DML peers (a 16-unit MLP) on the generated ImageNet-style set at 12 x 12 views: 2 epochs of 3 steps, one
    peer per worker on Ray."""
    config = {"name": "imagenet-dml", "seed": 2, "data": {"name": "prepared", "root": str(root),
                                                          "options": {"crop_size": 12}},
              "model": {"arch": "mlp", "options": {"hidden": [16]}}, "peers": 2, "method": {"name": "dml"},
              "train": {"epochs": 2, "batch_size": 8, "lr": 0.05}, "resources": {"peers_per_worker": 1}}
    return set_keys(config, overrides)


def test_a_worker_reads_a_steps_batch_once_reads_the_next_ahead_and_a_peer_may_take_rows_of_it(imagenet):
    from raydistill.data.views import batch_indices, center_crop_view, random_resized_crop_view
    from raydistill.engine.data import DataView, load_run_data

    _, dest, _ = imagenet
    config = load_config(imagenet_dml(dest))
    spec, data = load_run_data(config)
    assert spec.input_shape == (3, 12, 12) and data.num_samples("train") == 30 and data.num_samples("val") == 3
    assert len(pickle.dumps(data)) < data.num_samples("train") * 3 * SIZE * SIZE / 2     # a handle: no image in it
    reads = []
    read = data.read

    def recorded(split, indices):
        reads.append((threading.current_thread().name, split, len(indices)))
        return read(split, indices)

    data.read = recorded
    view = DataView(config, data)
    first = view.inputs(0, 1)
    assert view.inputs(0, 1) is first                    # once for all; the next step may already be on its way
    assert [r for r in reads if not r[0].startswith("prefetch")] == [(threading.current_thread().name, "train", 8)]
    assert len(reads) <= 2
    idx = batch_indices(config.seed, 0, 1, 30, 8)
    assert torch.equal(first, torch.from_numpy(read("train", idx.numpy())))
    assert torch.equal(view.labels(0, 1), torch.from_numpy(data.labels("train", idx.numpy())))
    assert torch.equal(view.view(0, 1, 3), random_resized_crop_view(first, config.seed, 0, 1, 3, 12))
    view.inputs(0, 2)                                   # read on the background thread while step 1 ran
    assert reads[1][0].startswith("prefetch") and reads[1][1:] == ("train", 8)
    # rows 2..3 of the step: only they are read, and they are those rows of the whole batch's view and labels
    rows = slice(2, 4)
    assert torch.equal(view.view(0, 2, 1, rows=rows), view.view(0, 2, 1)[rows])
    assert torch.equal(view.labels(0, 2, rows=rows), view.labels(0, 2)[rows])
    assert (threading.current_thread().name, "train", 2) in reads
    # evaluation: resize + center crop of every sample of the split, in order
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 10))
    expected = model(center_crop_view(torch.from_numpy(read("test", np.arange(20))), 12)).detach().numpy()
    np.testing.assert_allclose(view.predict(model, "test"), expected, rtol=1e-6, atol=1e-6)


def test_an_imagenet_style_set_trains_dml_on_ray_with_two_workers_each_reading_its_nodes_copy(
        ray_session, imagenet, tmp_path, capfd):
    """The set at a file:// URI with data.cache_dir: each worker copies it into the node's cache at set-up (once per
    node) and reads from there, and the start-up line says so; two epochs on Ray end with the parameters of the same
    run in this process, which reads the set in place."""
    _, dest, _ = imagenet
    local = raydistill.train(imagenet_dml(dest), tmp_path / "inprocess", runtime="inprocess", progress=False)
    cache = tmp_path / "cache"
    config = imagenet_dml(f"file://{dest}", **{"data.cache_dir": str(cache)})
    run = raydistill.train(config, tmp_path / "ray", progress=True)
    out = capfd.readouterr().out
    digest = read_index(dest)["digest"]
    copy = cache / f"prepared-{digest[:16]}"
    line = [text for text in out.splitlines() if text.startswith("data: ")]
    assert line == [f"data: prepared set {digest[:12]}, 30 train samples read by index; node "
                    f"{run.summary['worker_nodes'][0][:12]} from {copy} (copied from file://{dest}) (workers 0, 1)"]
    assert files_of(dest).items() <= files_of(copy).items()
    assert (run.summary["epochs_completed"], len(run.summary["peers"])) == (2, 2)
    assert_identical(peer_states(run.run_dir, 2), peer_states(local.run_dir, 2))
    assert run.summary["peers"] == [{**p, "node": q["node"]} for p, q in zip(local.summary["peers"],
                                                                           run.summary["peers"])]
    # `raydistill eval`: the exported models on the test split's evaluation views, as the run evaluated them
    from raydistill.evaluate import evaluate_run

    evaluated = evaluate_run(run.run_dir)
    assert [evaluated[f"peer{i}"]["acc"] for i in range(2)] == [p["test_acc"] for p in run.summary["peers"]]


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-style sets: exactness


def write_cifar10(folder, seed=0):
    """CIFAR-10 python batches as the originals are laid out (two train batches, a test batch); labels cycle 0..9."""
    from tests.test_data import _write_batch

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs = [rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for n in (14, 10, 10)]
    ys = [np.arange(n) % 10 for n in (14, 10, 10)]
    for i in (0, 1):
        _write_batch(folder / f"data_batch_{i + 1}", xs[i], ys[i])
    _write_batch(folder / "test_batch", xs[2], ys[2])
    return folder


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    base = tmp_path_factory.mktemp("cifar")
    root = write_cifar10(base / "cifar10")
    dest = base / "prepared"
    prepare("cifar10", dest, root=str(root), shard_bytes=5 * 3072, progress=Lines())
    return root, dest


def test_cifar_pickles_prepared_keep_the_sources_order_pixels_labels_and_statistics(cifar):
    root, dest = cifar
    source, data = load_dataset("cifar10", str(root)), PreparedSet(dest)
    np.testing.assert_array_equal(data.arrays("train"), source.train_x)     # the source's order, every pixel
    np.testing.assert_array_equal(data.labels("train"), source.train_y)
    np.testing.assert_array_equal(data.arrays("test"), source.test_x)
    np.testing.assert_array_equal(data.labels("test"), source.test_y)
    assert data.spec == source.spec                                          # CIFAR-10's standard mean and std
    assert data.view == {"kind": "crop_pad", "crop_pad": 4, "flip": True, "pad_mode": "zeros"}
    assert (dest / "train-names.txt").read_text().splitlines()[:2] == ["cifar10:train[0]", "cifar10:train[1]"]
    loaded = load_dataset("prepared", str(dest))
    np.testing.assert_array_equal(loaded.train_x, source.train_x)
    assert loaded.spec == source.spec


def cifar_run(data: dict, **overrides) -> dict:
    """2 DML peers on a few CIFAR-shaped images, 2 epochs of 7 steps, one peer per worker on Ray."""
    config = {"name": "exact", "seed": 1, "data": {**data, "crop_pad": 4, "flip": True},
              "model": {"arch": "mlp", "options": {"hidden": [8]}}, "peers": 2, "method": {"name": "dml"},
              "train": {"epochs": 2, "batch_size": 4, "lr": 0.05}, "resources": {"peers_per_worker": 1}}
    return set_keys(config, overrides)


@pytest.fixture(scope="module")
def cifar_reference(cifar, tmp_path_factory):
    """The run on the in-memory cifar10 source, in this process: what every run on the prepared set must end with."""
    root, _ = cifar
    run_dir = tmp_path_factory.mktemp("cifar-reference") / "run"
    raydistill.train(cifar_run({"name": "cifar10", "root": str(root)}), run_dir, runtime="inprocess", progress=False)
    state = peer_states(run_dir, 2)
    assert state["peers"][0]["optimizer"]["state"], "no optimizer step was taken: the equality would be of inits"
    return state


def test_a_run_on_the_prepared_cifar_set_trains_to_the_in_memory_sources_parameters(cifar, cifar_reference,
                                                                                   tmp_path):
    """The prepared set read by index from its memory maps, in this process: the source's parameters, bit for bit."""
    _, dest = cifar
    run = raydistill.train(cifar_run({"name": "prepared", "root": str(dest)}), tmp_path / "run", runtime="inprocess",
                           progress=False)
    assert_identical(peer_states(run.run_dir, 2), cifar_reference)
    written = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert written["data"]["digest"] == read_index(dest)["digest"]           # the run records the set it read


def test_on_ray_the_prepared_cifar_set_trains_to_the_in_memory_sources_parameters(ray_session, cifar,
                                                                                 cifar_reference, tmp_path):
    """Two workers on Ray (each reads the step's batch from the set's memory maps; the driver sends the set's handle,
    no image): the in-memory source's in-process parameters, bit for bit."""
    _, dest = cifar
    run = raydistill.train(cifar_run({"name": "prepared", "root": str(dest)}), tmp_path / "run", progress=False)
    assert run.summary["runtime"] == "ray" and len(run.summary["worker_nodes"]) == 2
    assert_identical(peer_states(run.run_dir, 2), cifar_reference)


@pytest.mark.timeout(300)
def test_a_worker_lost_mid_epoch_on_a_prepared_set_replays_exactly(ray_session, cifar, cifar_reference, tmp_path):
    """worker1 SIGKILLed in epoch 2's call (the object-store transport: its coordinator actor holds the set's labels
    only): Ray restarts it, it opens the set again on its node, the run rolls back to epoch 1's end and replays epoch
    2 from the same indices and views: the uninterrupted in-memory run's parameters, bit for bit."""
    from tests.test_multinode import kill_during_epoch_2

    _, dest = cifar
    config = cifar_run({"name": "prepared", "root": str(dest)}, **{"name": "exact-lost",
                                                                   "resources.transport": "object_store",
                                                                   "resources.node_wait_s": 60})
    drill, on_epoch = kill_during_epoch_2(config, threading.current_thread())
    summary = raydistill.train(config, tmp_path / "run", progress=False, on_epoch=on_epoch).summary
    drill["watcher"].finish()
    assert (summary["epochs_completed"], summary["restarts"]) == (2, 1)
    assert summary["steps_redone"] <= 7                      # epoch 2's steps run before the loss, run again
    assert_identical(peer_states(tmp_path / "run", 2), cifar_reference)


def test_a_cifar_set_written_as_png_class_folders_round_trips_losslessly(cifar, tmp_path):
    root, _ = cifar
    source = load_dataset("cifar10", str(root))
    folder = tmp_path / "pngs"
    for split, (x, y) in {"train": (source.train_x, source.train_y), "val": (source.test_x, source.test_y)}.items():
        for i, (image, label) in enumerate(zip(x, y)):
            (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / split / str(label) / f"{i:03d}.png")
    dest = tmp_path / "prepared"
    prepare(str(folder), dest, size=32, workers=1, progress=Lines())
    data = PreparedSet(dest)
    for split, x, y in (("train", source.train_x, source.train_y), ("test", source.test_x, source.test_y)):
        stored = data.arrays(split)
        named = [data.classes[label] for label in data.labels(split)]
        assert sorted(zip(map(bytes, stored), named)) == sorted(zip(map(bytes, x), map(str, y)))


# ---------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def assert_refused(capsys, argv, start: str, dest=None):
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"raydistill: error: {start}"), err
    if dest is not None:
        assert not dest.exists()


def test_bad_input_is_refused_in_one_line(imagenet, tmp_path, capsys):
    source, prepared, _ = imagenet
    dest = tmp_path / "dest"
    assert_refused(capsys, ["data", "prepare", str(source), str(dest), "--size", "7"], "--size=7: an integer >= 8",
                   dest)
    no_classes = tmp_path / "no-classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    assert_refused(capsys, ["data", "prepare", str(no_classes), str(dest)],
                   f"SOURCE='{no_classes / 'train'}': class folders <class>/ holding images; found none", dest)
    empty_class = tmp_path / "empty-class"
    for folder in ("train/a", "train/b", "val/a"):
        (empty_class / folder).mkdir(parents=True)
    Image.new("RGB", (9, 9)).save(empty_class / "train/a/0.png")
    assert_refused(capsys, ["data", "prepare", str(empty_class), str(dest)],
                   f"SOURCE='{empty_class / 'train' / 'b'}': a class folder with at least one image", dest)
    assert_refused(capsys, ["data", "prepare", "tabular", str(dest)], "SOURCE='tabular': an image folder, or one of:",
                   dest)
    # a prepared set whose files do not match its index: a shard cut short, a shard changed
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, content in files_of(prepared).items():
        (broken / name).write_bytes(content)
    shard = (broken / "train-00004.u8").read_bytes()
    (broken / "train-00004.u8").write_bytes(shard[:-1])
    assert_refused(capsys, ["data", "verify", str(broken)], f"data.root='{broken / 'train-00004.u8'}': a file of "
                                                            f"{len(shard)} bytes, as index.json lists it")
    (broken / "train-00004.u8").write_bytes(shard[:-1] + b"\x00" if shard[-1] else shard[:-1] + b"\x01")
    assert_refused(capsys, ["data", "verify", str(broken)], f"data.root='{broken / 'train-00004.u8'}': the bytes "
                                                            "index.json lists")
    index = json.loads((broken / INDEX).read_text())
    index["classes"][0] = "edited"
    (broken / INDEX).write_text(json.dumps(index))
    assert_refused(capsys, ["data", "verify", str(broken)], f"data.root='{broken / INDEX}': an index whose digest")
    assert main(["data", "verify", str(prepared)]) == 0
    config = {"name": "c", "data": {"name": "digits", "cache_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"^data\.cache_dir='.*': only for data\.name prepared$"):
        load_config(config)


def test_what_a_prepared_run_cannot_take_is_refused_in_one_line(imagenet, cifar, tmp_path, capsys):
    """Settings a prepared set cannot honour, a node that finds another set at data.root, and a run resumed on
    another set than the one it trained on (config.yaml records its digest)."""
    from tests.conftest import write_config

    _, dest, _ = imagenet
    for overrides, start in (({"data.crop_pad": 4}, "data.crop_pad=4: null for a prepared set with random-resized-"
                                                    "crop views (their side is data.options.crop_size)"),
                             ({"data.options": {"crop_size": 12, "image_size": 9}},
                              "data.image_size=9: options of prepared: crop_size")):
        path = write_config(tmp_path / "c.yaml", imagenet_dml(dest, **overrides))
        assert_refused(capsys, ["train", path, "--runtime", "inprocess", "--output", str(tmp_path / "x")], start,
                       tmp_path / "x")
    _, cifar_dest = cifar
    other = tmp_path / "other"
    prepare("cifar10", other, root=str(write_cifar10(tmp_path / "cifar-other", seed=1)), progress=Lines())
    moved = PreparedSet(cifar_dest)
    moved.root = other                          # a node where the same path holds another set
    with pytest.raises(ConfigError, match=rf"^data\.root='{cifar_dest}': the prepared set of digest "
                                          rf"{moved.digest} this run reads; this node \(.*\) finds digest "
                                          rf"{read_index(other)['digest']} there$"):
        moved.on_node()
    run_dir = tmp_path / "run"
    raydistill.train(cifar_run({"name": "prepared", "root": str(cifar_dest)}, **{"train.epochs": 1}), run_dir,
                     runtime="inprocess", progress=False)
    assert_refused(capsys, ["train", "--resume", str(run_dir), "--set", f"data.root={other}", "--set",
                            "train.epochs=2", "--runtime", "inprocess"],
                   f"data.digest='{moved.digest}': the digest of the data set this run trained on; prepared at "
                   f"data.root={other} is now {read_index(other)['digest']}")
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=2", "--runtime", "inprocess",
                 "--quiet"]) == 0


def test_the_smallest_size_is_accepted(imagenet, tmp_path):
    source, _, _ = imagenet
    prepare(str(source), tmp_path / "s8", size=8, workers=1, val_labels=source / "LOC_val_solution.csv",
            progress=Lines())
    assert PreparedSet(tmp_path / "s8").read("train", [0]).shape == (1, 3, 8, 8)


def test_an_imagenet_style_set_is_not_read_whole_by_the_in_memory_path(imagenet):
    _, dest, _ = imagenet
    with pytest.raises(ConfigError, match=r"^data\.root='.*': a prepared set with crop-and-pad views to read whole"):
        load_dataset("prepared", str(dest))


# ---------------------------------------------------------------------------------------------------------------------
# presets that train on prepared sets

# The values each preset must carry, read from its source (its leading comment names the files and lines).
SOURCE_VALUES = {
    # torchdistill configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/kd-resnet18_from_resnet34.yaml
    "kd-torchdistill-imagenet": {
        "data.name": "prepared", "data.options": {"crop_size": 224}, "data.val_fraction": 0.0, "data.crop_pad": None,
        "model.arch": "resnet18", "teacher.arch": "resnet34", "num_peers": 1, "method.name": "kd",
        "method.temperature": 1.0, "method.alpha": 0.5, "method.ce_weight": "complement", "train.optimizer": "sgd",
        "train.lr": 0.1, "train.momentum": 0.9, "train.nesterov": False, "train.weight_decay": 1e-4,
        "train.batch_size": 256, "train.epochs": 100, "train.schedule": "step", "train.milestones": [30, 60, 90],
        "train.gamma": 0.1,
    },
    # Guo et al. 2020 (the pair and the loss) with torchvision's reference ResNet schedule
    "kdcl-guo2020-imagenet": {
        "data.name": "prepared", "data.options": {"crop_size": 224}, "data.crop_pad": None, "num_peers": 2,
        "method.name": "kdcl", "method.alpha": 1.0, "method.ce_weight": 1.0, "method.per_peer_views": True,
        "train.lr": 0.1, "train.batch_size": 256, "train.epochs": 90, "train.milestones": [30, 60],
        "train.weight_decay": 1e-4, "train.momentum": 0.9,
    },
    # the DKEL code: configs/20221027_tinyimagenet.yml, src/schemes/scheme_config.yml (tiny_multi_step_lr), ...
    "dkel-shao2023-tinyimagenet": {
        "data.name": "prepared", "data.val_fraction": 0.0, "data.crop_pad": 4, "data.flip": True,
        "data.pad_mode": "zeros", "model.arch": "resnet18", "num_peers": 3, "method.name": "dkel",
        "method.temperature": 3.0, "method.alpha": 0.1, "method.decay": 0.5, "method.beta_floor": 0.01,
        "method.teacher_init_steps": 2, "method.ema_momentum": 0.999, "method.per_peer_views": True,
        "train.lr": 0.1, "train.batch_size": 128, "train.epochs": 100, "train.milestones": [30, 60],
        "train.gamma": 0.1, "train.weight_decay": 5e-4, "train.nesterov": True, "train.momentum": 0.9, "seed": 42,
    },
}


def preset(name, tmp_path, overrides=()):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    extra = [f"teacher.checkpoint={teacher}"] if name.startswith("kd-") else []
    return load_config(name, extra + list(overrides))


@pytest.mark.parametrize("name", sorted(SOURCE_VALUES))
def test_the_prepared_set_presets_carry_their_sources_values(name, tmp_path):
    config = preset(name, tmp_path)
    for path, expected in SOURCE_VALUES[name].items():
        node = config.num_peers if path == "num_peers" else config
        for part in path.split(".") if path != "num_peers" else ():
            node = getattr(node, part)
        assert node == expected, f"{name}: {path}"
    assert [p.arch for p in preset("kdcl-guo2020-imagenet", tmp_path).peers] == ["resnet50", "mobilenet_v2"]


@pytest.mark.parametrize("name", ["kd-torchdistill-imagenet", "kdcl-guo2020-imagenet"])
def test_the_imagenet_presets_build_their_networks_on_a_set_of_imagenets_layout(imagenet, tmp_path, name):
    """Each network of the preset, built from the reader's spec, takes a step's views of the prepared set."""
    from raydistill.models import build_model

    _, dest, _ = imagenet
    config = preset(name, tmp_path)
    assert PreparedSet(dest, **config.data.options).spec.input_shape == (3, 224, 224)
    data = PreparedSet(dest, crop_size=32).with_validation(0.25, seed=config.seed)   # 32 x 32 views: seconds
    assert data.spec.num_classes == 10
    x, y = data.batch("train", [0, 1])
    networks = [(p.arch, p.options) for p in config.peers] + [(t.arch, t.options) for t in config.teacher_list]
    for arch, options in networks:
        model = build_model(arch, data.spec, **options).eval()
        with torch.no_grad():
            assert model(data.train_view(x, config.seed, 0, 0, 0)).shape == (2, 10), arch
            assert model(data.eval_view(data.batch("val", [0])[0])).shape == (1, 10), arch


@pytest.mark.parametrize("name", ["kd-torchdistill-imagenet", "kdcl-guo2020-imagenet"])
def test_the_imagenet_presets_train_on_a_set_of_imagenets_layout(imagenet, tmp_path, name):
    """Each ImageNet preset, its networks at 32 x 32 views, trained one short epoch on the generated set in this
    process (the kd preset's teacher: an untrained ResNet-34 saved as torchvision's state dict is)."""
    from raydistill.models import build_model

    _, dest, _ = imagenet
    overrides = [f"data.root={dest}", "data.options.crop_size=32", "train.epochs=1", "train.batch_size=16",
                 "train.bf16=false", "train.channels_last=false", "resources.gpus_per_peer=0"]
    config = preset(name, tmp_path, overrides)
    if config.teacher_list:
        teacher = build_model("resnet34", PreparedSet(dest, crop_size=32).spec).net
        torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    summary = raydistill.train(config, tmp_path / "run", runtime="inprocess", progress=False).summary
    assert summary["epochs_completed"] == 1 and len(summary["peers"]) == config.num_peers
    assert all(0.0 <= peer["test_acc"] <= 1.0 for peer in summary["peers"])


def test_the_tinyimagenet_preset_trains_on_a_set_of_tinyimagenets_layout(tmp_path):
    """TinyImageNet's layout (train/<wnid>/images/, val/images/ + val_annotations.txt) prepared with the preset's
    crop-and-pad views, and the preset trained on it (one short epoch, in process)."""
    source = tmp_path / "tiny-imagenet-200"
    lines = []
    for c, wnid in enumerate(CLASSES[:4]):
        (source / "train" / wnid / "images").mkdir(parents=True)
        (source / "train" / wnid / f"{wnid}_boxes.txt").write_text("boxes beside images/ are not samples")
        for i in range(3):
            Image.new("RGB", (64, 64), colour(c)).save(source / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        (source / "val" / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), colour(c)).save(source / "val" / "images" / f"val_{c}.JPEG")
        lines.append(f"val_{c}.JPEG\t{wnid}\t0\t0\t63\t63")
    (source / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    dest = tmp_path / "tinyimagenet-32"                      # stored at 32 x 32: a test's seconds
    index = prepare(str(source), dest, size=32, workers=1, view="crop-pad=4", progress=Lines())
    assert index["view"] == {"kind": "crop_pad", "crop_pad": 4, "flip": True, "pad_mode": "zeros"}
    assert index["skipped"] == [] and PreparedSet(dest).labels("test").tolist() == [0, 1, 2, 3]
    overrides = [f"data.root={dest}", "train.epochs=1", "train.batch_size=4", "train.bf16=false",
                 "train.channels_last=false", "resources.gpus_per_peer=0"]
    config = preset("dkel-shao2023-tinyimagenet", tmp_path, overrides)
    summary = raydistill.train(config, tmp_path / "run", runtime="inprocess", progress=False).summary
    assert summary["epochs_completed"] == 1 and len(summary["peers"]) == 3
    assert all(0.0 <= peer["test_acc"] <= 1.0 for peer in summary["peers"])


def test_the_command_prepares_a_source_and_verifies_it(tmp_path, capsys):
    dest = tmp_path / "digits"
    assert main(["data", "prepare", "digits", str(dest), "--shard-mb", "0.03"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"prepare digits -> {dest}: 10 classes, train 1,438 and test 359 samples at 8 x 8")
    assert out[1] == "train shard 1/3 written (491 images; " + out[1].split("; ")[1]
    assert out[-1].startswith(f"prepared {dest}: train 1,438, test 359 images; 0 files skipped; digest ")
    digits, data = load_dataset("digits"), PreparedSet(dest)
    np.testing.assert_array_equal(data.arrays("train"), digits.train_x)       # one channel, 8 x 8, as the source
    assert data.view == {"kind": "crop_pad", "crop_pad": 1, "flip": False, "pad_mode": "zeros"}
    assert main(["data", "verify", str(dest)]) == 0
    assert capsys.readouterr().out.startswith(f"{dest}: every file matches its index (train 1,438, test 359 images")
