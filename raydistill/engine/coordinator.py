"""The coordinator: gathers a step's outputs, computes each peer's targets, and the peers' consistency. No Ray."""
from __future__ import annotations

import numpy as np
import torch

from raydistill.data.views import batch_indices
from raydistill.distill.losses import pairwise_kl
from raydistill.engine.evaluation import ensemble_outputs, score
from raydistill.methods import build_method


class Coordinator:
    def __init__(self, config, labels: dict[str, np.ndarray]):
        """labels: the train/val/test label arrays (the coordinator never needs images)."""
        torch.set_num_threads(config.resources.threads_per_peer)
        self.config = config
        self.labels = labels
        self.method = build_method(config)
        self.num_peers = config.num_peers

    def targets(self, epoch: int, step: int, *outputs: dict) -> list[dict[str, np.ndarray]]:
        """outputs: the peers' outputs, then the teachers'. Returns one target dict per peer."""
        peers, teachers = list(outputs[:self.num_peers]), list(outputs[self.num_peers:])
        idx = batch_indices(self.config.seed, epoch, step, len(self.labels["train"]), self.config.train.batch_size)
        return self.method.targets(self.method.hyper(epoch), peers, teachers, self.labels["train"][idx.numpy()])

    def evaluate(self, split: str, *outputs: np.ndarray) -> dict:
        """Figures of each peer, of their ensemble, and the consistency (mean pairwise KL between peers);
        outputs: the peers' outputs on the split, then the teachers'."""
        task, labels = self.config.task, self.labels[split]
        peers, teachers = outputs[:self.num_peers], outputs[self.num_peers:]
        result = {"peers": [score(task, out, labels) for out in peers],
                  "teachers": [score(task, out, labels) for out in teachers],
                  "ensemble": score(task, ensemble_outputs(task, list(peers)), labels) if len(peers) > 1 else {}}
        if task == "classification" and len(peers) > 1 and len(labels):
            result["consistency"] = pairwise_kl(torch.from_numpy(np.stack(peers))).item()
        return result

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
