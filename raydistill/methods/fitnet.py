"""fitnet: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

One-stage (``hint_epochs: 0``, the common modern form):
    loss = ce_weight * CE(z, y) + alpha_e * (hint_weight * MSE(r(f_s), f_t) + kd_weight * KD(z, z_t) + at_weight * AT)
with the hint layer = the middle stage of student and teacher, hint_weight 100 and kd_weight 0 by default
(RepDistiller's FitNet setting), r the student's adapter (1x1 conv + BN, or linear), AT the attention-transfer term
(Zagoruyko & Komodakis 2017) on the same pair of features, 0 by default.
Two-stage (``hint_epochs: H > 0``, the paper's): for epochs < H only the hint term trains the student (ce_weight 0),
then KD for the rest of the schedule: ce_weight * CE + alpha_e * KD(z, z_t) at the method's temperature.
The teacher actor sends its logits and its hint-layer features for each student's view.

Several teachers (``teachers: [...]``): each has its own hint layer (``features.teacher``: one module path for every
teacher, or a list of one per teacher) and the student owns one adapter per teacher (``teacher0``, ``teacher1``...;
one teacher keeps the single adapter ``teacher``). The hint term is the mean over the M teachers,
    hint = (1/M) sum_j MSE(r_j(f_s), f_t_j)        (and AT likewise: (1/M) sum_j AT(f_s, f_t_j)),
so hint_weight keeps its meaning whatever M is; the KD term distils the teachers' ensemble
(``method.teacher_ensemble``, methods/teachers.py). Teachers' ``weight`` enter the KD target only, never the hints.
"""
import torch

from raydistill.distill.features import attention_transfer_loss, hint_loss
from raydistill.errors import ConfigError
from raydistill.methods.base import register_method
from raydistill.methods.teachers import FromTeachers


def per_teacher(value) -> list:
    """A hint target or an adapted hint: one tensor (one teacher) or a list in teacher order (several)."""
    return value if isinstance(value, list) else [value]


def mean_over_teachers(terms: list[torch.Tensor]) -> torch.Tensor:
    """(1/M) sum_j term_j; one teacher's term as it is, so a one-teacher run computes exactly what it always did."""
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


@register_method("fitnet")
class FitNet(FromTeachers):
    defaults = {**FromTeachers.defaults, "temperature": 4.0, "alpha": 1.0, "ce_weight": 1.0,
                "hint_weight": 100.0, "kd_weight": 0.0, "at_weight": 0.0, "hint_epochs": 0, "features": {}}
    feature_target = "teacher"          # the student's adapters map its hint to each teacher's hint shape

    @classmethod
    def check_config(cls, method_config, task):
        super().check_config(method_config, task)
        m = method_config
        for key in ("hint_weight", "kd_weight", "at_weight"):
            value = getattr(m, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"method.{key}", value, "must be a number >= 0")
        if m.hint_epochs is not None and (isinstance(m.hint_epochs, bool) or not isinstance(m.hint_epochs, int)
                                          or m.hint_epochs < 0):
            raise ConfigError("method.hint_epochs", m.hint_epochs, "an integer >= 0 (0: one-stage)")

    def outputs_needed(self, role: str) -> tuple[str, ...]:
        return ("logits", "hint") if role == "teacher" else ("logits",)

    def hyper(self, epoch):
        hyper = super().hyper(epoch)
        m = self.config
        if m.hint_epochs and epoch < m.hint_epochs:         # stage 1: the hint alone
            hyper.update(ce_weight=0.0, hint_weight=float(m.hint_weight), kd_weight=0.0, at_weight=0.0)
        elif m.hint_epochs:                                 # stage 2: KD with the rest of the schedule
            hyper.update(hint_weight=0.0, kd_weight=1.0, at_weight=0.0)
        else:
            hyper.update(hint_weight=float(m.hint_weight), kd_weight=float(m.kd_weight), at_weight=float(m.at_weight))
        return hyper

    def term_weights(self, hyper):
        return {"hint": hyper["hint_weight"], "kd": hyper["kd_weight"], "at": hyper["at_weight"]}

    def targets(self, hyper, peers, teachers, labels, learned_ensemble=None):
        teacher_logits = self.teacher_logits(hyper, teachers)            # [V, B, C]; each hint [V, B, ...]
        targets = []
        for i in range(len(peers)):
            hints = [self.for_peer(t["hint"], i) for t in teachers]      # shapes may differ between teachers
            targets.append({"teacher_logits": self.for_peer(teacher_logits, i),
                            "teacher_hint": hints[0] if len(hints) == 1 else hints})
        return targets

    def distill_terms(self, hyper, outputs, labels, targets):
        adapted, hints = per_teacher(outputs["adapted_hint"]), per_teacher(targets["teacher_hint"])
        if len(adapted) != len(hints):
            raise ValueError(f"{len(adapted)} adapted hints for {len(hints)} teachers' hints")
        terms = {"hint": mean_over_teachers([hint_loss(a, h) for a, h in zip(adapted, hints)]),
                 "kd": self.distill(outputs["logits"], targets["teacher_logits"], hyper["temperature"])}
        if self.config.at_weight:
            terms["at"] = mean_over_teachers([attention_transfer_loss(outputs["hint"], h) for h in hints])
        return terms
