"""The transports: how a step's outputs (or the peers' weights) travel between a run's workers. One row each.

Placement (its bundles), the driver (which calls it makes), the engine's worker (what it builds) and the config (what
it refuses) read this table; nothing else tests a transport's name. Adding a transport: a row here, and the module
that carries its data (``runtime/collective.py``, ``runtime/objectstore.py``, ``engine/codistill.py``).

| transport    | forms a group | who drives a step | targets computed by          | what crosses between workers |
|--------------|---------------|-------------------|------------------------------|------------------------------|
| collective   | yes           | each worker       | a coordinator replica each   | every member's outputs, every step |
| object_store | no            | the driver        | one coordinator actor        | outputs and targets through Ray's object store, every step |
| codistill    | yes           | each worker       | a coordinator replica each   | the peers' weights every method.codistill_every steps |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from raydistill.errors import ConfigError

CODISTILL_EVERY = 10      # method.codistill_every where resources.transport=codistill leaves it unset


@dataclass(frozen=True)
class Transport:
    name: str
    forms_group: bool              # the workers form a torch.distributed group (once per run, again after a loss)
    workers_drive: bool            # a worker runs a whole call of steps alone; else the driver drives every step
    coordinator_actor: bool        # one coordinator actor computes every target (else each worker holds a replica)
    stale_copies: bool             # each worker computes the other peers' outputs from copies of their weights
    carries: str                   # what crosses between workers, in words
    check: Callable | None = None  # its config rules: check(config) raises ConfigError (and may fill defaults)

    def head_cpus(self, config) -> float:
        """What its head bundle holds besides a Tune trial's driver: the coordinator actor's CPUs."""
        return config.resources.cpus_per_coordinator if self.coordinator_actor else 0.0


def _check_codistill(config) -> None:
    """Codistillation: the peers' weights travel every method.codistill_every steps and each worker computes the
    other peers' outputs from its stale copies. Only outputs a copy can compute (logits, EMA-teacher logits)."""
    from raydistill.methods import methods_using

    m = config.method
    if m.name not in methods_using("codistill_every"):
        raise ConfigError("resources.transport", "codistill",
                          f"not for method {m.name}: codistillation exchanges the weights of peers that learn "
                          f"from each other ({', '.join(methods_using('codistill_every'))})")
    if m.codistill_every is None:
        m.codistill_every = CODISTILL_EVERY
    k = m.codistill_every
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("method.codistill_every", k, "an integer >= 1 (steps between two exchanges of weights)")
    if m.ensemble == "learned_head" or (m.feature_weight or 0) > 0:
        field, value = (("method.ensemble", m.ensemble) if m.ensemble == "learned_head"
                        else ("method.feature_weight", m.feature_weight))
        raise ConfigError(field, value, "not with resources.transport=codistill: it needs the peers' features of "
                          "every step; use an ensemble of logits or probabilities, feature_weight 0")
    every = config.train.checkpoint_every_steps
    if every is not None and every % k:
        raise ConfigError("train.checkpoint_every_steps", every, f"a multiple of method.codistill_every ({k}) with "
                          "resources.transport=codistill: a rollback point must be an exchange of weights")


TRANSPORTS = {t.name: t for t in (
    Transport("collective", forms_group=True, workers_drive=True, coordinator_actor=False, stale_copies=False,
              carries="every member's outputs, every step (shared memory on one node, gloo across nodes, NCCL "
                      "between GPUs)"),
    Transport("object_store", forms_group=False, workers_drive=False, coordinator_actor=True, stale_copies=False,
              carries="outputs to the coordinator actor and targets back, through Ray's object store, every step"),
    Transport("codistill", forms_group=True, workers_drive=True, coordinator_actor=False, stale_copies=True,
              carries="the peers' weights every method.codistill_every steps", check=_check_codistill),
)}
AUTO = "auto"               # the collective (for one worker too: it then exchanges with itself, no copy)
NAMES = (AUTO, *TRANSPORTS)


def transport_of(config) -> Transport:
    """The transport a run's resources.transport names (``auto``: the collective)."""
    name = config.resources.transport
    if name == AUTO:
        return TRANSPORTS["collective"]
    if name not in TRANSPORTS:
        raise ConfigError("resources.transport", name, f"one of: {', '.join(NAMES)}")
    return TRANSPORTS[name]


def check_transport(config) -> None:
    """The transport's own rules, and the keys only it reads (method.codistill_every)."""
    transport = transport_of(config)
    if not transport.stale_copies and config.method.codistill_every is not None:
        raise ConfigError("method.codistill_every", config.method.codistill_every,
                          "read only with resources.transport=codistill")
    if transport.check is not None:
        transport.check(config)
