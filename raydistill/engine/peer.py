"""One peer: model, optimizer, schedule, optional EMA teacher, its view of the worker's data. forward(step) and
learn(targets) (engine/step.py's learn sequence), no Ray."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from raydistill.data.views import to_device
from raydistill.errors import ConfigError
from raydistill.engine.data import DataView, first_inputs
from raydistill.engine.grid import rows as grid_rows
from raydistill.engine.hints import student_adapters, student_hint, teacher_adapter_names
from raydistill.engine.optim import learning_rate, make_optimizer
from raydistill.engine.self_teacher import cpu_state, make_self_teacher
from raydistill.engine.step import StepFigures, learn
from raydistill.methods import build_method
from raydistill.methods.base import tensor_of
from raydistill.models import build_model
from raydistill.models.taps import FeatureTaps
from raydistill.names import ADAPTED_HINT, ALIGNED_HINTS, EMA_LOGITS, FEATURES, HINT, LOGITS, PEER, peer_name
from raydistill.seeding import derive_seed, seed_device


def compile_with_graphs(model: torch.nn.Module, device: torch.device, whole: bool = True) -> None:
    """``train.compile: graphs``: the model's forward and backward captured as CUDA graphs (torch.compile, mode
    "reduce-overhead"), in place, so its state dict keeps its names (``whole``: False checks the device only).
    Refused, in one line, where there is no GPU."""
    if device.type != "cuda":
        raise ConfigError("train.compile", "graphs", "none here: this worker has no CUDA device "
                          f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
    if whole:
        model.compile(mode="reduce-overhead")


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast of a forward pass on a GPU (``train.bf16``); a no-op on a CPU, where it would only be slower."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def as_tensors(value, device):
    """A target as tensors on a device: an array or a tensor, or a list of them (features of peers of different
    shapes). A tensor already there is itself; a host one moves without a host sync (``to_device``); an array,
    read-only ones too (the object store's), is never written."""
    if isinstance(value, (list, tuple)):
        return [as_tensors(v, device) for v in value]
    tensor = tensor_of(value)
    return tensor if tensor.device == torch.device(device) else to_device(tensor, device)


def check_trainable(config, spec, data, names=None) -> None:
    """Each peer architecture of a run (or of the peers ``names`` only) built and run forward and backward on two
    training samples on this process's CPU: an architecture that cannot take the data's inputs (a pooling that
    shrinks them below 1x1, a layer of the wrong width) is refused in one line before anything starts or changes.
    The global random state is left as it was. data: the run's data set (engine/data.py)."""
    from raydistill.errors import one_line

    x = first_inputs(data)
    seen = set()
    with torch.random.fork_rng(devices=[]):
        for i, (name, settings) in enumerate(zip(config.peer_names, config.peers)):
            key = (settings.arch, repr(sorted(settings.options.items())))
            if (names is not None and name not in names) or key in seen:
                continue
            seen.add(key)
            field = "model" if settings.arch == config.model.arch else f"peers.{i}"
            try:
                model = build_model(settings.arch, spec, **settings.options)
                model.train()
                model(x).float().sum().backward()
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001 — whatever the model raises, said in one line
                raise ConfigError(f"{field}.arch", settings.arch,
                                  f"cannot train on this data set's inputs {list(spec.input_shape)} with options "
                                  f"{dict(settings.options)} ({one_line(err)})") from None


class Peer:
    """One network in training: its model, optimizer and learning-rate schedule, its view of the data, the adapters it
    owns, and the teacher it keeps of itself (engine/self_teacher.py, chosen by the method). ``forward`` runs the
    model on the step's view and returns detached outputs; ``learn`` takes the coordinator's targets and steps."""

    def __init__(self, index: int, config, data, spec, device: str | None = None, method=None, rank: int = 0,
                 ranks: int = 1):
        """data: the worker's DataView, shared by its members (or the run's data set: a view of its own); method: the
        run's method object, shared by a worker's members (it holds no per-peer state); None builds one. rank of
        ranks: this replica's share of a peer of several ranks (engine/grid.py): its rows of every step's batch."""
        torch.set_num_threads(config.resources.threads_per_peer)   # the same in both runtimes: bitwise equal runs
        self.index = index
        self.config = config
        self.settings = config.peers[index]
        self.id = self.settings.id              # its stable number (peer<id>): seeds and names follow it, not its place
        self.name = peer_name(self.id)
        self.device = torch.device(device) if device else pick_device(config.resources.gpus_per_peer)
        self.data = DataView.of(config, data)
        self.rank, self.ranks = rank, ranks
        self.rows = grid_rows(config.train.batch_size, rank, ranks) if ranks > 1 else None
        self.method = method or build_method(config)
        self.view_index = self.method.view_index(self.id)
        self.spec = spec
        torch.manual_seed(derive_seed(config.seed, "init", "peer", self.id))
        self.model = build_model(self.settings.arch, spec, **self.settings.options).to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._pending = None
        self.self_teacher = make_self_teacher(self)     # built before the taps, so that its copy carries no hooks
        self.hint = None
        self.adapters = torch.nn.ModuleDict()
        self.teacher_adapters = []          # the names of its adapters toward the teachers, in teacher order
        if self.method.uses_hint:
            self.hint = student_hint(self.model, config, spec)
            self.adapters = student_adapters(config, spec, index, self.hint.shape,
                                             self.method.feature_target).to(self.device)
            if self.method.feature_target == "teacher":
                self.teacher_adapters = teacher_adapter_names(config.num_teachers)
            if self.method.self_teacher:
                self.self_teacher.attach_hint(self.hint.path)
        self.optimizer = self.make_optimizer()
        if config.train.compile == "graphs":     # stacked peers compile their batched forward instead (stack.py)
            compile_with_graphs(self.model, self.device, whole=config.resources.peer_execution != "stacked")
        taps = self.method.feature_taps()
        self.taps = FeatureTaps(self.model, taps) if taps else None
        self.local_targets = {}             # targets the peer makes itself (self-distillation's teacher outputs)

    @property
    def channels_last(self) -> bool:
        """``train.channels_last`` for an image model on a GPU (on a CPU it would only be slower)."""
        return self.config.train.channels_last and self.device.type == "cuda" and len(self.spec.input_shape) == 3

    def autocast(self):
        return autocast(self.device, self.config.train.bf16)

    def parameters(self) -> list:
        """What the optimizer trains: the model and the adapters the student owns."""
        return [*self.model.parameters(), *self.adapters.parameters()]

    def make_optimizer(self):
        """One optimizer over the model and the adapters the student owns."""
        return make_optimizer(self.config.train, self.parameters(), self.settings.lr)

    # ---- the step protocol ---------------------------------------------------------------------------------------
    def forward(self, epoch: int, step: int, replay: int = 0) -> dict[str, torch.Tensor]:
        """Runs the model on this peer's view of the step's batch (of the epoch's ``replay``-th replay); keeps the graph
        for learn(); returns detached float32 outputs on the peer's device (nothing is copied to the host: an
        exchange that carries arrays converts them, ``host_outputs``)."""
        self.self_teacher.before_forward(epoch)
        labels, x = self.step_input(epoch, step, replay)
        seed_device(self.device, self.config.seed, "forward", self.id, epoch, step,    # dropout, in any order
                    *(("rank", self.rank) if self.ranks > 1 else ()))
        self.model.train()
        with self.autocast():
            logits = self.model(x)
        return self.forward_outputs(epoch, step, labels, x, logits)

    def step_input(self, epoch: int, step: int, replay: int = 0):
        """(the step's labels, this peer's view of its batch), on the peer's device."""
        labels = self.data.labels(epoch, step, replay, self.device, self.rows)
        x = self.data.view(epoch, step, self.view_index, replay, self.device, self.rows)
        return labels, x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_outputs(self, epoch: int, step: int, labels, x, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keeps the forward's graph for learn() and returns what the peer sends (see ``forward``)."""
        tapped = (self.hint.value, self.hint.attention) if self.hint is not None else None
        self._pending = (epoch, step, logits, labels, tapped)
        outputs = {LOGITS: logits.detach().float()}
        needed = self.method.outputs_needed(PEER)
        if HINT in needed:
            outputs[HINT] = tapped[0].detach().float()
        if self.taps is not None:
            outputs[FEATURES] = self.taps.pooled().detach().float()
        teacher_logits = self.self_teacher.outputs(x)
        if EMA_LOGITS in needed:               # a self teacher's logits stay in the actor
            outputs[EMA_LOGITS] = teacher_logits
        if self.method.self_teacher:
            self.local_targets = self.self_teacher.local_targets(teacher_logits)
        return outputs

    def student_outputs(self, logits: torch.Tensor, tapped: tuple | None) -> dict:
        """What the method's loss reads of the student: logits, and from ``tapped`` = (hint, attention maps) its hint
        (with the adapters applied) and its attention-transfer maps."""
        outputs = {LOGITS: logits.float()}
        if tapped is None:
            return outputs
        hint, attention = tapped
        outputs[HINT] = hint.float()
        if attention:
            outputs["attention"] = [features.float() for features in attention]
        if self.teacher_adapters:          # one tensor for one teacher, a list in teacher order for several
            adapted = [self.adapters[name](outputs[HINT]) for name in self.teacher_adapters]
            outputs[ADAPTED_HINT] = adapted[0] if len(adapted) == 1 else adapted
        toward_peers = [name for name in self.adapters if name not in self.teacher_adapters]
        if toward_peers:
            outputs[ALIGNED_HINTS] = [self.adapters[name](outputs[HINT]) for name in toward_peers]
        return outputs

    def optimizer_step_due(self, step: int) -> bool:
        """Gradient accumulation: step every ``train.accumulate_steps`` batches and at the end of each epoch."""
        every = self.config.train.accumulate_steps
        return (step + 1) % every == 0 or step + 1 == self.data.steps_per_epoch

    def learn(self, epoch: int, step: int, targets: dict) -> StepFigures:
        """Loss against the coordinator's targets, backward, optimizer step when due (engine/step.py's ``learn``).
        Returns the step's figures, on the device."""
        return learn(self, epoch, step, targets)

    def after_step(self) -> None:
        """After an optimizer step: its self teacher's update."""
        self.self_teacher.after_step()

    def loss(self, epoch: int, step: int, targets: dict) -> tuple[torch.Tensor, StepFigures]:
        """The step's loss against the coordinator's targets (arrays or tensors), with the step's learning rate set
        in the optimizer; and the step's figures."""
        pending_epoch, pending_step, logits, labels, tapped = self._pending
        if (pending_epoch, pending_step) != (epoch, step):
            raise RuntimeError(f"peer {self.index}: learn({epoch}, {step}) after forward({pending_epoch}, {pending_step})")
        self._pending = None
        schedule, schedule_epoch = self.self_teacher.train_schedule(epoch)
        lr = learning_rate(schedule, self.settings.lr, schedule_epoch, step, self.data.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        hyper = self.method.hyper(epoch)
        targets = {name: as_tensors(value, self.device) for name, value in targets.items()}
        targets.update(self.local_targets)
        self.local_targets = {}
        loss, terms = self.method.loss(hyper, self.student_outputs(logits, tapped), labels, targets)
        figures = {name: value.detach().float() for name, value in terms.items()}
        if self.config.task == "classification":
            figures["acc"] = (logits.detach().argmax(1) == labels).float().mean()
        finite = torch.isfinite(loss.detach()).float()
        return loss, StepFigures(tuple(figures), torch.stack([*figures.values(), finite]), lr, float(len(labels)))

    # ---- evaluation, state ---------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, np.ndarray]:
        """The student's outputs on a split (LOGITS), and its EMA teacher's (EMA_LOGITS) where it has one."""
        return {LOGITS: self.data.predict(self.model, split, self.device), **self.self_teacher.evaluate(split)}

    def state_dict(self) -> dict:
        state = {"model": cpu_state(self.model), "optimizer": _to_cpu(self.optimizer.state_dict()),
                 **self.self_teacher.state_dict()}
        grads = [p.grad for p in self.parameters()]
        if any(g is not None for g in grads):       # between two optimizer steps of gradient accumulation
            state["accumulated_grads"] = [None if g is None else g.detach().to("cpu", copy=True) for g in grads]
        if len(self.adapters):
            state["adapters"] = cpu_state(self.adapters)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.self_teacher.load_state_dict(state)
        if len(self.adapters):
            self.adapters.load_state_dict(state["adapters"])
        self.optimizer = self.make_optimizer()            # (a born-again generation's own), then its saved state
        self.optimizer.load_state_dict(state["optimizer"])
        # a rollback point between two optimizer steps of gradient accumulation keeps what was accumulated so far
        for parameter, grad in zip(self.parameters(), state.get("accumulated_grads") or []):
            if grad is not None:
                parameter.grad = grad.to(parameter.device, copy=True)
        self._pending = None

    def export(self) -> dict:
        """The deployable models of this peer: name -> {kind, index, state (CPU state dict)}."""
        models = {self.name: {"kind": PEER, "index": self.index, "state": cpu_state(self.model)}}
        return {**models, **self.self_teacher.export()}


def _to_cpu(value):
    """A CPU copy: never the live tensors, or a rollback point kept in memory would move with training."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
