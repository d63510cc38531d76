"""One real local Ray for the whole test run (token auth off inside tests only), and small run configs."""
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return config
