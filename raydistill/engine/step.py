"""The training step, written once: forward -> gather -> targets -> learn, and a call of such steps. No Ray.

Every way a worker trains runs ``TrainingStep``: a worker over a collective exchange or alone in its process, its peers
one after another or stacked into one batched model, codistillation; the bench and the GPU checks run it too.
- forward: every local member (peer or teacher) on its view of the step's batch (``LocalMembers.forward``);
- gather: the outputs each local peer's targets are computed from. Through the exchange (``THROUGH_EXCHANGE``): every
  member's outputs, in member order (peers 0..N-1, then teachers), the same for all local peers. From stale copies
  (codistillation, engine/codistill.py): per local peer, its own live outputs and the other peers' as their copies
  give them;
- targets: the coordinator's target logic over each gathered list (its replica in this worker);
- learn: each local peer's loss, backward and optimizer step (``learn``: the one learn sequence of a Peer and of a
  PeerStack).
Nothing in a step waits for the device: outputs, targets, losses and figures stay where they were computed, and a
call's figures are read once, at its end (``CallReport.finish``). The object-store transport drives the two halves
of the step from the driver instead (engine/worker.py's ``forward`` and ``learn``, over the same ``LocalMembers``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


def to_host(value):
    """A tensor (or a list of them) as host arrays: what crosses a process (an exchange, the object store)."""
    if isinstance(value, (list, tuple)):
        return [to_host(v) for v in value]
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def host_outputs(outputs: dict) -> dict:
    """A member's outputs (or a peer's targets) with every tensor copied to a host array."""
    return {name: to_host(value) for name, value in outputs.items()}


# ---- a step's figures, and a call's ----------------------------------------------------------------------------------
@dataclass
class StepFigures:
    """One peer's figures of one step as they come out of its loss: the named values and, last, whether the loss was
    finite (1 or 0), in one device tensor (read at the end of a call of steps, never per step); the learning rate
    and the sample count (host numbers)."""
    keys: tuple
    values: torch.Tensor                # [len(keys) + 1]
    lr: float
    samples: float

    def host(self, values: list | None = None) -> dict[str, float]:
        """The figures as numbers; values: what was read of ``values`` already (else a host sync here: for a
        transport that hands them over step by step)."""
        values = self.values.cpu().tolist() if values is None else values
        metrics = dict(zip(self.keys, values))
        metrics.update(lr=self.lr, finite=float(values[-1]), samples=self.samples)
        return metrics


@dataclass
class PeerFigures:
    """One peer's step figures summed over steps, each weighted by the step's samples. Within a call of steps each
    step's figures stay a device tensor (``add_device``: a reference kept, no work on the device) until ``finish``
    reads them all at once and sums them as numbers, in step order and float64, as figures handed over step by step
    (the object-store transport, ``add``) are: the same sums, bit for bit."""
    sums: dict = field(default_factory=dict)
    samples: float = 0.0
    pending: list = field(default_factory=list)         # the call's StepFigures, in step order

    def add(self, metrics: dict) -> None:
        n = metrics["samples"]
        for key, value in metrics.items():
            if key not in ("samples", "finite"):
                self.sums[key] = self.sums.get(key, 0.0) + value * n
        self.samples += n

    def add_device(self, figures: StepFigures) -> None:
        self.pending.append(figures)

    def finish(self) -> list[bool]:
        """Reads the call's figures (one copy per set of names) and adds them up; returns each step's finiteness."""
        by_keys, rows = {}, [None] * len(self.pending)
        for i, figures in enumerate(self.pending):
            by_keys.setdefault(figures.keys, []).append(i)
        for steps in by_keys.values():
            for i, values in zip(steps, torch.stack([self.pending[i].values for i in steps]).cpu().tolist()):
                rows[i] = self.pending[i].host(values)
        for row in rows:
            self.add(row)
        self.pending = []
        return [bool(row["finite"]) for row in rows]

    def merge(self, other: "PeerFigures") -> None:
        for key, value in other.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.samples += other.samples

    def means(self) -> dict:
        return {key: value / self.samples for key, value in self.sums.items()}


@dataclass
class CallReport:
    """What a call of steps returns: each local peer's summed figures, and where a loss was not finite."""
    peers: dict = field(default_factory=dict)            # peer index -> PeerFigures
    nonfinite: list = field(default_factory=list)        # (epoch, step, peer index), in step order
    steps: dict = field(default_factory=dict)            # peer index -> the (epoch, step) of its pending figures

    def add_step(self, epoch: int, step: int, metrics: dict) -> None:
        """metrics: peer index -> that peer's step metrics as numbers (StepFigures.host)."""
        for index, m in metrics.items():
            self.peers.setdefault(index, PeerFigures()).add(m)
            if not m["finite"]:
                self.nonfinite.append((epoch, step, index))

    def add_device_step(self, epoch: int, step: int, figures: dict) -> None:
        """figures: peer index -> that peer's StepFigures, kept on the device until ``finish``."""
        for index, f in figures.items():
            self.peers.setdefault(index, PeerFigures()).add_device(f)
            self.steps.setdefault(index, []).append((epoch, step))

    def finish(self) -> "CallReport":
        """Reads what stayed on the device at the end of a call: the figures, and each peer's first non-finite step
        (a peer's later steps went on from a broken state and are not reported)."""
        for index, figures in self.peers.items():
            finite = figures.finish()
            broken = [at for at, ok in zip(self.steps.get(index, []), finite) if not ok]
            if broken:
                self.nonfinite.append((*broken[0], index))
        self.steps = {}
        self.nonfinite.sort(key=lambda entry: (entry[0], entry[1], entry[2]))
        return self

    def merge(self, other: "CallReport") -> "CallReport":
        for index, figures in other.peers.items():
            self.peers.setdefault(index, PeerFigures()).merge(figures)
        self.nonfinite.extend(other.nonfinite)
        return self

    def copy(self) -> "CallReport":
        return CallReport({i: dataclasses.replace(f, sums=dict(f.sums)) for i, f in self.peers.items()},
                          list(self.nonfinite))


