"""A worker's peers run as one model over stacked weights (``resources.peer_execution: stacked``). No Ray.

Peers of one architecture differ only in their numbers, so P of them are one batched model: every parameter and buffer
is stacked on a new first axis ([P, ...]), and ``torch.func.vmap`` over ``functional_call`` runs the P forwards as
one (a convolution becomes one grouped convolution, one kernel launch for P peers): what a small network at batch 128
needs on a GPU, where P separate forwards leave it idle between launches. Each peer's module keeps its own
parameters and buffers as views of row i of the stacks, so evaluation, checkpoints, exports and the EMA teachers read
and write the stacked numbers without knowing. One optimizer steps the stacks: SGD and Adam work element by element,
so its step is each peer's step. The peers' losses are summed for one backward: each loss reaches only its own row.

What makes a peer's forward differ from the others' is refused before a run starts (config._check_peer_execution:
another architecture, learning rate, feature taps, a self teacher, gradient clipping) or here: random layers (dropout
draws per peer from its own seed, which one batched draw cannot reproduce).
"""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, vmap

from raydistill.errors import ConfigError
from raydistill.engine.optim import make_optimizer
from raydistill.engine.step import learn

RANDOM_LAYERS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)


def _refuse_random_layers(model: torch.nn.Module, arch: str) -> None:
    for name, module in model.named_modules():
        if isinstance(module, RANDOM_LAYERS) and module.p > 0:
            raise ConfigError("resources.peer_execution", "stacked",
                              f"not for model {arch}: its layer {name} ({type(module).__name__}, p={module.p}) draws "
                              "each peer's randomness from that peer's seed; use resources.peer_execution=loop")


