"""kd: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

loss = ce_weight * CE(z, y) + alpha_e * KD(z, z_teacher); on CIFAR T = 4, alpha = 0.9, ce_weight = 1 - alpha.
The teacher members run forward on each peer's view; the coordinator hands each peer the teacher's logits for its view,
or, with several teachers, their ensemble on that view (``method.teacher_ensemble``, methods/teachers.py).
"""
from raydistill.methods.base import register_method
from raydistill.methods.teachers import FromTeachers
from raydistill.names import LOGITS


@register_method("kd")
class KnowledgeDistillation(FromTeachers):
    defaults = {**FromTeachers.defaults, "temperature": 4.0, "alpha": 0.9, "ce_weight": "complement"}

    def targets(self, hyper, peers, teachers, labels, learned_ensemble=None):
        teacher_logits = self.teacher_logits(hyper, teachers)              # [V, B, C], one per view in teacher_views
        return [{"teacher_logits": self.for_peer(teacher_logits, i)} for i in range(len(peers))]

    def distill_terms(self, hyper, outputs, labels, targets):
        return {"kd": self.distill(outputs[LOGITS], targets["teacher_logits"], hyper["temperature"])}
