"""fitnet: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

One-stage (``hint_epochs: 0``, the common modern form):
    loss = ce_weight * CE(z, y) + alpha_e * (hint_weight * MSE(r(f_s), f_t) + kd_weight * KD(z, z_t) + at_weight * AT)
with the hint layer = the middle stage of student and teacher, hint_weight 100 and kd_weight 0 by default
(RepDistiller's FitNet setting), r the student's adapter (1x1 conv + BN, or linear), at_weight 0 by default.
AT is attention transfer (Zagoruyko & Komodakis 2017), summed over its layer pairs as the authors' code sums it:
    AT = sum_k AT_k(f_s^k, f_t^k),  AT_k in ``method.at_form`` (distill/features.py ``attention_transfer_loss``)
on the hint pair, or on the pairs of ``features.attention`` (the authors use one per residual group: three on
CIFAR ResNets). ``at_form: code`` (default) is the authors' released computation, with which at_weight 1000 (their
beta) reproduces them; ``paper`` is Eq. 2's norm as written.
Two-stage (``hint_epochs: H > 0``, the paper's): for epochs < H only the hint term trains the student (ce_weight 0),
then KD for the rest of the schedule: ce_weight * CE + alpha_e * KD(z, z_t) at the method's temperature.
The teacher actor sends its logits and its hint-layer features for each student's view (and its attention layers'
features, ``attention0``, ``attention1``..., where pairs are named).

Several teachers (``teachers: [...]``): each has its own hint layer (``features.teacher``: one module path for every
teacher, or a list of one per teacher) and the student owns one adapter per teacher (``teacher0``, ``teacher1``...;
one teacher keeps the single adapter ``teacher``). The hint term is the mean over the M teachers,
    hint = (1/M) sum_j MSE(r_j(f_s), f_t_j)        (and AT likewise: (1/M) sum_j AT(f_s, f_t_j)),
so hint_weight keeps its meaning whatever M is; the KD term distils the teachers' ensemble
(``method.teacher_ensemble``, methods/teachers.py). Teachers' ``weight`` enter the KD target only, never the hints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raydistill.distill.features import AT_FORMS, attention_transfer_loss, hint_loss
from raydistill.errors import ConfigError
from raydistill.methods.base import register_method
from raydistill.methods.teachers import FromTeachers
from raydistill.names import ADAPTED_HINT, HINT, LOGITS

PAIR_FORM = "a module path for both networks, or {student: PATH, teacher: PATH or a list of one per teacher}"


@dataclass(frozen=True)
class AttentionPair:
    """One layer pair of attention transfer, as configured: the student's module path and the teacher's (a list:
    one per teacher); ``field`` names it in errors, ``named`` when written {student, teacher}."""
    student: str
    teacher: str | list
    field: str
    named: bool


def attention_output(k: int) -> str:
    """The name of a teacher's output that carries its side of attention pair k."""
    return f"attention{k}"


def attention_layers(method_config) -> list[AttentionPair] | None:
    """The layer pairs of ``method.features.attention``: a list whose items are one module path (the same layer in
    both networks: ``[layer1, layer2, layer3]``) or {student: PATH, teacher: PATH}; None when absent (attention
    transfer, if on, compares the hint pair)."""
    configured = (method_config.features or {}).get("attention") if isinstance(method_config.features, dict) else None
    if configured is None:
        return None
    if not isinstance(configured, list) or not configured:
        raise ConfigError("method.features.attention", configured, f"a list of layer pairs, each {PAIR_FORM}")
    pairs = []
    for k, item in enumerate(configured):
        field = f"method.features.attention.{k}"
        if isinstance(item, str) and item:
            pairs.append(AttentionPair(item, item, field, named=False))
            continue
        teacher = item.get("teacher") if isinstance(item, dict) else None
        teachers = teacher if isinstance(teacher, list) else [teacher]
        if not (isinstance(item, dict) and set(item) == {"student", "teacher"} and isinstance(item["student"], str)
                and item["student"] and teachers and all(isinstance(t, str) and t for t in teachers)):
            raise ConfigError(field, item, PAIR_FORM)
        pairs.append(AttentionPair(item["student"], teacher, field, named=True))
    return pairs


def per_teacher(value) -> list:
    """A hint target or an adapted hint: one tensor (one teacher) or a list in teacher order (several)."""
    return value if isinstance(value, list) else [value]


