"""dml: Deep Mutual Learning, Zhang et al. 2018.

loss_i = ce_weight * CE(z_i, y) + alpha_e * (sum_{j != i} W_ij KD(z_i, z_j) + feature_weight * align_i)
W_ij = 1/(P-1) (the paper's mean over the other peers) or, with ``peer_weighting: performance``, the weights of
distill/peer_weights.performance_peer_weights from the peers' recent validation losses; T = 1 and alpha = 1 in the
paper. align_i (``feature_weight`` > 0, off by default) is peer feature alignment: the mean over j of
MSE(r_ij(f_i), f_j) with peer i's adapters r_ij toward each other peer's hint (distill/features.py).
The coordinator hands each peer the stacked logits of the other peers (and their hints where aligned).
"""
import numpy as np
import torch

from raydistill.data.views import to_device
from raydistill.distill.peer_weights import check_peer_weighting, performance_peer_weights, recent_loss
from raydistill.methods.base import Method, peer_alignment_term, register_method, stacked, with_peer_hints, without
from raydistill.names import LOGITS, PEER_WEIGHTS


@register_method("dml")
class DeepMutualLearning(Method):
    defaults = {**Method.defaults, "feature_weight": 0.0, "peer_weighting": "uniform", "features": {},
                "codistill_every": None}
    min_peers = 2

    @classmethod
    def check_keys(cls, config):
        check_peer_weighting(config.method.peer_weighting)
        cls.check_feature_weight(config.method)

    @property
    def feature_target(self):
        return "peers" if self.config.feature_weight else None

    @property
    def uses_peer_losses(self) -> bool:
        return self.config.peer_weighting == "performance"

    def with_peer_losses(self, targets, peer_losses):
        """W_ij from the peers' recent validation losses (``peer_weighting: performance``)."""
        if not self.uses_peer_losses:
            return targets
        weights = performance_peer_weights([recent_loss(losses) for losses in peer_losses])
        for i, target in enumerate(targets):
            device = target["peer_logits"].device
            target[PEER_WEIGHTS] = to_device(torch.from_numpy(np.delete(weights[i], i).astype(np.float32)), device)
        return targets

    def targets(self, hyper, peers, teachers, labels, learned_ensemble=None):
        logits = stacked([p[LOGITS] for p in peers])                    # [P, B, C]
        targets = [{"peer_logits": without(logits, i)} for i in range(len(peers))]
        return with_peer_hints(targets, peers)

    def term_weights(self, hyper):
        return {"align": float(self.config.feature_weight)}

    def distill_terms(self, hyper, outputs, labels, targets):
        others = targets["peer_logits"]                                    # [P-1, B, C]
        terms = [self.distill(outputs[LOGITS], other, hyper["temperature"]) for other in others]
        if PEER_WEIGHTS in targets:                                      # W_ij, j != i (performance weighting)
            kd = sum(w * term for w, term in zip(targets[PEER_WEIGHTS], terms))
        else:
            kd = sum(terms) / len(terms)
        return {"kd": kd, **peer_alignment_term(outputs, targets)}
