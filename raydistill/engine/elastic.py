"""Elastic peers: a run's state carried over to another set of peers. No Ray.

One function does it for both ways a peer set changes: a running run asked by ``raydistill peers add|remove`` (the
loop, between two epochs, on its in-memory state) and ``raydistill train --resume DIR --set peers=...`` (from a
checkpoint). Peers are matched by name (peer<id>); a peer that leaves keeps its records, and its deployable models
from its last epoch go to the run's export; a peer that joins starts from scratch, from a copy of a peer
(``peer:K``), or from scratch distilled for a few steps toward the current ensemble's probabilities (``ensemble``).
Because the same code runs on the same state in the driver's process, a live change and the same change made offline
give the same parameters.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from raydistill.engine.optim import make_optimizer
from raydistill.engine.checkpoint import COORDINATOR, LOOP, PEERS
from raydistill.engine.peer import Peer
from raydistill.engine.self_teacher import EmaTeacher
from raydistill.errors import ConfigError
from raydistill.names import peer_id, peer_name
from raydistill.methods import build_method
from raydistill.models import build_model

ENSEMBLE_INIT_STEPS = 50          # distillation steps of a peer that joins with init: ensemble
RETIRED_DIR = "retired"           # run directory: the deployable models of the peers that left, until the export


def check_elastic(config) -> None:
    """A method that keeps per-peer state in its coordinator, or whose peers own adapters toward every other peer,
    cannot change its peer set: one line naming the field and what allows it (the method says so itself)."""
    build_method(config).check_peer_change()


PEER_INITS = ("scratch", "ensemble", "peer:K")


def check_peer_ids(config) -> None:
    """Each peer's stable id (peer<id>), and what a peer new to a checkpoint starts from (``init``)."""
    seen = set()
    for i, peer in enumerate(config.peers):
        if isinstance(peer.id, bool) or not isinstance(peer.id, int) or peer.id < 0 or peer.id in seen:
            raise ConfigError(f"peers.{i}.id", peer.id, "must be a whole number >= 0, unique among the peers "
                              "(or null: the next unused number)")
        seen.add(peer.id)
        init = peer.init
        if init is not None and init not in ("scratch", "ensemble") and not (
                isinstance(init, str) and init.startswith("peer:") and init[5:].isdigit()):
            raise ConfigError(f"peers.{i}.init", init, f"one of: {', '.join(PEER_INITS)} (K: a peer's number)")


def names_of(state: dict) -> list[str]:
    """The names of a state's peers (peer_<i>.pt in order); checkpoints from before names: peer<place>."""
    return list(state[LOOP].get("peers") or [peer_name(i) for i in range(len(state[PEERS]))])


def ever_used(state: dict) -> set[int]:
    """Every peer number the run has given out: its peers now and every peer that joined or left."""
    names = set(names_of(state)) | {c["peer"] for c in state[LOOP].get("changes", [])}
    return {peer_id(name) for name in names}


def renumber(config, state: dict):
    """A peer new to the state whose number the run has used before (a removed peer's) takes the next never-used
    number: a removed peer's name is never reused."""
    current = set(names_of(state))
    used = ever_used(state)
    config = copy.deepcopy(config)
    for peer in config.peers:
        if peer_name(peer.id) not in current and peer.id in used:
            peer.id = max(used) + 1
        used.add(peer.id)
    return config


def check_inits(config, state: dict | None) -> None:
    """``peers[i].init`` is read for a peer new to a checkpoint only; anywhere else it would be silently ignored."""
    present = set(names_of(state)) if state is not None else set()
    for i, (name, peer) in enumerate(zip(config.peer_names, config.peers)):
        if peer.init is not None and (state is None or name in present):
            where = f"{name} is in the checkpoint already" if state is not None else "a new run has no checkpoint"
            raise ConfigError(f"peers.{i}.init", peer.init, f"{where}; init starts a peer added to a checkpoint "
                              "(raydistill peers add, or train --resume DIR --set peers.N.init=...)")


def consumed(config):
    """The config once its new peers are built: their init has been carried out (summary.json's peer_changes keeps
    it), so config.yaml does not carry it into a later run."""
    config = copy.deepcopy(config)
    for peer in config.peers:
        peer.init = None
    return config


def _model(settings, spec, state: dict, device):
    model = build_model(settings.arch, spec, **settings.options).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


