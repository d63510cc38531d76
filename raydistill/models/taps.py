"""Feature taps by module path: forward hooks that keep what a named module took in or gave out (torchdistill's
idea), so a method can read intermediate features without rewriting the model.

    taps = FeatureTaps(model, [("net.fc", "input")])   # the pooled features the classifier sees
    logits = model(x)
    pooled = taps["net.fc"]                            # [B, F], still attached to the graph
"""
from __future__ import annotations

import torch
from torch import nn

from raydistill.errors import ConfigError

CAPTURES = ("input", "output")


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path ("net.layer3", "net.fc"); ConfigError naming the known paths otherwise."""
    modules = dict(model.named_modules())
    if path not in modules:
        known = [name for name in modules if name and name.count(".") <= 1]
        raise ConfigError("tap", path, f"a module path of the model, such as: {', '.join(known[:12])}")
    return modules[path]


class FeatureTaps:
    """Forward hooks on modules by path; ``taps[path]`` is the tensor of the latest forward pass.

    capture "output" keeps the module's output, "input" its first positional input. The tensors are kept as they
    are (attached to the graph, so a feature loss can backpropagate through them); detach them to send them away.
    """

    def __init__(self, model: nn.Module, taps: list[tuple[str, str]]):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        for path, capture in taps:
            if capture not in CAPTURES:
                raise ConfigError("tap capture", capture, f"one of: {', '.join(CAPTURES)}")
            module = module_at(model, path)
            self.handles.append(module.register_forward_hook(self._hook(path, capture)))
        self.paths = [path for path, _ in taps]

    def _hook(self, path: str, capture: str):
        def keep(module, inputs, output):
            self.features[path] = inputs[0] if capture == "input" else output
        return keep

    def __getitem__(self, path: str) -> torch.Tensor:
        if path not in self.features:
            raise KeyError(f"no forward pass has reached the tap {path!r} yet")
        return self.features[path]

    def pooled(self) -> torch.Tensor:
        """Every tap of the latest pass, flattened per sample and concatenated: [B, sum of sizes]."""
        return torch.cat([self[path].flatten(1) for path in self.paths], dim=1)

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        """Takes the hooks off the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.features.clear()
