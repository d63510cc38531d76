"""How much each peer learns from each other peer: uniform (DML) or by performance (``peer_weighting: performance``).
Pure functions of the peers' validation losses."""
import math
from collections.abc import Sequence

import numpy as np

from raydistill.errors import ConfigError

PEER_WEIGHTINGS = ("uniform", "performance")
LOSS_FLOOR = 1e-8  # a perfect peer (validation loss 0) would otherwise get an infinite share


def uniform_peer_weights(num_peers: int) -> np.ndarray:
    """DML's mean over the other peers: W[i, j] = 1/(N-1) for j != i, W[i, i] = 0 (all zeros for one peer)."""
    weights = np.full((num_peers, num_peers), 1.0 / max(num_peers - 1, 1))
    np.fill_diagonal(weights, 0.0)
    return weights


def performance_peer_weights(val_losses: Sequence[float]) -> np.ndarray:
    """Peer weights from the peers' recent validation losses L_1..L_N: a weaker peer takes more from stronger ones.

        W[i, j] = s_i * w_ij,  j != i;  W[i, i] = 0
        w_ij = (1 / L_j) / sum_{k != i} (1 / L_k)      peer i splits its attention by the others' strength
        s_i  = L_i / mean_k L_k                        peer i's distillation strength grows with its own loss

    Row i weighs peer i's distillation terms toward peers j (its loss uses sum_j W[i, j] * KD(z_i, z_j) in place of
    DML's mean_j). Equal losses give W = uniform_peer_weights (DML exactly), and the strengths s_i average to 1, so the
    overall distillation weight (alpha) keeps its meaning. Losses are floored at LOSS_FLOOR; a non-finite loss (a
    diverged peer, or no validation yet) gives the uniform weights, never a NaN in the targets.
    """
    losses = np.asarray(val_losses, dtype=np.float64)
    if losses.ndim != 1 or len(losses) < 1:
        raise ConfigError("peer validation losses", list(losses.ravel()), "one loss per peer")
    num_peers = len(losses)
    if num_peers == 1 or not np.all(np.isfinite(losses)):
        return uniform_peer_weights(num_peers)
    losses = np.maximum(losses, LOSS_FLOOR)
    strength = 1.0 / losses
    share = np.tile(strength, (num_peers, 1))
    np.fill_diagonal(share, 0.0)
    share /= share.sum(axis=1, keepdims=True)
    return (losses / losses.mean())[:, None] * share


def check_peer_weighting(value) -> str:
    if value not in PEER_WEIGHTINGS:
        raise ConfigError("method.peer_weighting", value, f"one of: {', '.join(PEER_WEIGHTINGS)}")
    return value


def recent_loss(history: Sequence[float], window: int = 3) -> float:
    """The mean of the last ``window`` validation losses of a peer (its "recent" loss); inf when none is known yet."""
    recent = [float(v) for v in list(history)[-window:]]
    return sum(recent) / len(recent) if recent else math.inf
