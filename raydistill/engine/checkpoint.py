"""Checkpoints of a whole run: every peer, the coordinator and the loop, written to a temporary name and renamed.

Files load with ``torch.load(weights_only=True)``: only tensors and plain containers, never arbitrary pickles.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

PATTERN = re.compile(r"^epoch_(\d{4,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, epoch: int, state: dict, keep: int) -> Path:
    """state: {"peers": [...], "coordinator": {...}, "loop": {json-able}}. epoch = the number of epochs completed."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch:04d}"
    tmp = root / f".epoch_{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for i, peer_state in enumerate(state["peers"]):
        torch.save(peer_state, tmp / f"peer_{i}.pt")
    torch.save(state["coordinator"], tmp / "coordinator.pt")
    (tmp / "loop.json").write_text(json.dumps(state["loop"]))
    _fsync_dir(tmp)
    if final.exists():                         # a rerun of the same epoch after a rollback
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, num_peers: int) -> dict:
    path = Path(path)
    return {"peers": [torch.load(path / f"peer_{i}.pt", map_location="cpu", weights_only=True)
                      for i in range(num_peers)],
            "coordinator": torch.load(path / "coordinator.pt", map_location="cpu", weights_only=True),
            "loop": json.loads((path / "loop.json").read_text())}


def _fsync_dir(path: Path) -> None:
    for item in path.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def check_compatible(config, spec, state: dict, source: str) -> None:
    """A checkpoint must hold, for every peer, exactly the parameters of the architecture the config names."""
    from raydistill.errors import ConfigError
    from raydistill.models import build_model

    if len(state["peers"]) != config.num_peers:
        raise ConfigError("peers", config.num_peers, f"the checkpoint {source} holds {len(state['peers'])} peers")
    for i, (peer, saved) in enumerate(zip(config.peers, state["peers"])):
        expected = {k: tuple(v.shape) for k, v in build_model(peer.arch, spec, **peer.options).state_dict().items()}
        found = {k: tuple(v.shape) for k, v in saved["model"].items()}
        if expected != found:
            raise ConfigError(f"peers.{i}.arch", peer.arch,
                              f"does not match the checkpoint {source} (its parameters differ in names or shapes)")
