"""Architectures by name: ``build_model(arch, spec, **options)`` is the one place that builds a model from a name.

Our own archs (``model_names()``): resnet20/32/44/56/110 (CIFAR ResNets), ``wrn{depth}_{width}`` (WideResNets),
``cnn_small`` and ``mlp``; besides these, any torchvision classification model by name, with fresh weights. Every
model comes wrapped in :class:`Normalized`, so its stages are reached as ``net.layer1`` .. ``net.layer3``, ``net.fc``.
"""

from raydistill.models.registry import Normalized, build_model, check_arch, model_names, register_model

# Importing the arch modules fills the registry.
from raydistill.models import cifar_resnet, wide_resnet, small  # noqa: E402,F401  isort: skip

__all__ = ["Normalized", "build_model", "check_arch", "model_names", "register_model"]
