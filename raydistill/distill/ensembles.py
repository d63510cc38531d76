"""Ensemble targets built from the peers' logits.

Every function takes the peers' logits as a list of ``[B, C]`` tensors or one stacked ``[P, B, C]`` tensor, and the
labels ``[B]`` where the ensemble needs them. The result is a ``[B, C]`` tensor of logits, so that one KD function
serves every ensemble. For regression (outputs ``[P, B, K]``) the ensemble is the mean prediction: ``mean_logits``.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from raydistill.errors import ConfigError

ENSEMBLES = ("mean_logits", "mean_probs", "minlogit", "best")


def _stacked(logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The peers' logits as one ``[P, B, C]`` tensor."""
    stacked = torch.stack(list(logits)) if isinstance(logits, (list, tuple)) else logits
    if stacked.dim() != 3 or stacked.shape[0] < 1:
        raise ValueError(f"peer logits must be [P, B, C] with P >= 1, got shape {tuple(stacked.shape)}")
    return stacked


def mean_logits(logits) -> torch.Tensor:
    """Mean of the peers' logits, e = (1/P) sum_k z_k (KDCL "naive" ensemble; the mean prediction for regression)."""
    return _stacked(logits).mean(dim=0)


def mean_probs(logits, temperature: float = 1.0) -> torch.Tensor:
    """Mean of the peers' softened probabilities, returned as logits at the same temperature.

    p = (1/P) sum_k softmax(z_k / T); the result is e = T * log p. KD at temperature T applies softmax(e / T),
    and softmax(log p) = p because p already sums to one, so KD toward e is KD toward the averaged probabilities.
    At T = 1 the result is exactly log p.
    """
    stacked = _stacked(logits)
    log_probs = F.log_softmax(stacked / temperature, dim=-1)
    # log of the mean, computed in log space so that tiny probabilities do not underflow
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(stacked.shape[0])
    return temperature * log_mean


def weighted_probs(logits, weights: Sequence[float], temperature: float = 1.0) -> torch.Tensor:
    """A weighted mean of the members' softened probabilities, returned as logits at the same temperature.

    p = sum_k w_k softmax(z_k / T) with w_k = weights_k / sum_j weights_j (normalized to sum 1); the result is
    e = T * log p, so that KD at temperature T toward e is KD toward p (as ``mean_probs``, which is equal weights).
    A weight of 0 leaves its member out. Used for several teachers (``method.teacher_ensemble: weighted``).
    """
    stacked = _stacked(logits)
    w = _normalized(weights, stacked.shape[0]).to(stacked.dtype)
    log_probs = F.log_softmax(stacked / temperature, dim=-1)
    # log sum_k w_k p_k in log space (log 0 = -inf drops a member of weight 0)
    return temperature * torch.logsumexp(log_probs + w.log().view(-1, 1, 1), dim=0)


def weighted_mean(logits, weights: Sequence[float]) -> torch.Tensor:
    """The weighted mean of the members' outputs, e = sum_k w_k z_k with w normalized to sum 1 (regression's
    ``weighted`` ensemble of teachers' predictions)."""
    stacked = _stacked(logits)
    w = _normalized(weights, stacked.shape[0]).to(stacked.dtype)
    return (stacked * w.view(-1, 1, 1)).sum(dim=0)


def _normalized(weights: Sequence[float], members: int) -> torch.Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.shape != (members,) or not bool((w >= 0).all()) or not w.sum() > 0:
        raise ValueError(f"need {members} weights >= 0 with a sum > 0, got {list(weights)}")
    return w / w.sum()


def minlogit(logits, labels: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit (Guo et al. 2020): e_c = min_k (z_k,c - z_k,y).

    Each peer's logits are shifted so its target-class logit is 0, then the element-wise minimum is taken over peers:
    the target class keeps logit 0 and every other class gets its least confusing value.
    """
    stacked = _stacked(logits)
    index = labels.view(1, -1, 1).expand(stacked.shape[0], -1, 1)
    target_logit = stacked.gather(-1, index)
    return (stacked - target_logit).min(dim=0).values


def best_peer(logits, labels: torch.Tensor) -> torch.Tensor:
    """KDCL "best" ensemble (Guo et al. 2020): per sample, the logits of the peer with the lowest cross-entropy.

    Ties go to the peer with the lowest index.
    """
    stacked = _stacked(logits)
    peers, batch, classes = stacked.shape
    losses = F.cross_entropy(stacked.reshape(peers * batch, classes), labels.repeat(peers), reduction="none")
    best = losses.view(peers, batch).argmin(dim=0)
    return stacked[best, torch.arange(batch, device=stacked.device)]


def ensemble(name: str, logits, labels: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """The ensemble target named by ``method.ensemble``: one of mean_logits, mean_probs, minlogit, best."""
    if name == "mean_logits":
        return mean_logits(logits)
    if name == "mean_probs":
        return mean_probs(logits, temperature)
    if name == "minlogit":
        return minlogit(logits, labels)
    if name == "best":
        return best_peer(logits, labels)
    raise ConfigError("method.ensemble", name, f"one of: {', '.join(ENSEMBLES)}")


def others_mean(logits) -> torch.Tensor:
    """For each peer i, the mean over the other peers, m_i = (1/(P-1)) sum_{j != i} z_j, shape [P, B, C].

    This is DKEL's decoupled target (applied to the peers' EMA-teacher logits). It needs P >= 2.
    """
    stacked = _stacked(logits)
    peers = stacked.shape[0]
    if peers < 2:
        raise ValueError(f"others_mean needs at least 2 peers, got {peers}")
    # total minus self: one reduction instead of P
    return (stacked.sum(dim=0, keepdim=True) - stacked) / (peers - 1)
