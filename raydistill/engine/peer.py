"""One peer: model, optimizer, schedule, its own view of the data. forward(step) and learn(targets), no Ray."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from raydistill.data.views import batch_indices, make_view, num_steps, to_float
from raydistill.engine.optim import learning_rate, make_optimizer
from raydistill.methods import build_method
from raydistill.models import build_model
from raydistill.seeding import derive_seed, seed_device

EVAL_BATCH = 512


def as_tensor(array: np.ndarray, device) -> torch.Tensor:
    """A tensor over a (possibly read-only, object-store-backed) numpy array: zero-copy on the CPU, never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # read-only buffers: we never write to them
        return torch.from_numpy(array).to(device)


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


class DataView:
    """The run's arrays on a device, and the batches and views every actor derives from (seed, epoch, step, view)."""

    def __init__(self, config, arrays: dict, device):
        self.config = config
        self.device = device
        self.x = {split: as_tensor(arrays[f"{split}_x"], device) for split in ("train", "val", "test")}
        self.y = {split: as_tensor(arrays[f"{split}_y"], device) for split in ("train", "val", "test")}
        self.crop_pad = config.data.crop_pad
        self.flip = config.data.flip
        self.steps_per_epoch = num_steps(len(self.x["train"]), config.train.batch_size)

    def batch(self, epoch: int, step: int):
        idx = batch_indices(self.config.seed, epoch, step, len(self.x["train"]), self.config.train.batch_size)
        return idx.to(self.device)

    def view(self, idx, epoch: int, step: int, view_index: int) -> torch.Tensor:
        return make_view(self.x["train"][idx], self.config.seed, epoch, step, view_index, self.crop_pad, self.flip)

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, split: str) -> np.ndarray:
        model.eval()
        x = self.x[split]
        chunks = [model(to_float(x[i:i + EVAL_BATCH])).float().cpu() for i in range(0, len(x), EVAL_BATCH)]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0,), np.float32)


class Peer:
    def __init__(self, index: int, config, arrays: dict, spec, device: str | None = None):
        torch.set_num_threads(config.resources.threads_per_peer)   # the same in both runtimes: bitwise equal runs
        self.index = index
        self.config = config
        self.settings = config.peers[index]
        self.device = torch.device(device) if device else pick_device(config.resources.gpus_per_peer)
        self.data = DataView(config, arrays, self.device)
        self.method = build_method(config)
        self.view_index = self.method.view_index(index)
        torch.manual_seed(derive_seed(config.seed, "init", "peer", index))
        self.model = build_model(self.settings.arch, spec, **self.settings.options).to(self.device)
        self.optimizer = make_optimizer(config.train, self.model.parameters(), self.settings.lr)
        self._pending = None

    # ---- the step protocol ---------------------------------------------------------------------------------------
    def forward(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """Runs the model on this peer's view of the step's batch; keeps the graph for learn(); returns detached outputs."""
        idx = self.data.batch(epoch, step)
        x = self.data.view(idx, epoch, step, self.view_index)
        seed_device(self.device, self.config.seed, "forward", self.index, epoch, step)   # dropout, in any order
        self.model.train()
        logits = self.model(x)
        self._pending = (epoch, step, logits, self.data.y["train"][idx])
        return {"logits": logits.detach().float().cpu().numpy()}

    def learn(self, epoch: int, step: int, targets: dict[str, np.ndarray]) -> dict[str, float]:
        """Loss against the coordinator's targets, backward, optimizer step. Returns small step metrics."""
        pending_epoch, pending_step, logits, labels = self._pending
        if (pending_epoch, pending_step) != (epoch, step):
            raise RuntimeError(f"peer {self.index}: learn({epoch}, {step}) after forward({pending_epoch}, {pending_step})")
        self._pending = None
        lr = learning_rate(self.config.train, self.settings.lr, epoch, step, self.data.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        hyper = self.method.hyper(epoch)
        targets = {name: as_tensor(value, self.device) for name, value in targets.items()}
        loss, terms = self.method.loss(hyper, {"logits": logits}, labels, targets)
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            self.optimizer.step()
        values = torch.stack([t.detach().float() for t in terms.values()]).cpu().tolist()   # one device sync
        metrics = dict(zip(terms, values))
        if self.config.task == "classification":
            metrics["acc"] = (logits.detach().argmax(1) == labels).float().mean().item()
        metrics.update(lr=lr, finite=float(finite), samples=float(len(labels)))
        return metrics

    # ---- evaluation, state ---------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> np.ndarray:
        return self.data.predict(self.model, split)

    def state_dict(self) -> dict:
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "optimizer": _to_cpu(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pending = None

    def export(self) -> dict:
        """The deployable models of this peer: name -> {kind, index, state (CPU state dict)}."""
        state = {k: v.cpu() for k, v in self.model.state_dict().items()}
        return {f"peer{self.index}": {"kind": "peer", "index": self.index, "state": state}}


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
