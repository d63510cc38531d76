"""One real local Ray for the whole test run (token auth off inside tests only), and small run configs."""
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the suite runs hundreds of short runs in this process: a run's workers are kept warm for the next run of the same
# shape (runtime/driver.py WorkerPool), which saves starting a process and importing torch each time
os.environ.setdefault("RAYDISTILL_KEEP_WORKERS", "1")


def start_session_ray():
    import ray

    if not ray.is_initialized():
        # logical CPUs beyond the 2 real cores: a 3-peer run reserves 4 bundles of 1 CPU
        ray.init(address="local", num_cpus=8, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    yield start_session_ray()


def tiny_dml(**overrides) -> dict:
    """A 3-peer DML run on digits small enough for a few seconds per epoch on one core."""
    config = {"name": "tiny", "seed": 3, "data": {"name": "digits"}, "model": {"arch": "mlp", "options": {"hidden": [32]}},
              "peers": 3, "method": {"name": "dml"},
              "train": {"epochs": 1, "batch_size": 128, "lr": 0.05}}
    return set_keys(config, overrides)


def set_keys(config: dict, overrides: dict) -> dict:
    """Sets dotted keys (``train.epochs``) in a plain config mapping, creating sections as needed."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def write_config(path, config: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return str(path)


def one_line(text: str) -> str:
    """The single line a failing command prints."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def reference_view(x, seed, epoch, step, view_index, crop_pad, flip, mode="constant"):
    """make_view by a per-sample loop: F.pad (zeros, or mode="reflect"), crop at the drawn offset, flip if drawn,
    with make_view's random numbers in its order. Returns (views, flip bits)."""
    import torch
    import torch.nn.functional as F

    from raydistill.seeding import generator

    gen = generator(seed, "view", epoch, step, view_index)
    n, _, h, w = x.shape
    top = torch.randint(0, 2 * crop_pad + 1, (n,), generator=gen)
    left = torch.randint(0, 2 * crop_pad + 1, (n,), generator=gen)
    flips = torch.randint(0, 2, (n,), generator=gen)
    out = []
    for i in range(n):
        padded = F.pad(x[i:i + 1].float(), (crop_pad,) * 4, mode=mode)[0]     # reflect pads float input only
        crop = padded[:, top[i]:top[i] + h, left[i]:left[i] + w]
        if flip and flips[i]:
            crop = crop.flip(-1)
        out.append(crop / 255.0)
    return torch.stack(out), flips