class PeerStack:
    def __init__(self, peers: list):
        self.peers = peers
        first = peers[0]
        _refuse_random_layers(first.model, first.settings.arch)
        self.config = first.config
        self.template = copy.deepcopy(first.model).to("meta")      # the structure only: no numbers of its own
        self.params = {name: self._stack([dict(p.model.named_parameters())[name] for p in peers]).requires_grad_()
                       for name, _ in first.model.named_parameters()}
        self.buffers = {name: self._stack([dict(p.model.named_buffers())[name] for p in peers])
                        for name, _ in first.model.named_buffers()}
        for i, peer in enumerate(peers):           # each peer's tensors become views of its row of the stacks
            for name, parameter in peer.model.named_parameters():
                parameter.data = self.params[name].data[i]
            for name, _ in peer.model.named_buffers():
                module_name, _, leaf = name.rpartition(".")
                peer.model.get_submodule(module_name)._buffers[leaf] = self.buffers[name][i]
        self.optimizer = make_optimizer(self.config.train, list(self.params.values()), first.settings.lr)
        self.batched = {}                 # shared view or not -> the batched forward (compiled with train.compile)

    @staticmethod
    def _stack(tensors: list) -> torch.Tensor:
        return torch.stack([t.detach() for t in tensors])

    def _model(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def batched_forward(self, shared: bool):
        """P forwards as one: vmap over the stacks (and over the views, unless the peers share one); with
        ``train.compile: graphs`` compiled with CUDA graphs (torch.compile "reduce-overhead")."""
        if shared not in self.batched:
            fn = vmap(self._model, in_dims=(0, 0, None if shared else 0), randomness="error")
            if self.config.train.compile == "graphs":
                fn = torch.compile(fn, mode="reduce-overhead")
            self.batched[shared] = fn
        return self.batched[shared]

    # ---- the step ------------------------------------------------------------------------------------------------
    def forward(self, epoch: int, step: int, replay: int = 0) -> list[dict]:
        """Every peer's outputs, as each peer's own ``forward`` gives them (its view, its pending graph)."""
        inputs = []
        for peer in self.peers:
            peer.self_teacher.before_forward(epoch)
            inputs.append(peer.step_input(epoch, step, replay))
        views = [peer.view_index for peer in self.peers]
        shared = all(v == views[0] for v in views)       # one view for all: no copy per peer
        x = inputs[0][1] if shared else torch.stack([view for _, view in inputs])
        self.template.train()
        with self.peers[0].autocast():
            logits = self.batched_forward(shared)(self.params, self.buffers, x)
        return [peer.forward_outputs(epoch, step, labels, view, logits[i])
                for i, (peer, (labels, view)) in enumerate(zip(self.peers, inputs))]

    def learn(self, epoch: int, step: int, targets: list[dict]) -> dict:
        """One backward of the peers' summed losses, one optimizer step of the stacks when due (engine/step.py's
        ``learn``, as a Peer learns). targets: one dict per peer. Returns each peer's StepFigures by peer index."""
        return learn(self, epoch, step, targets)

    def loss(self, epoch: int, step: int, targets: list[dict]) -> tuple[torch.Tensor, dict]:
        """The sum of the peers' losses against their targets (each reaches only its own row of the stacks), with the
        step's learning rate set in the stacks' optimizer; and each peer's StepFigures by peer index."""
        total, figures = None, {}
        for peer, target in zip(self.peers, targets):
            loss, figures[peer.index] = peer.loss(epoch, step, target)
            total = loss if total is None else total + loss
        for group in self.optimizer.param_groups:
            group["lr"] = self.peers[0].optimizer.param_groups[0]["lr"]      # the step's rate, set by Peer.loss
        return total, figures

    def parameters(self) -> list:
        return list(self.params.values())

    def optimizer_step_due(self, step: int) -> bool:
        return self.peers[0].optimizer_step_due(step)

    def after_step(self) -> None:
        for peer in self.peers:
            peer.after_step()

    # ---- state: each peer's part, in the format a peer of a loop worker saves ------------------------------------
    def peer_state(self, i: int, state: dict) -> dict:
        """Peer i's state (Peer.state_dict) with its optimizer state and accumulated gradients from the stacks."""
        saved = self.optimizer.state_dict()
        shapes = [p.shape for p in self.params.values()]
        per_peer = {k: {name: value[i].clone() if _rowed(value, shapes[k]) else copy.deepcopy(value)
                        for name, value in entry.items()} for k, entry in saved["state"].items()}
        state = dict(state, optimizer={"state": per_peer, "param_groups": copy.deepcopy(saved["param_groups"])})
        state.pop("accumulated_grads", None)
        grads = [p.grad for p in self.params.values()]
        if any(g is not None for g in grads):
            state["accumulated_grads"] = [None if g is None else g[i].detach().to("cpu", copy=True) for g in grads]
        return state

    def load(self, states: list[dict]) -> None:
        """After each peer loaded its state (its weights went into the stacks through the views): the stacked
        optimizer state and accumulated gradients from the peers' states, in peer order."""
        parameters = list(self.params.values())
        optimizers = [s["optimizer"] for s in states]
        stacked = {}
        for k in optimizers[0]["state"]:
            entries = [o["state"][k] for o in optimizers]
            stacked[k] = {name: (torch.stack([e[name] for e in entries]).to(parameters[k].device)
                                 if _rowed(value, parameters[k].shape[1:]) else value)
                          for name, value in entries[0].items()}
        self.optimizer = make_optimizer(self.config.train, parameters, self.peers[0].settings.lr)
        self.optimizer.load_state_dict({"state": stacked, "param_groups": optimizers[0]["param_groups"]})
        for k, parameter in enumerate(parameters):
            grads = [(s.get("accumulated_grads") or [None] * len(parameters))[k] for s in states]
            parameter.grad = None if grads[0] is None else torch.stack(grads).to(parameter.device)
        for peer in self.peers:                   # what Peer.load_state_dict put on the views is not trained
            for parameter in peer.model.parameters():
                parameter.grad = None


def _rowed(value, shape) -> bool:
    """An optimizer state entry shaped like a parameter (a momentum buffer), as opposed to a count (Adam's step)."""
    return isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(shape)
