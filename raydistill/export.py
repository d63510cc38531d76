"""load_model(): a trained model without Ray — a torch.nn.Module in eval mode over float images in [0, 1], NCHW."""
from __future__ import annotations


import torch

from raydistill.data import DataSpec
from raydistill.engine.manifest import model_file, read_manifest
from raydistill.errors import ConfigError
from raydistill.models import build_model
from raydistill.names import PEER, peer_id, peer_name




def load_model(run_dir, peer: int | None = None, name: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """The deployable model of a run (default), peer ``peer`` (peer<peer>, removed from the run or not), or the
    exported model called ``name``.

    The module normalizes inside: give it float tensors in [0, 1] (images NCHW, tabular [N, F]). It comes in eval mode
    with its parameters frozen (``requires_grad=False``): its outputs carry no autograd history, so inference keeps no
    graph alive; call ``requires_grad_(True)`` on it to fine-tune.
    """
    manifest = read_manifest(run_dir)
    models = manifest["models"]
    if peer is not None and name is not None:
        raise ConfigError("peer", peer, f"give peer or name, not both (name={name!r})")
    if peer is not None:
        peers = sorted(peer_id(n) for n, entry in models.items() if entry["kind"] == PEER)
        if peer_name(peer) not in models:
            raise ConfigError("peer", peer, f"one of: {', '.join(map(str, peers))}")
        name = peer_name(peer)
    name = manifest["deploy"]["name"] if name is None else name
    if name not in models:
        raise ConfigError("name", name, f"one of: {', '.join(models)}")
    entry = models[name]
    spec = DataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["spec"].items()})
    model = build_model(entry["arch"], spec, **entry["options"])
    state = torch.load(model_file(run_dir, entry), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.requires_grad_(False).to(device).eval()


def exported_models(run_dir) -> dict[str, str]:
    """name -> kind (peer, ema_teacher) of every exported model."""
    return {name: entry["kind"] for name, entry in read_manifest(run_dir)["models"].items()}
