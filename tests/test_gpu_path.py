"""The device path of a step, as far as a CPU can show it:

- ``run_steps`` reads nothing back from its tensors per step (no ``.item()``, ``bool()``, ``.numpy()``, ``.tolist()``,
  ``.cpu()``): outputs, targets, losses, figures and the finiteness check stay where they were computed and are read
  once, at the end of the call. Counted with a torch function mode, which sees those calls on any device; on a GPU
  each of them would be a host sync (there ``torch.cuda.set_sync_debug_mode`` says the same, scripts/gpu_speed.sh);
- stacked peers (``resources.peer_execution: stacked``, one batched model over stacked weights) train the
  parameters the loop trains, within 1e-5, in one process and on Ray (the runtime users run), with EMA teachers,
  gradient accumulation and a checkpoint round trip on the way;
- a non-finite loss found at the end of a call still names its first step;
- the new options' refusals, raised before a run starts or inside a worker actor, reach the user as one line.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import raydistill
from raydistill.config import load_config
from raydistill.engine.data import load_run_data
from raydistill.errors import ConfigError
from raydistill.runtime.inprocess import InProcessWorkers

from .conftest import tiny_dml

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's values to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def workers(config, *overrides):
    resolved = load_config(config, list(overrides))
    spec, arrays = load_run_data(resolved)
    return InProcessWorkers(resolved, spec, arrays)


def reads_of_a_call(runner, first: int, count: int) -> list:
    with HostReads() as mode:
        runner.run_steps(0, first, count)
    return mode.calls


@pytest.mark.parametrize("method", ["dml", "pcl"])
@pytest.mark.parametrize("execution", ["loop", "stacked"])
def test_a_call_of_steps_reads_nothing_back_per_step(method, execution):
    runner = workers(tiny_dml(**{"method.name": method, "train.batch_size": 64}),
                     f"resources.peer_execution={execution}")
    runner.run_steps(0, 0, 1)                                   # first-step set-up (optimizer state) out of the count
    short, long = reads_of_a_call(runner, 1, 2), reads_of_a_call(runner, 3, 8)
    assert long == short, f"{len(long) - len(short)} more host reads for 6 more steps: {long}"
    assert len(short) <= 2 * 3               # the call's end: each peer's figures (with its finiteness), once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("execution", ["loop", "stacked"])
def test_on_a_gpu_a_call_of_steps_never_syncs_the_host(execution):
    """On CUDA the same, asked of the device itself: a sync in a step raises under the sync debug mode. The steps are
    the worker's own (``TrainingStep.call``, what ``run_steps`` runs); the call's end, which reads the figures, is
    outside the mode."""
    runner = workers(tiny_dml(**{"method.name": "pcl", "train.batch_size": 64, "resources.gpus_per_peer": 0.3}),
                     f"resources.peer_execution={execution}")
    worker = runner.worker
    assert worker.device.startswith("cuda")
    runner.run_steps(0, 0, 1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        report = worker.training_step.call(0, 1, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert report.finish().nonfinite == []


def state_difference(a: dict, b: dict, optimizer: bool = True) -> float:
    """The largest difference between two workers' states: parameters and buffers, and the optimizers' states."""
    worst = 0.0
    for peer_a, peer_b in zip(a["peers"], b["peers"]):
        for key, value in peer_a["model"].items():
            worst = max(worst, (value.double() - peer_b["model"][key].double()).abs().max().item())
        for k, entry in (peer_a["optimizer"]["state"] if optimizer else {}).items():
            for name, value in entry.items():
                other = peer_b["optimizer"]["state"][k][name]
                worst = max(worst, (torch.as_tensor(value).double() - torch.as_tensor(other).double()).abs().max()
                            .item())
    return worst


def test_stacked_convolutional_peers_step_as_the_loop_does():
    """A grouped convolution sums in another order than P convolutions: equal within float rounding (a trained
    network then drifts apart as any two float orders do, which is why the long runs below use MLPs)."""
    config = tiny_dml(**{"model.arch": "cnn_small", "model.options": {}, "train.batch_size": 64})
    loop, stacked = workers(config), workers(config, "resources.peer_execution=stacked")
    for runner in (loop, stacked):
        runner.run_steps(0, 0, 1)
    assert state_difference(loop.get_state(), stacked.get_state(), optimizer=False) < 1e-5


def test_stacked_peers_train_as_the_loop_through_a_checkpoint_round_trip():
    """PCL (EMA teachers) with gradient accumulation over 2 epochs; the stacked worker's state goes out and comes
    back in the middle (the optimizer's stacked momentum and an accumulated gradient, sliced per peer and stacked
    again)."""
    config = tiny_dml(**{"method.name": "pcl", "train.accumulate_steps": 2, "train.batch_size": 256})
    results = []
    for execution in ("loop", "stacked"):
        runner = workers(config, f"resources.peer_execution={execution}")
        steps = runner.worker.peers[0].data.steps_per_epoch
        runner.run_steps(0, 0, 3)
        runner.set_state(runner.get_state())                    # after step 3 of 2-step accumulation: a gradient kept
        runner.run_steps(0, 3, steps - 3)
        runner.run_steps(1, 0, steps)
        results.append(runner.get_state())
    assert state_difference(*results) <= 1e-5
    assert results[0]["peers"][0]["ema_teacher"].keys() == results[1]["peers"][0]["ema_teacher"].keys()


def test_stacked_peers_on_ray_train_as_the_in_process_loop(ray_session, tmp_path):
    """The runtime users run: 4 stacked peers in 2 workers over the collective exchange, against the in-process loop
    (1e-5), with EMA teachers and gradient accumulation."""
    config = tiny_dml(**{"method.name": "pcl", "peers": 4, "resources.peers_per_worker": 2, "train.epochs": 2,
                         "train.batch_size": 256, "train.accumulate_steps": 2})
    reference = raydistill.train(config, tmp_path / "loop", runtime="inprocess", progress=False)
    stacked = raydistill.train(config, tmp_path / "stacked", overrides=["resources.peer_execution=stacked"],
                               progress=False)
    assert stacked.summary["runtime"] == "ray" and stacked.summary["transport"] == "collective"
    from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint

    states = [load_checkpoint(latest_checkpoint(r.run_dir), 4) for r in (reference, stacked)]
    assert state_difference(*states) <= 1e-5


@pytest.mark.parametrize("method, broken", [("independent", [(0, 2, 1)]), ("dml", [(0, 2, 0), (0, 2, 1), (0, 2, 2)])])
def test_a_non_finite_loss_found_at_the_end_of_a_call_names_its_first_step(method, broken):
    """Peer 1 breaks before the call's first step (2): its loss is not finite there, and with DML so are the losses
    of the peers that learn from its logits; each peer is reported once, at its first non-finite step."""
    runner = workers(tiny_dml(**{"method.name": method, "train.batch_size": 64}))
    runner.run_steps(0, 0, 2)
    with torch.no_grad():
        next(runner.worker.peers[1].model.parameters()).fill_(float("nan"))
    assert runner.run_steps(0, 2, 5).nonfinite == broken


@pytest.mark.parametrize("overrides, field, allowed", [
    (["resources.peer_execution=batched"], "resources.peer_execution='batched'", "one of: loop, stacked"),
    (["resources.peer_execution=stacked", "peers=[{}, {options: {hidden: [16]}}, {}]"],
     "peers.1.options={'hidden': [16]}", "the same as peers.0.options ({'hidden': [32]}) with "
     "resources.peer_execution=stacked"),
    (["resources.peer_execution=stacked", "peers=[{}, {lr: 0.01}, {}]"], "peers.1.lr=0.01", "the same as peers.0.lr"),
    (["resources.peer_execution=stacked", "method.feature_weight=0.5"], "resources.peer_execution='stacked'",
     "not for method dml as configured: its peers tap hidden features"),
    (["resources.peer_execution=stacked", "method.name=self", "peers=1"], "resources.peer_execution='stacked'",
     "its peers learn from their own teacher"),
    (["resources.peer_execution=stacked", "train.grad_clip=1.0"], "train.grad_clip=1.0", "null with "),
    (["resources.peer_execution=stacked", "resources.transport=codistill"], "resources.transport='codistill'",
     "not codistill with resources.peer_execution=stacked"),
    (["train.compile=jit"], "train.compile='jit'", "one of: none, graphs"),
    (["train.compile=graphs"], "train.compile='graphs'", "none on CPUs: CUDA graphs need GPUs"),
    (["train.compile=graphs", "resources.gpus_per_peer=0.5", "method.name=self", "method.generations=2", "peers=1",
      "train.epochs=2"],
     "train.compile='graphs'", "none with born-again generations"),
    (["train.compile=graphs", "resources.gpus_per_peer=0.5", "method.feature_weight=0.5"], "train.compile='graphs'",
     "hidden features are read by hooks"),
    (["train.channels_last=3"], "train.channels_last=3", "true or false"),
])
def test_the_gpu_options_refuse_in_one_line(overrides, field, allowed):
    with pytest.raises(ConfigError) as caught:
        load_config(tiny_dml(), overrides)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{field}: ") and allowed in line, line


def test_refusals_raised_inside_a_worker_reach_the_user_as_one_line(ray_session, tmp_path):
    """What only a built model or the worker's device can tell: a random layer under stacked peers (on Ray, from
    inside the worker actor), CUDA graphs where the worker has no GPU (in one process: no Ray node here offers a
    GPU)."""
    config = tiny_dml(**{"model.arch": "wrn10_1", "model.options": {"dropout": 0.3}, "train.batch_size": 512,
                         "resources.peer_execution": "stacked"})
    with pytest.raises(ConfigError, match=r"^resources\.peer_execution='stacked': not for model wrn10_1: its layer "
                                          r".*Dropout, p=0\.3"):
        raydistill.train(config, tmp_path / "stacked", progress=False)
    assert not (tmp_path / "stacked").exists()
    if not torch.cuda.is_available():
        config = tiny_dml(**{"train.compile": "graphs", "resources.gpus_per_peer": 0.5})
        with pytest.raises(ConfigError, match=r"^train\.compile='graphs': none here: this worker has no CUDA"):
            raydistill.train(config, tmp_path / "graphs", runtime="inprocess", progress=False)