# ---- learn: the one sequence of a Peer and of a PeerStack ------------------------------------------------------------
def learn(learner, epoch: int, step: int, targets):
    """The loss against the targets, backward (under gradient accumulation, the batch's share of the mean gradient),
    and where an optimizer step is due: gradient clipping, the step, the gradients zeroed, the self teachers' update
    (``after_step``: an EMA teacher's). Returns the figures of ``learner.loss``, on the device: no host sync (a
    non-finite loss is found at the end of the call, and the run stops or rolls back from there whatever this step
    did).

    learner: a Peer (engine/peer.py) or a PeerStack (engine/stack.py): ``loss(epoch, step, targets)`` -> (loss,
    figures) with the step's learning rate set in its optimizer, ``optimizer``, ``parameters()``,
    ``optimizer_step_due(step)``, ``after_step()``, ``config``."""
    figures = backward(learner, epoch, step, targets)
    if learner.optimizer_step_due(step):
        update(learner)
    return figures


def backward(learner, epoch: int, step: int, targets):
    """The first half of ``learn``: the loss and its backward (a peer of several ranks syncs its gradients between
    the halves: engine/grid.py)."""
    loss, figures = learner.loss(epoch, step, targets)
    train = learner.config.train
    (loss / train.accumulate_steps if train.accumulate_steps > 1 else loss).backward()
    return figures


def update(learner) -> None:
    """The second half of ``learn``, once an optimizer step is due."""
    if learner.config.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(learner.parameters(), learner.config.train.grad_clip)
    learner.optimizer.step()
    learner.optimizer.zero_grad(set_to_none=True)
    learner.after_step()


# ---- the step's parts --------------------------------------------------------------------------------------------
class LocalMembers:
    """The peers and teachers one worker hosts, as a step runs them: each member's forward (the peers one after
    another, or as one batched model where they are stacked), then each peer's learn."""

    def __init__(self, peers: list, teachers: list, stack=None):
        self.peers = peers
        self.teachers = teachers
        self.stack = stack                  # a PeerStack over ``peers`` (resources.peer_execution: stacked), or None
        self.agree = None                   # a rank of a peer of several ranks: agree(peer, what) (engine/grid.py)

    @property
    def peer_indices(self) -> tuple[int, ...]:
        return tuple(p.index for p in self.peers)

    def forward(self, epoch: int, step: int, replay: int = 0) -> list[dict]:
        """The local members' outputs, left where they were computed (tensors on the device; a cached teacher's
        arrays): each peer's, then each teacher's."""
        peers = (self.stack.forward(epoch, step, replay) if self.stack is not None
                 else [p.forward(epoch, step, replay) for p in self.peers])
        return peers + [t.forward(epoch, step, replay) for t in self.teachers]

    def learn(self, epoch: int, step: int, targets: list[dict]) -> dict:
        """targets: one dict per local peer, in order. Returns each local peer's StepFigures by peer index."""
        if self.stack is not None:
            return self.stack.learn(epoch, step, targets)
        if self.agree is None:
            return {p.index: p.learn(epoch, step, t) for p, t in zip(self.peers, targets)}
        figures = {}
        for peer, target in zip(self.peers, targets):       # a rank: the peer's ranks agree between the halves
            figures[peer.index] = backward(peer, epoch, step, target)
            if peer.optimizer_step_due(step):
                self.agree(peer, "gradients")
                self.agree(peer, "buffers")             # before the update: an EMA teacher copies them
                update(peer)
        return figures