def mean_over_teachers(terms: list[torch.Tensor]) -> torch.Tensor:
    """(1/M) sum_j term_j; one teacher's term as it is, so a one-teacher run computes exactly what it always did."""
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


def sum_over_pairs(terms: list[torch.Tensor]) -> torch.Tensor:
    """sum_k AT_k over the layer pairs (the authors' code sums them under one beta); one pair's term as it is."""
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


@register_method("fitnet")
class FitNet(FromTeachers):
    defaults = {**FromTeachers.defaults, "temperature": 4.0, "alpha": 1.0, "ce_weight": 1.0,
                "hint_weight": 100.0, "kd_weight": 0.0, "at_weight": 0.0, "at_form": "code", "hint_epochs": 0,
                "features": {}}
    feature_target = "teacher"          # the student's adapters map its hint to each teacher's hint shape

    @classmethod
    def check_keys(cls, config):
        super().check_keys(config)
        m = config.method
        for key in ("hint_weight", "kd_weight", "at_weight"):
            value = getattr(m, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"method.{key}", value, "must be a number >= 0")
        if m.hint_epochs is not None and (isinstance(m.hint_epochs, bool) or not isinstance(m.hint_epochs, int)
                                          or m.hint_epochs < 0):
            raise ConfigError("method.hint_epochs", m.hint_epochs, "an integer >= 0 (0: one-stage)")
        if m.at_form not in AT_FORMS:
            raise ConfigError("method.at_form", m.at_form, "code (the authors' released at_loss: mean of squared "
                              "differences, at_weight 1000) or paper (Eq. 2's norm)")
        if m.at_weight and m.hint_epochs:
            raise ConfigError("method.at_weight", m.at_weight, "0 with method.hint_epochs > 0 (two-stage FitNet "
                              "trains hints, then KD: no stage takes attention transfer)")
        if attention_layers(m) is not None and not m.at_weight:
            raise ConfigError("method.features.attention", m.features["attention"], "layer pairs of attention "
                              "transfer: only with method.at_weight > 0")

    @property
    def attention_pairs(self) -> list[AttentionPair]:
        """The named attention pairs the teacher sends its side of (none: attention on the hint pair, or off)."""
        return (attention_layers(self.config) or []) if self.config.at_weight else []

    def outputs_needed(self, role: str) -> tuple[str, ...]:
        if role != "teacher":
            return (LOGITS,)
        return (LOGITS, HINT, *(attention_output(k) for k in range(len(self.attention_pairs))))

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
        pairs = range(len(self.attention_pairs))
        targets = []
        for i in range(len(peers)):
            hints = [self.for_peer(t[HINT], i) for t in teachers]      # shapes may differ between teachers
            target = {"teacher_logits": self.for_peer(teacher_logits, i),
                      "teacher_hint": hints[0] if len(hints) == 1 else hints}
            if pairs:                                                    # per teacher, the maps in pair order
                target["teacher_attention"] = [[self.for_peer(t[attention_output(k)], i) for k in pairs]
                                               for t in teachers]
            targets.append(target)
        return targets

    def distill_terms(self, hyper, outputs, labels, targets):
        adapted, hints = per_teacher(outputs[ADAPTED_HINT]), per_teacher(targets["teacher_hint"])
        if len(adapted) != len(hints):
            raise ValueError(f"{len(adapted)} adapted hints for {len(hints)} teachers' hints")
        terms = {"hint": mean_over_teachers([hint_loss(a, h) for a, h in zip(adapted, hints)]),
                 "kd": self.distill(outputs[LOGITS], targets["teacher_logits"], hyper["temperature"])}
        if self.config.at_weight:
            terms["at"] = mean_over_teachers([sum_over_pairs([attention_transfer_loss(s, t, form=self.config.at_form)
                                                              for s, t in pairs])
                                              for pairs in self.attention_pairs_of(outputs, targets, hints)])
        return terms

    @staticmethod
    def attention_pairs_of(outputs: dict, targets: dict, hints: list) -> list[list[tuple]]:
        """Per teacher, the (student map, teacher map) of every attention pair: the named pairs, or the hint pair."""
        if "teacher_attention" not in targets:
            return [[(outputs[HINT], h)] for h in hints]
        per_teacher_maps = targets["teacher_attention"]
        for maps in per_teacher_maps:
            if len(maps) != len(outputs["attention"]):
                raise ValueError(f"{len(outputs['attention'])} student attention maps for {len(maps)} teacher maps")
        return [list(zip(outputs["attention"], maps)) for maps in per_teacher_maps]