def distill_from_ensemble(peer: Peer, old_config, old_states: list, spec, epoch: int) -> None:
    """A few steps of the new peer toward the mean of the current peers' probabilities (regression: predictions) on
    the run's own batches and views of ``epoch``; then a fresh optimizer, as a peer from scratch has, and an EMA
    teacher (pcl, dkel) that is a copy of the distilled weights."""
    teachers = [_model(s, spec, st, peer.device) for s, st in zip(old_config.peers, old_states)]
    optimizer = make_optimizer(peer.config.train, peer.model.parameters(), peer.settings.lr)
    peer.model.train()
    for k in range(ENSEMBLE_INIT_STEPS):                 # the batches of epoch ``epoch`` on, in the run's order
        at, step = epoch + k // peer.data.steps_per_epoch, k % peer.data.steps_per_epoch
        x = peer.data.view(at, step, peer.view_index, device=peer.device)
        with torch.no_grad():
            outputs = [t(x) for t in teachers]
        student = peer.model(x)
        if peer.config.task == "regression":
            loss = F.mse_loss(student, torch.stack(outputs).mean(0))
        else:
            target = torch.stack([F.softmax(o, dim=1) for o in outputs]).mean(0)
            loss = F.kl_div(F.log_softmax(student, dim=1), target, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peer.model.zero_grad(set_to_none=True)
    peer.optimizer = peer.make_optimizer()
    if isinstance(peer.self_teacher, EmaTeacher):       # its EMA teacher starts from the distilled weights
        peer.self_teacher.ema.load_state_dict(peer.model.state_dict())


def change_peers(old_config, new_config, state: dict, spec, data) -> tuple[dict, dict, list]:
    """state: {peers, coordinator, loop} of the old peer set; data: the run's data set (the new peers are built in
    this process, over a view of their own). Returns (the new set's state, the departing peers' deployable models
    {name: export entry with its settings}, the change events). Raises ConfigError for a change that cannot be
    made."""
    check_elastic(new_config)
    loop = copy.deepcopy(state[LOOP])
    old_names = names_of(state)
    old_settings = dict(zip(old_names, old_config.peers))
    placed = dict(zip(old_names, state[PEERS]))
    epoch = loop["epochs_completed"]
    peers, events = [], []
    for i, (name, settings) in enumerate(zip(new_config.peer_names, new_config.peers)):
        if name in placed:
            if settings.init is not None:
                raise ConfigError(f"peers.{i}.init", settings.init, f"{name} is in the checkpoint already; init "
                                  "starts a peer added to it")
            if settings.arch != old_settings[name].arch:
                raise ConfigError(f"peers.{i}.arch", settings.arch, f"{name} trains {old_settings[name].arch}; a "
                                  "peer's arch cannot change (add a new peer instead)")
            peers.append(placed[name])
            continue
        init = settings.init or "scratch"
        if init.startswith("peer:"):
            source = peer_name(int(init[len("peer:"):]))
            if source not in placed:
                raise ConfigError(f"peers.{i}.init", init, f"copies a peer of the run ({', '.join(old_names)})")
            if old_settings[source].arch != settings.arch:
                raise ConfigError(f"peers.{i}.init", init, f"{source} is a {old_settings[source].arch}, "
                                  f"this peer a {settings.arch}")
            peers.append(copy.deepcopy(placed[source]))
        else:
            peer = Peer(i, new_config, data, spec, device="cpu")
            if init == "ensemble":
                distill_from_ensemble(peer, old_config, state[PEERS], spec, epoch)
            peers.append(peer.state_dict())
        events.append({"epoch": epoch, "action": "add", "peer": name, "arch": settings.arch, "init": init})
    retired = {}
    for i, name in enumerate(old_names):
        if name not in new_config.peer_names:
            retired.update(_exports(old_config, i, state[PEERS][i], spec, data))
            events.append({"epoch": epoch, "action": "remove", "peer": name, "arch": old_settings[name].arch})
    if new_config.num_peers != old_config.num_peers and state[COORDINATOR]:
        raise ConfigError("peers", new_config.num_peers, "the coordinator keeps per-peer state for this method")
    loop["peers"] = new_config.peer_names
    loop["changes"] = [*loop.get("changes", []), *events]
    return {PEERS: peers, COORDINATOR: state[COORDINATOR], LOOP: loop}, retired, events


def _exports(config, index: int, peer_state: dict, spec, data) -> dict:
    """A departing peer's deployable models (its own, and its EMA teacher's), with its settings for the manifest."""
    peer = Peer(index, config, data, spec, device="cpu")
    peer.load_state_dict(peer_state)
    settings = dataclasses.asdict(config.peers[index])
    return {name: {**entry, "index": None, "settings": settings} for name, entry in peer.export().items()}


def save_retired(run_dir, retired: dict) -> None:
    """Each departing model to RUN/retired/NAME.pt (temporary name, then renamed), until the run's export."""
    folder = Path(run_dir) / RETIRED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in retired.items():
        tmp = folder / f".{name}.pt.tmp"
        torch.save(entry, tmp)
        os.replace(tmp, folder / f"{name}.pt")


def load_retired(run_dir, names: list[str]) -> dict:
    """The departed models the run's export lists beside its current ones (only those the loop state names)."""
    folder = Path(run_dir) / RETIRED_DIR
    found = {}
    for name in names:
        for path in (folder / f"{name}.pt", folder / f"{name}_ema.pt"):
            if path.is_file():
                found[path.stem] = torch.load(path, map_location="cpu", weights_only=True)
    return found
