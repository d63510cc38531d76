"""dkel: Decoupled Knowledge with Ensemble Learning for online distillation.

loss_i = ce_weight * CE(z_i, y) + alpha * w(e) * [ KD(z_i, e) + beta(e) * KD(z_i, mean_{j != i} t_j)
                                                  + (1 - beta(e)) * mean_{j != i} KD(z_i, t_j) ],
T = 3, alpha = 1: pcl's ensemble term, plus the decoupled target (the mean of the other peers' EMA teachers) that
hands over to the individual teachers as beta(e) = exp(-decay * e) falls (decay 0.5; beta is 0 below
``method.beta_floor`` = 0.01). Here ``decay`` drives beta, not alpha. The EMA teachers start as a copy of the student's
initial weights followed by ``method.teacher_init_steps`` (2) CE steps at lr / 100, and their EMA warm-up counter
starts after those steps, so the first update blends the init with the student instead of erasing it (the released
code erases it; ``reference_quirks: true`` reproduces that and the released ramp, see pcl).
"""

from raydistill.distill.ensembles import others_mean
from raydistill.distill.schedules import decoupled_beta
from raydistill.methods.base import register_method, stacked
from raydistill.methods.pcl import PeerCollaborativeLearning
from raydistill.names import EMA_LOGITS, LOGITS


@register_method("dkel")
class DecoupledKnowledgeEnsembleLearning(PeerCollaborativeLearning):
    defaults = {**PeerCollaborativeLearning.defaults, "decay": 0.5, "teacher_init_steps": 2, "beta_floor": 0.01}

    def alpha_at(self, epoch):
        return self.alpha_schedule(epoch, self.epochs)   # decay drives beta(e), not alpha

    def hyper(self, epoch):
        return {**super().hyper(epoch), "beta": decoupled_beta(epoch, self.config.decay, self.config.beta_floor)}

    def targets(self, hyper, peers, teachers, labels, learned_ensemble=None):
        targets = super().targets(hyper, peers, teachers, labels, learned_ensemble)
        decoupled = others_mean(stacked([p[EMA_LOGITS] for p in peers]))
        return [{**t, "decoupled_target": decoupled[i]} for i, t in enumerate(targets)]

    def term_weights(self, hyper):
        ramp, beta = hyper["ramp"], hyper["beta"]
        return {"kd_ensemble": ramp, "kd_decoupled": beta * ramp, "kd_teachers": (1.0 - beta) * ramp}

    def distill_terms(self, hyper, outputs, labels, targets):
        terms = super().distill_terms(hyper, outputs, labels, targets)
        terms["kd_decoupled"] = self.distill(outputs[LOGITS], targets["decoupled_target"], hyper["temperature"])
        return terms
