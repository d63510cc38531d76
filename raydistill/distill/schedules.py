"""Per-epoch weights of the distillation terms: ramps, decays and schedules; all pure functions of the epoch."""

import math
from collections.abc import Callable, Mapping

from raydistill.errors import ConfigError

Schedule = Callable[..., float]  # f(epoch, total_epochs=None) -> float


def sigmoid_rampup(epoch: float, rampup_epochs: float, w_max: float = 1.0) -> float:
    """Mean-teacher ramp-up (Laine & Aila 2017; as OKDDip writes it): w(e) = w_max * exp(-5 (1 - min(e, R)/R)^2).

    w(0) = w_max * exp(-5), w(R) = w_max, constant after R. R <= 0 means no ramp (w_max from the start).
    """
    if rampup_epochs <= 0:
        return float(w_max)
    phase = 1.0 - min(max(epoch, 0.0), rampup_epochs) / rampup_epochs
    return float(w_max * math.exp(-5.0 * phase * phase))


def reference_quirk_rampup(epoch: float, rampup_epochs: float = 80, w_max: float = 1.0) -> float:
    """The ramp the released DKEL/PCL code computes, which divides by the wrong constant.

    Its effect: distillation is switched off (0) for every epoch e < R, then held at a constant 0.1 * w_max.
    Kept only to reproduce the released numbers; ``sigmoid_rampup`` is the intended formula.
    """
    return 0.0 if epoch < rampup_epochs else 0.1 * w_max


def decoupled_beta(epoch: float, decay: float, floor: float = 0.01) -> float:
    """DKEL's weight of the decoupled target: beta(e) = exp(-decay * e), set to 0 once it falls below ``floor``."""
    beta = math.exp(-decay * epoch)
    return 0.0 if beta < floor else beta


def decayed_alpha(alpha: float, epoch: float, decay: float) -> float:
    """Distillation weight decayed per epoch: alpha_e = alpha * exp(-decay * e); decay 0 keeps alpha."""
    return alpha * math.exp(-decay * epoch)


def warmup_hold(epoch: float, warmup_epochs: float) -> float:
    """0 during the first ``warmup_epochs`` epochs, 1 after."""
    return 0.0 if epoch < warmup_epochs else 1.0


def constant(value: float) -> Callable[[float], float]:
    """f(e) = value."""
    return lambda epoch: float(value)


def _progress(epoch: float, epochs: float) -> float:
    """Fraction of the schedule done, clipped to [0, 1]; a schedule of 0 epochs is already done."""
    return 1.0 if epochs <= 0 else min(max(epoch / epochs, 0.0), 1.0)


def linear(start: float, end: float, epochs: float) -> Callable[[float], float]:
    """f(e) = start + (end - start) * min(e / epochs, 1): straight from start to end, then held at end."""
    return lambda epoch: start + (end - start) * _progress(epoch, epochs)


def cosine(start: float, end: float, epochs: float) -> Callable[[float], float]:
    """f(e) = end + (start - end) * (1 + cos(pi * min(e / epochs, 1))) / 2 (SGDR's annealing), then held at end."""
    return lambda epoch: end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(epoch, epochs)))


def exponential(start: float, decay: float) -> Callable[[float], float]:
    """f(e) = start * exp(-decay * e)."""
    return lambda epoch: start * math.exp(-decay * epoch)


# kind -> (required keys, optional keys); warmup_epochs is allowed for every kind
_KINDS = {
    "constant": (("value",), ()),
    "linear": (("start", "end"), ("epochs",)),
    "cosine": (("start", "end"), ("epochs",)),
    "exponential": (("start", "decay"), ()),
}


def _number(value, field: str, allowed: str = "a finite number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(field, value, allowed)
    return float(value)


def make_schedule(spec, default, field: str) -> Schedule:
    """Turn a config value into f(epoch, total_epochs=None) -> float.

    ``spec`` is a number (constant), None (use ``default``, itself a number or a mapping), or a mapping:
    ``{kind: constant, value}``, ``{kind: linear, start, end[, epochs]}``, ``{kind: cosine, start, end[, epochs]}``,
    ``{kind: exponential, start, decay}``. linear and cosine run over ``epochs`` or, when it is absent, the run's
    ``total_epochs``. Any kind takes ``warmup_epochs``: the value is 0 before it and the schedule (on the run's
    epoch clock) after it. Bad kinds, keys or values raise ConfigError naming ``field`` (or ``field.key``).
    """
    if spec is None:
        spec = default
    if not isinstance(spec, Mapping):
        value = _number(spec, field, "a number or a mapping with kind: " + ", ".join(_KINDS))
        return lambda epoch, total_epochs=None: value

    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"{field}.kind", kind, "one of: " + ", ".join(_KINDS))
    required, optional = _KINDS[kind]
    allowed_keys = ("kind", *required, *optional, "warmup_epochs")
    for key in spec:
        if key not in allowed_keys:
            raise ConfigError(f"{field}.{key}", spec[key], f"keys allowed for kind {kind}: {', '.join(allowed_keys)}")
    for key in required:
        if key not in spec:
            raise ConfigError(f"{field}.{key}", None, f"required for kind {kind}")
    numbers = {key: _number(spec[key], f"{field}.{key}") for key in spec if key != "kind"}
    for key in ("epochs", "warmup_epochs"):
        if key in numbers and numbers[key] < 0:
            raise ConfigError(f"{field}.{key}", spec[key], "a number >= 0")

    warmup_epochs = numbers.get("warmup_epochs", 0.0)

    def schedule(epoch: float, total_epochs: float | None = None) -> float:
        if kind == "constant":
            value = numbers["value"]
        elif kind == "exponential":
            value = exponential(numbers["start"], numbers["decay"])(epoch)
        else:
            epochs = numbers.get("epochs", total_epochs)
            if epochs is None:
                raise ConfigError(f"{field}.epochs", None, f"required for kind {kind} when the run length is unknown")
            shape = linear if kind == "linear" else cosine
            value = shape(numbers["start"], numbers["end"], epochs)(epoch)
        return warmup_hold(epoch, warmup_epochs) * value

    return schedule
