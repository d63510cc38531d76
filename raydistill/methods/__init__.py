"""Methods by name: one small file per method, registered by decorator."""
from raydistill.methods import dkel, dml, fitnet, independent, kd, kdcl, pcl, self_distill  # noqa: F401  (registration)
from raydistill.methods.base import Method, method_class, method_names, register_method


def method_defaults(name: str) -> dict:
    """The defaults a config resolves against (raises ConfigError for an unknown method)."""
    return dict(method_class(name).defaults)


def methods_using(key: str) -> list[str]:
    """The methods that read a given ``method.*`` key (those that give it a default)."""
    return [name for name in method_names() if key in method_class(name).defaults]


def check_method_config(config) -> None:
    """The method's rules over the whole resolved config (the peers and teachers it needs, its own keys)."""
    method_class(config.method.name).check_config(config)


def build_method(config) -> Method:
    """The method object of a resolved run config."""
    return method_class(config.method.name)(config.method, task=config.task, num_peers=config.num_peers,
                                            epochs=config.train.epochs,
                                            teacher_weights=[t.weight for t in config.teacher_list])


__all__ = ["Method", "build_method", "check_method_config", "method_class", "method_defaults", "method_names",
           "methods_using", "register_method"]
