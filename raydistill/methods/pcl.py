"""pcl: Peer Collaborative Learning for Online Knowledge Distillation, Wu & Gong 2021.

loss_i = ce_weight * CE(z_i, y) + alpha_e * w(e) * [KD(z_i, e) + mean_{j != i} KD(z_i, t_j)], T = 3, where e is the
peers' ensemble and t_j the logits of peer j's temporal-mean (EMA) teacher, each peer on its own view.
w(e) = exp(-5 (1 - min(e, R)/R)^2) is the mean-teacher ramp with R = ``method.rampup_epochs`` (80 of the sources' 200
epochs; a shorter run ramps over 0.4 of its epochs). The released code divides the ramp by the wrong constant
(distillation off for epochs 1-80, then 0.1) and starts its EMA warm-up counter at 0 (the first update copies the
student); ``method.reference_quirks: true`` reproduces both, the default implements the intended formulas.

``ensemble: learned_head`` is PCL's peer ensemble teacher: a linear classifier in the coordinator over the
concatenated, detached pooled features of the peers (the input of each peer's ``net.fc``), trained there with CE.
In PCL its gradient also reaches the shared layers; here the peers are separate networks on separate actors, so it
does not reach the peers: only its logits (as the target e) do.
"""

from raydistill.distill.ema import ema_momentum, reference_quirk_ema_momentum
from raydistill.distill.schedules import reference_quirk_rampup, sigmoid_rampup
from raydistill.methods.base import Method, register_method, stacked, without
from raydistill.methods.online import ENSEMBLES, LEARNED_HEAD, check_online_config, peer_ensemble
from raydistill.names import EMA_LOGITS, LOGITS


@register_method("pcl")
class PeerCollaborativeLearning(Method):
    defaults = {**Method.defaults, "temperature": 3.0, "per_peer_views": True,
                "ensemble": "mean_logits", "rampup_epochs": 80.0, "ema_momentum": 0.999, "teacher_init_steps": 0,
                "reference_quirks": False, "codistill_every": None}
    min_peers = 2
    uses_ema_teacher = True
    ema_targets = True

    @classmethod
    def check_keys(cls, config):
        check_online_config(config.method, config.task, ENSEMBLES + (LEARNED_HEAD,))

    @property
    def learned_head(self) -> bool:
        return self.config.ensemble == LEARNED_HEAD

    def hyper(self, epoch):
        ramp = reference_quirk_rampup if self.config.reference_quirks else sigmoid_rampup
        return {**super().hyper(epoch), "ramp": ramp(epoch, self.config.rampup_epochs)}

    def feature_taps(self):
        return [("net.fc", "input")] if self.config.ensemble == LEARNED_HEAD else []

    def ema_momentum(self, update: int) -> float:
        """Momentum of the EMA teacher's ``update``-th update (counted from 1 after the teacher's init steps)."""
        if self.config.reference_quirks:
            return reference_quirk_ema_momentum(update - 1, self.config.ema_momentum)
        return ema_momentum(update, self.config.ema_momentum)

    def targets(self, hyper, peers, teachers, labels, learned_ensemble=None):
        target = peer_ensemble(self.config.ensemble, peers, labels, hyper["temperature"], learned_ensemble)
        ema = stacked([p[EMA_LOGITS] for p in peers])                          # [P, B, C]
        return [{"ensemble": target, "teacher_logits": without(ema, i)} for i in range(len(peers))]

    def term_weights(self, hyper):
        return {"kd_ensemble": hyper["ramp"], "kd_teachers": hyper["ramp"]}

    def distill_terms(self, hyper, outputs, labels, targets):
        logits, temperature = outputs[LOGITS], hyper["temperature"]
        to_teachers = [self.distill(logits, t, temperature) for t in targets["teacher_logits"]]
        return {"kd_ensemble": self.distill(logits, targets["ensemble"], temperature),
                "kd_teachers": sum(to_teachers) / len(to_teachers)}
