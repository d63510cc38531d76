"""Peers larger than one device: a peer of k ranks (``resources.ranks_per_peer``, or a peer's own ``ranks``) is k
data-parallel replicas of one network, each on its own device (a GPU, or a CPU bundle), each working on its share of
every step's batch. No Ray.

The grid, step by step (rank r of a peer of k ranks, batch B):
- forward: on rows r*B/k .. (r+1)*B/k of the step's batch; the random draws of each view are those of the whole batch,
  sliced, so the rows a rank sees are exactly those rows of the one-rank peer's view;
- exchange: every rank of every peer (and every teacher) sends its outputs to all, as the workers do today; each
  worker puts a peer's rows back together in rank order (``assemble``): every worker holds every member's outputs on
  the whole batch, so the coordinator's targets work for every method, row-wise or not;
- targets: a worker takes its own rows of everything (``rows_of``) and computes its peers' targets there: the
  methods' targets are row-wise (each sample's from that sample's outputs), except a learned ensemble head, which
  trains on the whole batch and is refused on a grid;
- learn: each rank's loss is the mean over its rows; once an optimizer step is due its gradients are averaged over
  the peer's ranks (gathered in rank order and summed in that order, then divided by k: every rank ends with the same
  numbers, and a run on Ray is bitwise the in-process grid), then every rank takes the same optimizer step, and rank
  0's batch-norm buffers are every rank's (as DistributedDataParallel's ``broadcast_buffers``).
So a peer of k ranks trains the one-rank peer's function up to the order of the sums (its gradient is the mean of its
rows' mean gradients, which is the whole batch's); batch norm sees a rank's rows only (as DDP's), unless
``train.sync_bn`` (GPUs: torch's SyncBatchNorm over the peer's ranks). Teachers are not split: a teacher computes the
whole batch in its own worker, as today. Checkpoints, evaluation and exports are rank 0's; a resume may change k.
"""
from __future__ import annotations

import torch

from raydistill.errors import ConfigError

BN_LAYERS = (torch.nn.modules.batchnorm._BatchNorm,)


def ranks_of(config) -> list[int]:
    """Each peer's ranks, in peer order."""
    return [peer.ranks for peer in config.peer_list]


def is_grid(config) -> bool:
    return any(k > 1 for k in ranks_of(config))


def rows(batch: int, rank: int, ranks: int) -> slice:
    """The rows of a step's batch that rank ``rank`` of ``ranks`` works on."""
    share = batch // ranks
    return slice(rank * share, (rank + 1) * share)


def check_config(config) -> None:
    """The rules of a grid, each one line naming the field."""
    r = config.resources
    fields = [("resources.ranks_per_peer", r.ranks_per_peer)]
    fields += [(f"peers.{i}.ranks", p.ranks) for i, p in enumerate(config.peer_list)]
    for field, k in fields:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(field, k, "an integer >= 1 (the peer's data-parallel ranks)")
    if r.gpus_per_peer > 1:
        raise ConfigError("resources.gpus_per_peer", r.gpus_per_peer,
                          "at most 1 (a rank's device, or a share of one); a peer over several GPUs is "
                          f"resources.ranks_per_peer={int(r.gpus_per_peer)} ranks of one GPU each")
    if not is_grid(config):
        if config.train.sync_bn:
            raise ConfigError("train.sync_bn", True, "only for peers of several ranks (resources.ranks_per_peer > 1 "
                              "or a peer's ranks > 1)")
        return
    for field, k in fields:
        if k > 1 and 0 < r.gpus_per_peer < 1:
            raise ConfigError(field, k, f"1 with resources.gpus_per_peer={r.gpus_per_peer}: the ranks of a peer are "
                              "one device each (a whole GPU, or CPUs); ranks sharing a GPU would train no faster")
    batch = config.train.batch_size
    for i, k in enumerate(ranks_of(config)):
        if batch % k:
            raise ConfigError("train.batch_size", batch, f"a multiple of peers.{i}.ranks={k}: each rank of a peer "
                              "works on an equal share of the step's batch")
    if config.train.sync_bn and r.gpus_per_peer == 0:
        raise ConfigError("train.sync_bn", True, "false on CPUs: torch's SyncBatchNorm runs on GPUs only (a rank's "
                          "batch norm sees its own rows, as DistributedDataParallel's)")
    from raydistill.methods import build_method
    from raydistill.transports import transport_of

    method = build_method(config)
    if method.learned_head:
        raise ConfigError("method.ensemble", config.method.ensemble, "not on peers of several ranks: the learned "
                          "head trains on the whole batch at once; use mean_logits, mean_probs, minlogit or best")
    refusals = (("resources.peer_execution", r.peer_execution, r.peer_execution == "stacked",
                 "loop with peers of several ranks (a stacked model is one worker's peers)"),
                ("resources.transport", r.transport, transport_of(config).stale_copies,
                 "collective or object_store with peers of several ranks (codistillation's stale copies are whole "
                 "peers)"),
                ("resources.transport", r.transport, transport_of(config).coordinator_actor,
                 "collective with peers of several ranks (their ranks average gradients in a group)"))
    for field, value, refused, allowed in refusals:
        if refused:
            raise ConfigError(field, value, allowed)


