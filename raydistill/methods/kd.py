"""kd: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

loss = ce_weight * CE(z, y) + alpha_e * KD(z, z_teacher); on CIFAR T = 4, alpha = 0.9, ce_weight = 1 - alpha.
The teacher actor runs forward on each peer's view; the coordinator hands each peer the teacher's logits for its view.
"""
from raydistill.methods.base import Method, register_method


@register_method("kd")
class KnowledgeDistillation(Method):
    defaults = {**Method.defaults, "temperature": 4.0, "alpha": 0.9, "ce_weight": "complement",
                "needs_teacher": True}

    def targets(self, hyper, peers, teachers, labels, learned_ensemble=None):
        views = self.teacher_views()
        teacher_logits = teachers[0]["logits"]                             # [V, B, C], one per view in `views`
        return [{"teacher_logits": teacher_logits[views.index(self.view_index(i))]} for i in range(len(peers))]

    def distill_terms(self, hyper, outputs, labels, targets):
        return {"kd": self.distill(outputs["logits"], targets["teacher_logits"], hyper["temperature"])}
