"""kdcl: Knowledge Distillation via Collaborative Learning, Guo et al. 2020.

loss_i = ce_weight * CE(z_i, y) + alpha_e * KD(z_i, e), one ensemble e of the peers' logits for every peer, each peer
on its own augmented view. ``method.ensemble``: mean_logits (KDCL-Naive), mean_probs, minlogit (KDCL-MinLogit:
e_c = min_k (z_k,c - z_k,y)), best (per sample, the peer with the lowest CE). T = 3 here, as pcl and dkel.
``feature_weight`` > 0 adds peer feature alignment, as in dml.
"""
from raydistill.methods.base import Method, peer_alignment_term, register_method, with_peer_hints
from raydistill.methods.online import ENSEMBLES, check_online_config, peer_ensemble
from raydistill.names import LOGITS


@register_method("kdcl")
class KnowledgeDistillationCollaborativeLearning(Method):
    defaults = {**Method.defaults, "temperature": 3.0, "per_peer_views": True,
                "ensemble": "minlogit", "feature_weight": 0.0, "features": {}, "codistill_every": None}
    min_peers = 2

    @classmethod
    def check_keys(cls, config):
        check_online_config(config.method, config.task, ENSEMBLES)
        cls.check_feature_weight(config.method)

    @property
    def feature_target(self):
        return "peers" if self.config.feature_weight else None

    def term_weights(self, hyper):
        return {"align": float(self.config.feature_weight)}

    def targets(self, hyper, peers, teachers, labels, learned_ensemble=None):
        target = peer_ensemble(self.config.ensemble, peers, labels, hyper["temperature"])
        return with_peer_hints([{"ensemble": target} for _ in peers], peers)

    def distill_terms(self, hyper, outputs, labels, targets):
        return {"kd_ensemble": self.distill(outputs[LOGITS], targets["ensemble"], hyper["temperature"]),
                **peer_alignment_term(outputs, targets)}
