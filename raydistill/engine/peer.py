"""One peer: model, optimizer, schedule, optional EMA teacher, its own view of the data. forward(step) and
learn(targets), no Ray."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings

import numpy as np
import torch

from raydistill.data.views import batch_indices, make_view, num_steps, to_float
from raydistill.distill.ema import ema_update_
from raydistill.distill.losses import task_loss
from raydistill.engine.hints import Hint, feature_paths, student_adapters
from raydistill.engine.optim import learning_rate, make_optimizer
from raydistill.methods import build_method
from raydistill.models import build_model
from raydistill.models.taps import FeatureTaps
from raydistill.seeding import derive_seed, seed_device

EVAL_BATCH = 512


def as_tensor(array: np.ndarray, device) -> torch.Tensor:
    """A tensor over a (possibly read-only, object-store-backed) numpy array: zero-copy on the CPU, never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # read-only buffers: we never write to them
        return torch.from_numpy(array).to(device)


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast of a forward pass on a GPU (``train.bf16``); a no-op on a CPU, where it would only be slower."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def as_tensors(value, device):
    """A target as tensors: an array, or a list of arrays (features of peers of different shapes)."""
    if isinstance(value, (list, tuple)):
        return [as_tensor(v, device) for v in value]
    return as_tensor(value, device)


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
        self.spec = spec
        torch.manual_seed(derive_seed(config.seed, "init", "peer", index))
        self.model = build_model(self.settings.arch, spec, **self.settings.options).to(self.device)
        self._pending = None
        # the temporal-mean teacher (PCL, DKEL, self): built before the taps, so that it carries no hooks
        self.ema_model = self.make_ema_teacher() if self.method.uses_ema_teacher else None
        self.ema_updates = 0                # EMA updates since the teacher's init: the warm-up counter
        # born-again self-distillation: the previous generation's frozen student, and the generation of the weights
        self.snapshot = None
        self.generation = 0
        self.hint = self.teacher_hint = None
        self.adapters = torch.nn.ModuleDict()
        if self.method.uses_hint:
            paths = feature_paths(config.method)
            self.hint = Hint(self.model, paths.get("student"), "method.features.student", spec)
            self.adapters = student_adapters(config, spec, index, self.hint.shape,
                                             self.method.feature_target).to(self.device)
            if self.ema_model is not None and self.method.self_teacher:
                self.teacher_hint = Hint(self.ema_model, self.hint.path, "method.features.student", spec)
        self.optimizer = self.make_optimizer()
        taps = self.method.feature_taps()
        self.taps = FeatureTaps(self.model, taps) if taps else None
        self.local_targets = {}             # targets the peer makes itself (self-distillation's teacher outputs)

    def make_optimizer(self):
        """One optimizer over the model and the adapters the student owns."""
        return make_optimizer(self.config.train, self.parameters(), self.settings.lr)

    def make_ema_teacher(self) -> torch.nn.Module:
        """A copy of the student's initial weights, then ``method.teacher_init_steps`` CE steps at lr / 100 on this
        peer's views of the first batches of epoch 0 (DKEL's teacher init; 0 steps: a plain copy, as in PCL)."""
        teacher = copy.deepcopy(self.model)
        steps = self.config.method.teacher_init_steps or 0
        if steps:
            optimizer = make_optimizer(self.config.train, teacher.parameters(), self.settings.lr / 100)
            teacher.train()
            for k in range(steps):
                step = k % self.data.steps_per_epoch
                idx = self.data.batch(0, step)
                x = self.data.view(idx, 0, step, self.view_index)
                seed_device(self.device, self.config.seed, "teacher_init", self.index, k)
                loss = task_loss(teacher(x), self.data.y["train"][idx], self.config.task)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            teacher.zero_grad(set_to_none=True)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        return teacher

    # ---- born-again generations ---------------------------------------------------------------------------------
    def start_generation(self, generation: int) -> None:
        """Born-again: the current student becomes the frozen teacher, and a fresh student (new initialization,
        optimizer and learning-rate schedule) starts the next generation."""
        self.set_snapshot(self.model.state_dict())
        torch.manual_seed(derive_seed(self.config.seed, "init", "peer", self.index, "generation", generation))
        fresh = build_model(self.settings.arch, self.spec, **self.settings.options)
        self.model.load_state_dict(fresh.state_dict())       # in place: the taps and hooks stay on the student
        self.optimizer = self.make_optimizer()
        self.generation = generation

    def set_snapshot(self, state: dict | None) -> None:
        if state is None:
            self.snapshot = self.teacher_hint = None
            return
        snapshot = build_model(self.settings.arch, self.spec, **self.settings.options)   # fresh: no hooks
        snapshot.load_state_dict(state)
        self.snapshot = snapshot.to(self.device).eval()
        for parameter in self.snapshot.parameters():
            parameter.requires_grad_(False)
        if self.hint is not None:
            self.teacher_hint = Hint(self.snapshot, self.hint.path, "method.features.student", self.spec)

    def self_teacher_targets(self, x: torch.Tensor, ema_logits: torch.Tensor | None) -> dict:
        """Self-distillation: the outputs of the peer's own teacher (EMA or previous generation) on this view."""
        teacher = self.ema_model if self.ema_model is not None else self.snapshot
        if teacher is None:
            return {}                    # the first born-again generation: no teacher yet
        if ema_logits is None:
            with torch.no_grad(), autocast(self.device, self.config.train.bf16):
                ema_logits = teacher(x).float()
        targets = {"teacher_logits": ema_logits}
        if self.teacher_hint is not None:
            targets["teacher_hint"] = self.teacher_hint.value.detach().float()
        return targets

    def train_schedule(self, epoch: int):
        """(train config, epoch) of the learning-rate schedule: the run's, or the current generation's (born-again)."""
        if not (self.method.self_teacher and self.config.method.generations > 1):
            return self.config.train, epoch
        start = self.method.generation_start(epoch)
        last = self.method.generation(epoch) == self.config.method.generations - 1
        length = (self.config.train.epochs - start) if last else self.method.generation_epochs
        return dataclasses.replace(self.config.train, epochs=length), epoch - start

    # ---- the step protocol ---------------------------------------------------------------------------------------
    def forward(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """Runs the model on this peer's view of the step's batch; keeps the graph for learn(); returns detached outputs."""
        if self.method.self_teacher and self.config.method.generations > 1:
            generation = self.method.generation(epoch)
            if generation != self.generation:
                self.start_generation(generation)
        idx = self.data.batch(epoch, step)
        x = self.data.view(idx, epoch, step, self.view_index)
        seed_device(self.device, self.config.seed, "forward", self.index, epoch, step)   # dropout, in any order
        self.model.train()
        with autocast(self.device, self.config.train.bf16):
            logits = self.model(x)
        hint = self.hint.value if self.hint is not None else None
        self._pending = (epoch, step, logits, self.data.y["train"][idx], hint)
        outputs = {"logits": logits.detach().float().cpu().numpy()}
        needed = self.method.outputs_needed("peer")
        if "hint" in needed:
            outputs["hint"] = hint.detach().float().cpu().numpy()
        if self.taps is not None:
            outputs["features"] = self.taps.pooled().detach().float().cpu().numpy()
        ema_logits = None
        if self.ema_model is not None:
            # train mode, as the mean-teacher code: batch statistics, and the teacher's own BN running stats
            self.ema_model.train()
            with torch.no_grad(), autocast(self.device, self.config.train.bf16):
                ema_logits = self.ema_model(x).float()
            if "ema_logits" in needed:         # a self teacher's logits stay in the actor
                outputs["ema_logits"] = ema_logits.cpu().numpy()
        if self.method.self_teacher:
            self.local_targets = self.self_teacher_targets(x, ema_logits)
        return outputs

    def discard_step(self) -> None:
        """Drops the graph of a forward that will not learn (benchmarks)."""
        self._pending = None

    def student_outputs(self, logits: torch.Tensor, hint: torch.Tensor | None) -> dict:
        """What the method's loss reads of the student: logits, and its hint with the adapters applied."""
        outputs = {"logits": logits.float()}
        if hint is None:
            return outputs
        outputs["hint"] = hint.float()
        if "teacher" in self.adapters:
            outputs["adapted_hint"] = self.adapters["teacher"](outputs["hint"])
        others = [name for name in self.adapters if name.startswith("peer")]
        if others:
            outputs["aligned_hints"] = [self.adapters[name](outputs["hint"]) for name in others]
        return outputs

    def optimizer_step_due(self, step: int) -> bool:
        """Gradient accumulation: step every ``train.accumulate_steps`` batches and at the end of each epoch."""
        every = self.config.train.accumulate_steps
        return (step + 1) % every == 0 or step + 1 == self.data.steps_per_epoch

    def learn(self, epoch: int, step: int, targets: dict[str, np.ndarray]) -> dict[str, float]:
        """Loss against the coordinator's targets, backward, optimizer step. Returns small step metrics."""
        pending_epoch, pending_step, logits, labels, hint = self._pending
        if (pending_epoch, pending_step) != (epoch, step):
            raise RuntimeError(f"peer {self.index}: learn({epoch}, {step}) after forward({pending_epoch}, {pending_step})")
        self._pending = None
        schedule, schedule_epoch = self.train_schedule(epoch)
        lr = learning_rate(schedule, self.settings.lr, schedule_epoch, step, self.data.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        hyper = self.method.hyper(epoch)
        targets = {name: as_tensors(value, self.device) for name, value in targets.items()}
        targets.update(self.local_targets)
        self.local_targets = {}
        loss, terms = self.method.loss(hyper, self.student_outputs(logits, hint), labels, targets)
        accumulate = self.config.train.accumulate_steps
        finite = bool(torch.isfinite(loss))
        if finite:
            (loss / accumulate if accumulate > 1 else loss).backward()    # the mean gradient of the batches
            if self.optimizer_step_due(step):
                if self.config.train.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.parameters(), self.config.train.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema_model is not None:
                    self.ema_updates += 1
                    ema_update_(self.ema_model, self.model, self.method.ema_momentum(self.ema_updates))
        else:
            self.optimizer.zero_grad(set_to_none=True)
        figures = {name: value.detach().float() for name, value in terms.items()}
        if self.config.task == "classification":
            figures["acc"] = (logits.detach().argmax(1) == labels).float().mean()
        metrics = dict(zip(figures, torch.stack(list(figures.values())).cpu().tolist()))   # one transfer
        metrics.update(lr=lr, finite=float(finite), samples=float(len(labels)))
        return metrics

    # ---- evaluation, state ---------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, np.ndarray]:
        """The student's outputs on a split ("logits"), and its EMA teacher's ("ema_logits") where it has one."""
        outputs = {"logits": self.data.predict(self.model, split)}
        if self.ema_model is not None:
            outputs["ema_logits"] = self.data.predict(self.ema_model, split)
        return outputs

    def parameters(self) -> list:
        """What the optimizer trains: the model and the adapters the student owns."""
        return [*self.model.parameters(), *self.adapters.parameters()]

    def state_dict(self) -> dict:
        state = {"model": _cpu_state(self.model), "optimizer": _to_cpu(self.optimizer.state_dict())}
        grads = [p.grad for p in self.parameters()]
        if any(g is not None for g in grads):       # between two optimizer steps of gradient accumulation
            state["accumulated_grads"] = [None if g is None else g.detach().to("cpu", copy=True) for g in grads]
        if self.ema_model is not None:
            state.update(ema_teacher=_cpu_state(self.ema_model), ema_updates=self.ema_updates)
        if len(self.adapters):
            state["adapters"] = _cpu_state(self.adapters)
        if self.method.self_teacher and self.config.method.generations > 1:
            state.update(generation=self.generation,
                         snapshot=_cpu_state(self.snapshot) if self.snapshot is not None else None)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if "generation" in state:
            self.generation = int(state["generation"])
            self.set_snapshot(state["snapshot"])
            self.optimizer = self.make_optimizer()        # the generation's optimizer, then its state below
        if len(self.adapters):
            self.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        # a rollback point between two optimizer steps of gradient accumulation keeps what was accumulated so far
        for parameter, grad in zip(self.parameters(), state.get("accumulated_grads") or []):
            if grad is not None:
                parameter.grad = grad.to(parameter.device, copy=True)
        if self.ema_model is not None:
            if "ema_teacher" not in state:
                raise ValueError(f"peer {self.index}: the checkpoint holds no EMA teacher, but method "
                                 f"{self.method.name} keeps one")
            self.ema_model.load_state_dict(state["ema_teacher"])
            self.ema_updates = int(state["ema_updates"])
        self._pending = None

    def export(self) -> dict:
        """The deployable models of this peer: name -> {kind, index, state (CPU state dict)}."""
        models = {f"peer{self.index}": {"kind": "peer", "index": self.index, "state": _cpu_state(self.model)}}
        if self.ema_model is not None:
            models[f"peer{self.index}_ema"] = {"kind": "ema_teacher", "index": self.index,
                                               "state": _cpu_state(self.ema_model)}
        return models


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _to_cpu(value):
    """A CPU copy: never the live tensors, or a rollback point kept in memory would move with training."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
