"""self: self-distillation, one network taught by a teacher made of itself.

    loss = ce_weight * task(z, y) + alpha_e * (KD(z, z_t) + hidden_weight * MSE(f, f_t))
where the teacher t is, per peer:
- ``generations: 1`` — an EMA of the student's own weights (mean teacher, Tarvainen & Valpola 2017), momentum
  ``ema_momentum`` (0.999) per step; it must be > 0, or the teacher would be the student itself and the term a no-op;
- ``generations: K >= 2`` — born-again networks (Furlanello et al. 2018): train.epochs are split into K generations
  of equal length; each generation starts a fresh student (new initialization, optimizer and learning-rate schedule)
  taught by a frozen snapshot of the previous generation's final student; generation 1 has no teacher (alpha 0).
For regression KD is the MSE toward the teacher's predictions. The hidden term (``hidden_weight`` > 0) is the MSE
between the student's and the teacher's hint-layer features (``features.student``, the middle stage by default):
same network, same shape, no adapter. T = 1 and alpha = 1 by default (BAN's CE + KD at T = 1).
The teacher lives inside the peer that it teaches: nothing is exchanged, the coordinator sends no targets.
"""
from raydistill.distill.features import hint_loss
from raydistill.errors import ConfigError
from raydistill.methods.base import Method, register_method
from raydistill.names import HINT, LOGITS


@register_method("self")
class SelfDistillation(Method):
    defaults = {**Method.defaults, "temperature": 1.0, "alpha": 1.0, "ce_weight": 1.0, "generations": 1,
                "ema_momentum": 0.999, "hidden_weight": 0.0, "features": {}}
    feature_target = "self"             # the hint of the teacher copy of the same network: no adapter
    self_teacher = True                 # the peer holds its own teacher (EMA or the previous generation)

    @classmethod
    def check_keys(cls, config):
        m = config.method
        if isinstance(m.generations, bool) or not isinstance(m.generations, int) or m.generations < 1:
            raise ConfigError("method.generations", m.generations, "an integer >= 1 (1: EMA teacher)")
        if m.generations == 1 and not 0.0 < m.ema_momentum < 1.0:
            raise ConfigError("method.ema_momentum", m.ema_momentum,
                              "must be in (0, 1): at 0 the EMA teacher is the student itself and teaches nothing")
        if m.hidden_weight is None or m.hidden_weight < 0:
            raise ConfigError("method.hidden_weight", m.hidden_weight, "must be a number >= 0")

    @property
    def uses_ema_teacher(self) -> bool:
        return self.config.generations == 1

    @property
    def self_teacher_kind(self) -> str:
        return "ema" if self.config.generations == 1 else "generations"

    @property
    def deploy_kind(self) -> str:
        return "peer"                   # the student is the model; its teacher is a means of training it

    @property
    def uses_hint(self) -> bool:
        return bool(self.config.hidden_weight)

    def ema_momentum(self, update: int) -> float:
        from raydistill.distill.ema import ema_momentum

        return ema_momentum(update, self.config.ema_momentum)

    # ---- born-again generations -------------------------------------------------------------------------------------
    @property
    def generation_epochs(self) -> int:
        """Epochs per generation (the last one takes the remainder)."""
        return max(self.epochs // self.config.generations, 1)

    def generation(self, epoch: int) -> int:
        """0-based generation of an epoch."""
        return min(epoch // self.generation_epochs, self.config.generations - 1)

    def generation_start(self, epoch: int) -> int:
        return self.generation(epoch) * self.generation_epochs

    def hyper(self, epoch):
        hyper = super().hyper(epoch)
        if self.config.generations > 1 and self.generation(epoch) == 0:
            hyper["alpha"] = 0.0                            # the first generation has no teacher yet
            if self.config.ce_weight == "complement":
                hyper["ce_weight"] = 1.0
        hyper["hidden_weight"] = float(self.config.hidden_weight)
        return hyper

    def term_weights(self, hyper):
        return {"hidden": hyper["hidden_weight"]}

    def distill_terms(self, hyper, outputs, labels, targets):
        if "teacher_logits" not in targets:                 # generation 1 of born-again: no teacher
            zero = outputs[LOGITS].sum() * 0.0
            terms = {"kd": zero}
            if self.uses_hint:
                terms["hidden"] = zero
            return terms
        terms = {"kd": self.distill(outputs[LOGITS], targets["teacher_logits"], hyper["temperature"])}
        if self.uses_hint:
            terms["hidden"] = hint_loss(outputs[HINT], targets["teacher_hint"])
        return terms
