"""Methods by name: one small file per method, registered by decorator."""
from raydistill.methods import dml, independent, kd  # noqa: F401  (registration)
from raydistill.methods.base import Method, method_class, method_names, register_method


def method_defaults(name: str) -> dict:
    """The defaults a config resolves against (raises ConfigError for an unknown method)."""
    return dict(method_class(name).defaults)


def build_method(config) -> Method:
    """The method object of a resolved run config."""
    return method_class(config.method.name)(config.method, task=config.task, num_peers=config.num_peers,
                                            epochs=config.train.epochs)


__all__ = ["Method", "build_method", "method_class", "method_defaults", "method_names", "register_method"]
