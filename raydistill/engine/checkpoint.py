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

from raydistill.files import DiskFull, disk_write

PATTERN = re.compile(r"^epoch_(\d{4,})$")
# A run's state, as the workers hand it over and a checkpoint holds it: every peer's (in peer order, peer_<i>.pt),
# the coordinator's (coordinator.pt) and, in a checkpoint, the loop's (loop.json).
PEERS, COORDINATOR, LOOP = "peers", "coordinator", "loop"


def members(state: dict) -> dict:
    """The part of a run's state the workers hold: the peers' and the coordinator's (not the loop's)."""
    return {PEERS: state[PEERS], COORDINATOR: state[COORDINATOR]}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    """The folder of the checkpoint after ``epoch`` epochs (epoch_0000: a run's starting state)."""
    return checkpoint_dir(run_dir) / f"epoch_{epoch:04d}"


def checkpoint_epoch(path: Path) -> int:
    """The number of epochs completed at a checkpoint folder."""
    return int(PATTERN.match(Path(path).name).group(1))


def save_checkpoint(run_dir: Path, epoch: int, state: dict, keep: int, keep_from: int | None = None) -> Path:
    """state: {"peers": [...], "coordinator": {...}, "loop": {json-able}}. epoch = the number of epochs completed.

    Written to a temporary folder and renamed. A checkpoint of the same epoch (a rerun after a rollback) is first
    renamed aside, never removed before the new one is in place: a crash at any moment leaves a whole checkpoint
    of every epoch that had one (list_checkpoints puts a set-aside folder back). The newest ``keep`` checkpoints
    stay, and with ``keep_from`` every one of that epoch or later too (a health rollback's possible targets)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".epoch_*.tmp"):          # what a crash in the middle of writing left
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_path(run_dir, epoch)
    tmp = root / f".epoch_{epoch:04d}.tmp"
    aside = root / f".epoch_{epoch:04d}.old"
    try:
        with disk_write(final):
            tmp.mkdir()
            for i, peer_state in enumerate(state[PEERS]):
                torch.save(peer_state, tmp / f"peer_{i}.pt")
            torch.save(state[COORDINATOR], tmp / "coordinator.pt")
            (tmp / "loop.json").write_text(json.dumps(state[LOOP]))
            _fsync_dir(tmp)
    except DiskFull:
        shutil.rmtree(tmp, ignore_errors=True)          # give back what the half-written checkpoint took
        raise
    if final.exists():                         # a rerun of the same epoch after a rollback
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        if keep_from is None or checkpoint_epoch(old) < keep_from:
            shutil.rmtree(old, ignore_errors=True)
    return final


def discard_after(run_dir: Path, epoch: int) -> None:
    """Removes the checkpoints of later epochs than ``epoch``: an attempt a health rollback abandoned, which a resume
    must never continue. Each is renamed to a temporary name first (one atomic step; the next save clears them)."""
    for path in reversed(list_checkpoints(run_dir)):
        if checkpoint_epoch(path) > epoch:
            doomed = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(doomed, ignore_errors=True)        # what a crash in the middle of a save left
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders, oldest first (a folder set aside by a save that crashed is put back first)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    for aside in root.glob(".epoch_*.old"):
        final = root / aside.name[1:-len(".old")]
        if not final.exists():
            os.replace(aside, final)
        else:                                 # the new one was in place when the save crashed: the old one goes
            shutil.rmtree(aside, ignore_errors=True)
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class _Unreadable(Exception):
    def __init__(self, file: Path, why: str):
        super().__init__(f"{file}: {why}")
        self.file, self.why = file, why


def _load(path: Path, num_peers: int) -> dict:
    def read(name: str):
        try:
            if name.endswith(".json"):
                return json.loads((path / name).read_text())
            return torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 — a truncated, corrupt or missing file: the same one-line answer
            raise _Unreadable(path / name, f"{type(err).__name__}: "
                                           f"{str(err).splitlines()[0] if str(err) else 'empty'}") from None

    loop = read("loop.json")
    count = len(loop["peers"]) if loop.get("peers") else num_peers    # the peers it was written with (elastic)
    return {PEERS: [read(f"peer_{i}.pt") for i in range(count)], COORDINATOR: read("coordinator.pt"), LOOP: loop}


def load_checkpoint(path: Path, num_peers: int) -> dict:
    """One checkpoint folder; an unreadable or incomplete one raises a ConfigError that names its file."""
    from raydistill.errors import ConfigError

    try:
        return _load(Path(path), num_peers)
    except _Unreadable as err:
        raise ConfigError("checkpoint", str(err.file), f"cannot be read ({err.why})") from None


def load_latest_checkpoint(path: Path, num_peers: int, single: bool = False) -> tuple[dict | None, list]:
    """The newest readable checkpoint of a run directory (or, with ``single``, the checkpoint folder ``path``):
    (state or None, [(folder, why it was skipped: its unreadable file and the error)...]). An unreadable newest
    checkpoint falls back to the one before."""
    from raydistill.errors import ConfigError

    if single:
        return load_checkpoint(path, num_peers), []
    skipped = []
    for folder in reversed(list_checkpoints(path)):
        try:
            return _load(folder, num_peers), skipped
        except _Unreadable as err:
            skipped.append((folder, f"{err.file.name}: {err.why}"))
    if skipped:
        folder, why = skipped[0]
        earlier = f" (nor {len(skipped) - 1} earlier)" if len(skipped) > 1 else ""
        raise ConfigError("--resume", str(path), f"no checkpoint can be read: {folder.name}/{why}{earlier}")
    return None, skipped


def _fsync_dir(path: Path) -> None:
    for item in path.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def check_compatible(config, spec, state: dict, source: str) -> None:
    """A checkpoint must hold, for every peer, exactly the parameters of the architecture the config names."""
    from raydistill.errors import ConfigError
    from raydistill.models import build_model

    if len(state[PEERS]) != config.num_peers:
        raise ConfigError("peers", config.num_peers, f"the checkpoint {source} holds {len(state[PEERS])} peers")
    for i, (peer, saved) in enumerate(zip(config.peers, state[PEERS])):
        expected = {k: tuple(v.shape) for k, v in build_model(peer.arch, spec, **peer.options).state_dict().items()}
        found = {k: tuple(v.shape) for k, v in saved["model"].items()}
        if expected != found:
            raise ConfigError(f"peers.{i}.arch", peer.arch,
                              f"does not match the checkpoint {source} (its parameters differ in names or shapes)")
    _check_teacher_adapters(config, spec, state, source)


def _check_teacher_adapters(config, spec, state: dict, source: str) -> None:
    """A student's adapters toward the teachers (fitnet) must be those of this config's teachers: as many, each of
    the shape its teacher's hint asks for; the error names the teacher that differs."""
    from raydistill.engine.hints import Hint, feature_paths, student_adapters, teacher_adapter_names
    from raydistill.errors import ConfigError
    from raydistill.methods import build_method
    from raydistill.models import build_model

    if build_method(config).feature_target != "teacher" or not config.num_teachers:
        return
    names = teacher_adapter_names(config.num_teachers)
    for i, (peer, saved) in enumerate(zip(config.peers, state[PEERS])):
        found = {}
        for key, value in (saved.get("adapters") or {}).items():
            name, _, rest = key.partition(".")
            found.setdefault(name, {})[rest] = tuple(value.shape)
        if sorted(found) != sorted(names):
            field = "teacher" if config.teacher is not None else "teachers"
            raise ConfigError(field, [t.arch for t in config.teacher_list],
                              f"the checkpoint {source} holds adapters toward {len(found)} teacher(s) "
                              f"({', '.join(sorted(found)) or 'none'}), this config has {config.num_teachers}")
        own = Hint(build_model(peer.arch, spec, **peer.options), feature_paths(config.method).get("student"),
                   "method.features.student", spec).shape
        expected = student_adapters(config, spec, i, own, "teacher")
        for j, name in enumerate(names):
            shapes = {k: tuple(v.shape) for k, v in expected[name].state_dict().items()}
            if shapes != found[name]:
                raise ConfigError(f"{config.teacher_field(j)}.arch", config.teacher_list[j].arch,
                                  f"does not match the checkpoint {source} (peer {i}'s adapter toward this teacher "
                                  "has other shapes)")
