"""The teacher output cache: the outputs read back are exactly the live teacher's for the same views."""
import numpy as np
import torch

from raydistill.config import load_config
from raydistill.engine.data import load_run_data
from raydistill.engine.teacher import Teacher
from raydistill.engine.teacher_cache import CachedTeacher, read_epoch, read_key
from raydistill.models import build_model


def _teacher(tmp_path, seed=3, arch="mlp"):
    config = {"seed": seed, "data": {"name": "digits"}, "model": {"arch": "mlp", "options": {"hidden": [16]}},
              "peers": 2, "method": {"name": "kd", "per_peer_views": True},
              "teacher": {"arch": arch, "checkpoint": str(tmp_path / "teacher.pt")},
              "train": {"epochs": 2, "batch_size": 256}}
    spec, arrays = load_run_data(load_config(config | {"teacher": None, "method": {"name": "dml"}}))
    torch.manual_seed(0)
    torch.save(build_model(arch, spec).state_dict(), tmp_path / "teacher.pt")
    return Teacher(0, load_config(config), arrays, spec)


def test_cached_outputs_equal_live_outputs_for_the_same_views(tmp_path):
    teacher = _teacher(tmp_path)
    assert teacher.views == [0, 1]                        # two students, each on its own augmented view
    cached = CachedTeacher(teacher, tmp_path / "cache")
    steps = teacher.data.steps_per_epoch
    for epoch in (0, 1):
        for step in range(steps):
            live = teacher.forward(epoch, step)["logits"]
            got = cached.forward(epoch, step)["logits"]
            assert got.shape == live.shape == (2, 256, 10)
            np.testing.assert_array_equal(got, live)
    assert cached.computed_epochs == [0, 1]
    # the views differ between epochs and between students: the cache is keyed by all of them
    assert not np.array_equal(cached.forward(0, 0)["logits"][0], cached.forward(0, 0)["logits"][1])
    assert not np.array_equal(cached.forward(0, 0)["logits"], cached.forward(1, 0)["logits"])
    assert read_epoch(cached.path(0))["logits"].shape == (steps, 2, 256, 10)


def test_a_second_reader_streams_the_files_and_a_changed_teacher_recomputes(tmp_path):
    teacher = _teacher(tmp_path)
    first = CachedTeacher(teacher, tmp_path / "cache")
    first.precompute([0])
    again = CachedTeacher(teacher, tmp_path / "cache")
    np.testing.assert_array_equal(again.forward(0, 1)["logits"], teacher.forward(0, 1)["logits"])
    assert again.computed_epochs == []                    # read, not recomputed
    with torch.no_grad():
        next(teacher.model.parameters()).add_(1.0)        # other weights: the old file no longer belongs to them
    changed = CachedTeacher(teacher, tmp_path / "cache")
    assert read_key(changed.path(0)) != changed.key
    np.testing.assert_array_equal(changed.forward(0, 1)["logits"], teacher.forward(0, 1)["logits"])
    assert changed.computed_epochs == [0]
