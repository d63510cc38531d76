"""dml: Deep Mutual Learning, Zhang et al. 2018.

loss_i = ce_weight * CE(z_i, y) + alpha_e * mean_{j != i} KD(z_i, z_j), T = 1 and alpha = 1 in the paper.
The coordinator hands each peer the stacked logits of the other peers; nothing else is exchanged.
"""
import numpy as np

from raydistill.methods.base import Method, register_method


@register_method("dml")
class DeepMutualLearning(Method):
    defaults = {**Method.defaults, "min_peers": 2}

    def targets(self, hyper, peers, teachers, labels):
        logits = np.stack([p["logits"] for p in peers])                   # [P, B, C]
        return [{"peer_logits": np.delete(logits, i, axis=0)} for i in range(len(peers))]

    def distill_terms(self, hyper, outputs, labels, targets):
        others = targets["peer_logits"]                                    # [P-1, B, C]
        terms = [self.distill(outputs["logits"], other, hyper["temperature"]) for other in others]
        return {"kd": sum(terms) / len(terms)}
