"""The coordinator: gathers a step's outputs, computes each peer's targets, and the peers' consistency. No Ray."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.distill.losses import pairwise_kl
from raydistill.engine.data import DataView
from raydistill.engine.evaluation import ensemble_outputs, score
from raydistill.engine.optim import learning_rate, make_optimizer
from raydistill.engine.peer import _to_cpu, as_tensors
from raydistill.methods import build_method
from raydistill.seeding import generator
from raydistill.names import EMA_LOGITS, FEATURES, LOGITS


class EnsembleHead:
    """PCL's peer ensemble teacher, as a distributed run can have it: one linear layer over the concatenated, detached
    pooled features of the peers, trained in the coordinator with CE by its own optimizer (the run's optimizer settings
    and learning-rate schedule). Its gradient stops here: the peers learn only from its logits."""

    def __init__(self, config, num_classes: int, steps_per_epoch: int):
        self.config = config
        self.num_classes = num_classes
        self.steps_per_epoch = steps_per_epoch
        self.layer: torch.nn.Linear | None = None      # built at the first step, when the feature width is known
        self.optimizer = None
        self.device = None                              # the device its state loads onto: where it ran last

    def build(self, in_features: int, device=None) -> None:
        self.layer = torch.nn.Linear(in_features, self.num_classes)
        bound = 1.0 / math.sqrt(in_features)            # torch's default init, drawn from the run's seed
        draws = generator(self.config.seed, "init", "ensemble_head")
        with torch.no_grad():
            for tensor in (self.layer.weight, self.layer.bias):
                tensor.uniform_(-bound, bound, generator=draws)
        self.layer.to(device or "cpu")              # drawn on the CPU, so every device starts from the same numbers
        self.optimizer = make_optimizer(self.config.train, self.layer.parameters(), self.config.train.lr)

    def step(self, epoch: int, step: int, features: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The head's logits on this step's features (the target), then one CE step of the head on them. It lives on
        the features' device; a non-finite loss is not looked at here (that would wait for the device): the run stops or
        rolls back at the end of the call, whatever the head did."""
        x = torch.cat(features, dim=1)
        y = labels.long()
        if self.layer is None:
            self.build(x.shape[1], x.device)
        elif self.layer.weight.device != x.device:          # loaded elsewhere (a checkpoint holds CPU tensors)
            state, self.device = self.state_dict(), x.device
            self.load_state_dict(state)
        lr = learning_rate(self.config.train, self.config.train.lr, epoch, step, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = self.layer(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits.detach()

    def state_dict(self) -> dict:
        if self.layer is None:
            return {}
        return {"layer": _to_cpu(self.layer.state_dict()), "optimizer": _to_cpu(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.layer = self.optimizer = None
            return
        self.build(state["layer"]["weight"].shape[1], self.device)
        self.layer.load_state_dict(state["layer"])
        self.optimizer.load_state_dict(state["optimizer"])


class Coordinator:
    def __init__(self, config, data, spec, method=None):
        """data: the worker's DataView (or the run's data set: a view of its own); the coordinator reads its labels,
        never an image. method: the worker's method object (None: its own)."""
        torch.set_num_threads(config.resources.threads_per_peer)
        self.config = config
        self.data = DataView.of(config, data)
        self.method = method or build_method(config)
        self.num_peers = config.num_peers
        self.head = None
        self.val_losses = [[] for _ in range(self.num_peers)]   # each peer's validation loss per epoch
        if self.method.learned_head:
            self.head = EnsembleHead(config, spec.num_classes, self.data.steps_per_epoch)

    def batch_labels(self, epoch: int, step: int, replay: int = 0, device="cpu", rows=None) -> torch.Tensor:
        """The labels of a step's batch (of its ``rows``), on a device: those of the very indices every peer draws."""
        return self.data.labels(epoch, step, replay, device, rows)

    def targets(self, epoch: int, step: int, *outputs: dict, replay: int = 0, rows=None) -> list[dict]:
        """outputs: the peers' outputs, then the teachers' (tensors on a device, or host arrays), on the step's batch
        (a rank of a peer of several ranks: on its ``rows``). Returns one target dict of tensors per peer, on the
        device of the outputs (of the first tensor among them; else the CPU)."""
        device = _device_of(outputs)
        outputs = [{k: as_tensors(v, device) for k, v in o.items()} for o in outputs]
        peers, teachers = outputs[:self.num_peers], outputs[self.num_peers:]
        labels = self.batch_labels(epoch, step, replay, device, rows)
        learned = None
        if self.head is not None:
            learned = self.head.step(epoch, step, [p[FEATURES] for p in peers], labels)
        targets = self.method.targets(self.method.hyper(epoch), peers, teachers, labels, learned)
        targets = self.method.with_peer_losses(targets, self.val_losses)
        return targets

    def evaluate(self, split: str, *outputs) -> dict:
        """Figures of each peer, of each peer's EMA teacher, of the peers' ensemble (mean of the students'
        probabilities), and the consistency (mean pairwise KL between peers).
        outputs: the peers' outputs on the split (dicts: logits, ema_logits), then the teachers' (arrays)."""
        task, labels = self.config.task, self.data.split_labels(split)
        peer_outputs = [out if isinstance(out, dict) else {LOGITS: out} for out in outputs[:self.num_peers]]
        peers = [out[LOGITS] for out in peer_outputs]
        teachers = [out[LOGITS] if isinstance(out, dict) else out for out in outputs[self.num_peers:]]
        result = {"peers": [score(task, out, labels) for out in peers],
                  "ema_teachers": [score(task, out[EMA_LOGITS], labels) for out in peer_outputs
                                   if EMA_LOGITS in out],
                  "teachers": [score(task, out, labels) for out in teachers],
                  "ensemble": score(task, ensemble_outputs(task, list(peers)), labels) if len(peers) > 1 else {}}
        if task == "classification" and len(peers) > 1 and len(labels):
            result["consistency"] = pairwise_kl(torch.from_numpy(np.stack(peers))).item()
        if split == "val" and len(labels):
            loss_key = "mse" if task == "regression" else "loss"     # the task loss: what performance weights read
            for history, figures in zip(self.val_losses, result["peers"]):
                history.append(figures[loss_key])
        return result

    def state_dict(self) -> dict:
        state = {"ensemble_head": self.head.state_dict()} if self.head is not None else {}
        if self.method.uses_peer_losses:
            state["val_losses"] = [list(history) for history in self.val_losses]
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.head is not None:
            self.head.load_state_dict(state.get("ensemble_head", {}))
        if "val_losses" in state:
            self.val_losses = [list(history) for history in state["val_losses"]]


def _device_of(outputs) -> torch.device:
    for output in outputs:
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value.device
    return torch.device("cpu")

