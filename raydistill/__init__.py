"""raydistill: distributed peer training by knowledge distillation on Ray.

    import raydistill
    result = raydistill.train("dml-digits", output="runs/demo")       # -> RunResult(run_dir, summary)
    model = raydistill.load_model("runs/demo")                         # the deployable model, no Ray needed
"""
__version__ = "0.1.0"

from raydistill.config import load_config  # noqa: E402
from raydistill.errors import ConfigError  # noqa: E402


def train(config=None, output=None, **kwargs):
    """See :func:`raydistill.runtime.launch.train` (``import raydistill`` does not import Ray, nor does an in-process run)."""
    from raydistill.runtime.launch import train as _train

    return _train(config, output, **kwargs)


def tune(config=None, space=None, **kwargs):
    """See :func:`raydistill.tune.tune`: a Ray Tune search, each trial one whole run; returns the best trial."""
    from raydistill.tune import tune as _tune

    return _tune(config, space, **kwargs)


def load_model(run_dir, peer=None, name=None, device="cpu"):
    from raydistill.export import load_model as _load

    return _load(run_dir, peer=peer, name=name, device=device)


__all__ = ["ConfigError", "load_config", "load_model", "train", "tune", "__version__"]