@dataclass(frozen=True)
class Gathered:
    """Every peer's outputs, then every teacher's, as the targets of some local peers read them."""
    outputs: list
    peers: tuple                # the local peers (indices) whose targets come from these outputs


class ThroughExchange:
    """The other members' outputs through the exchange (a collective over the workers, or none in one process): every
    member's outputs, the same for every local peer. An exchange between workers that carries host arrays gets them
    (``host_outputs``); one within a worker carries nothing."""

    def gather(self, exchange, epoch: int, step: int, replay: int, outputs: list[dict],
               peers: tuple) -> list[Gathered]:
        local = outputs if exchange.carries_tensors else [host_outputs(o) for o in outputs]
        return [Gathered(exchange.gather("step", local), peers)]


THROUGH_EXCHANGE = ThroughExchange()


class TrainingStep:
    """forward -> gather -> targets -> learn of one worker's local members (see the module's docstring).

    members: LocalMembers; coordinator: its target logic (engine/coordinator.py); exchange: the worker's exchange
    (``gather(tag, local outputs)``, ``carries_tensors``); others: how the other members' outputs are had,
    ``THROUGH_EXCHANGE`` or a Codistillation's stale copies (``gather(exchange, epoch, step, replay, outputs,
    peers)`` -> list of Gathered)."""

    def __init__(self, members: LocalMembers, coordinator, exchange, others=THROUGH_EXCHANGE):
        self.members = members
        self.coordinator = coordinator
        self.exchange = exchange
        self.others = others

    def forward(self, epoch: int, step: int, replay: int = 0) -> list[dict]:
        return self.members.forward(epoch, step, replay)

    def gather(self, epoch: int, step: int, replay: int, outputs: list[dict]) -> list[Gathered]:
        return self.others.gather(self.exchange, epoch, step, replay, outputs, self.members.peer_indices)

    def targets(self, epoch: int, step: int, replay: int, gathered: list[Gathered]) -> list[dict]:
        """One target dict per local peer, in order (a rank's: on its rows)."""
        by_peer = {}
        for part in gathered:
            targets = self.coordinator.targets(epoch, step, *part.outputs, replay=replay,
                                               rows=getattr(self.others, "rows", None))
            by_peer.update({index: targets[index] for index in part.peers})
        return [by_peer[index] for index in self.members.peer_indices]

    def learn(self, epoch: int, step: int, targets: list[dict]) -> dict:
        return self.members.learn(epoch, step, targets)

    def run(self, epoch: int, step: int, replay: int = 0) -> dict:
        """One step of the epoch's ``replay``-th replay (0: its first attempt). Returns each local peer's
        StepFigures by peer index, on the device."""
        outputs = self.forward(epoch, step, replay)
        gathered = self.gather(epoch, step, replay, outputs)
        return self.learn(epoch, step, self.targets(epoch, step, replay, gathered))

    def call(self, epoch: int, first: int, count: int, replay: int = 0, on_step=None) -> CallReport:
        """Steps first..first+count-1 of an epoch. The report's figures stay on the device until its ``finish()``.
        ``steps_done`` counts the steps the host has run (on a GPU: enqueued; nothing waits for the device to say
        so), for a progress line; ``on_step(done)`` is told each (the in-process runtime's console)."""
        report = CallReport()
        self.steps_done = 0
        for step in range(first, first + count):
            report.add_device_step(epoch, step, self.run(epoch, step, replay))
            self.steps_done += 1
            if on_step is not None:
                on_step(self.steps_done)
        return report
