"""Codistillation (Anil et al. 2018): peers exchange weights every k steps, not outputs every step. No Ray.

Each worker keeps a stale copy of every peer (its model, and its EMA teacher where the method's targets read one),
refreshed from the peers' weights at every step of an epoch that is a multiple of ``method.codistill_every`` (and
after any state was loaded: a rollback or resume starts from an exchange). It is the training step's way of having
the other peers' outputs (engine/step.py, ``TrainingStep``'s ``others``): a peer's targets are computed from its own
live outputs and the other peers' outputs as their stale copies give them on the step's batch, each on that peer's
own view, so the result does not depend on which worker hosts which peer: co-located peers see each other stale too,
and ``codistill_every: 1`` is the per-step exchange, bit for bit (a forward changes no weight a copy computes with).
"""
from __future__ import annotations

import numpy as np
import torch

from raydistill.engine.step import Gathered
from raydistill.models import build_model
from raydistill.names import EMA_LOGITS, LOGITS, PEER
from raydistill.seeding import seed_device

INDEX = "index"


def weights_of(peer) -> dict[str, np.ndarray]:
    """What one peer sends at an exchange: its floating-point model state (and its EMA teacher's where the targets
    read EMA logits) as float32 arrays, with its index."""
    arrays = {INDEX: np.array([peer.index], np.float32)}
    models = {"model": peer.model}
    if EMA_LOGITS in peer.method.outputs_needed(PEER):
        models["ema"] = peer.self_teacher.model
    for prefix, model in models.items():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                arrays[f"{prefix}.{name}"] = np.ascontiguousarray(tensor.detach().float().cpu().numpy())
    return arrays


class StaleCopy:
    """Another peer as it was at the last exchange: its outputs on its own view of a step's batch, as its forward
    gives them (train mode, the same dropout seed), without a graph."""

    def __init__(self, index: int, config, spec, data, method, device):
        self.index = index
        self.config = config
        self.data = data                        # the worker's DataView: the same batches and views as its peers'
        self.device = device                    # a local peer's: where the copy computes
        settings = config.peers[index]
        self.id = settings.id                   # the peer's stable number: its view and dropout seed follow it
        self.view_index = method.view_index(self.id)
        self.needed = method.outputs_needed(PEER)
        self.models = {"model": build_model(settings.arch, spec, **settings.options).to(device)}
        if EMA_LOGITS in self.needed:
            self.models["ema"] = build_model(settings.arch, spec, **settings.options).to(device)
        for model in self.models.values():
            model.requires_grad_(False)

    def load(self, arrays: dict) -> None:
        with torch.no_grad():
            for prefix, model in self.models.items():
                for name, tensor in model.state_dict().items():
                    if tensor.is_floating_point():
                        tensor.copy_(torch.from_numpy(np.asarray(arrays[f"{prefix}.{name}"])).view_as(tensor))

    @torch.no_grad()
    def outputs(self, epoch: int, step: int, replay: int, autocast) -> dict[str, torch.Tensor]:
        x = self.data.view(epoch, step, self.view_index, replay, self.device)
        seed_device(self.device, self.config.seed, "forward", self.id, epoch, step)
        out = {}
        for prefix, key in (("model", LOGITS), ("ema", EMA_LOGITS)):
            if prefix in self.models:
                model = self.models[prefix]
                model.train()
                with autocast():
                    out[key] = model(x).float()
        return out


class Codistillation:
    """A worker's side of codistillation: the stale copies, the exchanges of weights, what each local peer's targets
    are computed from."""

    def __init__(self, config, spec, peers: list):
        self.config = config
        self.every = config.method.codistill_every
        self.peers = peers
        data, method, device = peers[0].data, peers[0].method, peers[0].device
        # a copy of every peer some local peer learns from (a worker's only peer needs none of itself)
        self.copies = {j: StaleCopy(j, config, spec, data, method, device) for j in range(config.num_peers)
                       if any(p.index != j for p in peers)}
        self.fresh = False                      # the copies hold the weights of the last exchange

    def invalidate(self) -> None:
        """After a state was loaded: the next step exchanges weights whatever its number."""
        self.fresh = False

    def exchange(self, gather) -> None:
        for arrays in gather("weights", [weights_of(p) for p in self.peers]):
            index = int(arrays[INDEX][0])
            if index in self.copies:
                self.copies[index].load(arrays)
        self.fresh = True

    def gather(self, exchange, epoch: int, step: int, replay: int, outputs: list[dict],
               peers: tuple) -> list[Gathered]:
        """Per local peer: its own live outputs (``outputs``, in the order of ``peers``) and the other peers' as their
        stale copies give them on this step, the copies refreshed through the exchange first where the step is due."""
        if step % self.every == 0 or not self.fresh:
            self.exchange(exchange.gather)
        live = dict(zip(peers, outputs))
        autocast = self.peers[0].autocast
        stale = {j: c.outputs(epoch, step, replay, autocast) for j, c in self.copies.items()}
        return [Gathered([live[j] if j == i else stale[j] for j in range(self.config.num_peers)], (i,))
                for i in peers]