# ---- the step's outputs on the grid ----------------------------------------------------------------------------------
def assemble(gathered: list[dict], layout: list[tuple]) -> list[dict]:
    """The members' outputs on the whole batch from what every worker sent: ``layout`` names each gathered entry
    (kind "peer" or "teacher", member index, rank, ranks); a peer's ranks are concatenated in rank order along the
    batch axis. Returns the peers' outputs, then the teachers', in member order."""
    peers, teachers = {}, {}
    for outputs, (kind, index, rank, ranks) in zip(gathered, layout):
        if kind == "teacher":
            teachers[index] = outputs
        else:
            peers.setdefault(index, [None] * ranks)[rank] = outputs
    whole = []
    for index in sorted(peers):
        parts = peers[index]
        whole.append(parts[0] if len(parts) == 1 else
                     {name: torch.cat([_tensor(part[name]) for part in parts]) for name in parts[0]})
    return whole + [teachers[j] for j in sorted(teachers)]


def rows_of(outputs: list[dict], num_peers: int, share: slice | None) -> list[dict]:
    """The members' outputs on a worker's rows: a peer's along its first axis, a teacher's ([views, batch, ...])
    along its second. ``share`` None: the whole batch."""
    if share is None:
        return outputs
    return [{name: (_tensor(value)[share] if i < num_peers else _tensor(value)[:, share])
             for name, value in member.items()} for i, member in enumerate(outputs)]


def _tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


# ---- gradients and buffers of a peer's ranks -----------------------------------------------------------------------
def average_gradients(parameters_by_rank: list[list[torch.Tensor]]) -> None:
    """The ranks' gradients summed in rank order and divided by the number of ranks, into every rank's parameters
    (the in-process grid; over Ray the same sums go through the peer's group: runtime/collective.py)."""
    ranks = len(parameters_by_rank)
    for params in zip(*parameters_by_rank):
        grads = [p.grad for p in params]
        if grads[0] is None:
            continue
        total = grads[0].clone()
        for grad in grads[1:]:
            total += grad
        total /= ranks
        for p in params:
            p.grad.copy_(total)


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, BN_LAYERS) for m in model.modules())


def entries(layout: list) -> list[tuple]:
    """What every worker sends in a step's exchange, in worker order: (kind, member index, rank, ranks) of each
    output; ``layout``: the run's workers' Members (runtime/placement.py)."""
    found = []
    for members in layout:
        found += [("peer", i, members.rank, members.ranks) for i in members.peers]
        found += [("teacher", j, 0, 1) for j in members.teachers]
    return found


def share(members, batch: int) -> slice | None:
    """A worker's rows of the step's batch: a rank's of its peer, or None (the whole batch)."""
    return rows(batch, members.rank, members.ranks) if members.ranks > 1 else None


class OnTheGrid:
    """The other members' outputs for a worker of a run with peers of several ranks: every worker's through the
    exchange, a peer's ranks put together (``assemble``), then the worker's own rows of everything (``rows_of``)."""

    def __init__(self, layout: list, rows: slice | None, num_peers: int):
        self.entries = entries(layout)
        self.rows = rows
        self.num_peers = num_peers

    def gather(self, exchange, epoch: int, step: int, replay: int, outputs: list[dict], peers: tuple) -> list:
        from raydistill.engine.step import Gathered, host_outputs

        local = outputs if exchange.carries_tensors else [host_outputs(o) for o in outputs]
        whole = assemble(exchange.gather("step", local), self.entries)
        return [Gathered(rows_of(whole, self.num_peers, self.rows), peers)]


# ---- a peer's ranks agree: one gradient, one set of buffers ---------------------------------------------------------
def flat_gradients(learner) -> torch.Tensor:
    """A peer's gradients as one flat tensor (a missing gradient as zeros), parameters in order."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in learner.parameters()])


def set_gradients(learner, flat: torch.Tensor) -> None:
    offset = 0
    for p in learner.parameters():
        n = p.numel()
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def combine(flats: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' gradients summed in rank order, divided by their number: the same numbers wherever it runs."""
    total = flats[0].clone()
    for flat in flats[1:]:
        total += flat
    return total / len(flats)


def buffers_of(learner) -> list[torch.Tensor]:
    """A peer's floating buffers (batch norm's running statistics), which its ranks keep as rank 0's."""
    return [b for b in learner.model.buffers() if b.is_floating_point()]


def flat_buffers(learner) -> torch.Tensor:
    found = buffers_of(learner)
    return torch.cat([b.reshape(-1) for b in found]) if found else torch.zeros(0)


def set_buffers(learner, flat: torch.Tensor) -> None:
    offset = 0
    for b in buffers_of(learner):
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b))
        offset += n


def sync_over(exchange, peer) -> None:
    """A rank's share of its peer's agreement, over the peer's group: every rank's gradients, summed in rank order
    (``combine``); rank 0's buffers."""
    set_gradients(peer, combine(exchange.gather_peer(peer.index, flat_gradients(peer))))


def buffers_over(exchange, peer) -> None:
    set_buffers(peer, exchange.gather_peer(peer.index, flat_buffers(peer))[0])


def sync_batch_norm(peer, group) -> None:
    """``train.sync_bn`` (GPUs): the peer's batch norm layers as torch's SyncBatchNorm over its ranks' group. The
    layers keep their parameters and buffers (the same tensors: the optimizer's stay valid)."""
    peer.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(peer.model, process_group=group)


def sync_bn_warning(config, spec) -> str | None:
    """``train.sync_bn`` on peers without a batch norm layer: a warning (it changes nothing there), not an error."""
    if not config.train.sync_bn:
        return None
    from raydistill.models import build_model

    bare = sorted({p.arch for p in config.peer_list if p.ranks > 1
                   and not has_batch_norm(build_model(p.arch, spec, **p.options))})
    if not bare:
        return None
    return (f"warning: train.sync_bn: {', '.join(bare)} has no batch norm layer; it trains as without sync_bn")
