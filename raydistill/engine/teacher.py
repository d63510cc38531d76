"""A frozen teacher: loads a checkpoint, runs forward on the views its students train on. No Ray.

A run has one teacher (``teacher:``) or several (``teachers: [...]``); each is its own member, ``Teacher(j, ...)``
built from ``config.teacher_list[j]``, and every error about it names where it is written (``teacher.checkpoint``,
``teachers.1.checkpoint``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raydistill.engine.hints import teacher_hint
from raydistill.engine.manifest import deployed_entry, manifest_path, model_file, read_manifest
from raydistill.engine.data import DataView
from raydistill.engine.peer import autocast, pick_device
from raydistill.engine.teacher_cache import CachedTeacher
from raydistill.errors import ConfigError
from raydistill.methods import build_method
from raydistill.methods.fitnet import attention_output
from raydistill.models import build_model
from raydistill.names import HINT, LOGITS, TEACHER, teacher_name


def load_teacher_weights(model: torch.nn.Module, checkpoint: str, arch: str, field: str = "teacher") -> None:
    """Loads a raydistill run directory (its deployable model), an exported .pt, or a torchvision state dict.

    field: where the teacher is written (``teacher``, ``teachers.1``); a checkpoint that is unreadable or of another
    architecture is refused with one line naming ``{field}.checkpoint``.
    """
    where = f"{field}.checkpoint"
    path = Path(checkpoint)
    if path.is_dir():
        if not manifest_path(path).is_file():
            raise ConfigError(where, checkpoint, "is a directory without export/manifest.json "
                              "(give a finished raydistill run directory or a .pt file)")
        entry = deployed_entry(read_manifest(path, where))
        if entry["arch"] != arch:
            raise ConfigError(where, checkpoint, f"holds a {entry['arch']} model, but {field}.arch is {arch}")
        path = model_file(path, entry)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any unreadable file gets the same one-line answer
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(where, checkpoint, f"cannot be read as a weights file ({first})") from None
    if not isinstance(state, dict):
        raise ConfigError(where, checkpoint, f"holds a {type(state).__name__}, not a state dict of weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not any(key.startswith("net.") for key in state):     # a plain (e.g. torchvision) state dict of the network
        state = {**{f"net.{k}": v for k, v in state.items()}, "mean": model.mean, "std": model.std}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        missing, unexpected = _key_differences(model, state)
        raise ConfigError(where, checkpoint, f"does not fit {field}.arch={arch} (missing {missing}, unexpected "
                          f"{unexpected}, or shapes differ)") from err


def _key_differences(model, state, show: int = 3):
    own, theirs = set(model.state_dict()), set(state)
    missing = sorted(own - theirs)
    unexpected = sorted(theirs - own)
    return (f"{len(missing)} keys such as {missing[:show]}" if missing else "0 keys",
            f"{len(unexpected)} keys such as {unexpected[:show]}" if unexpected else "0 keys")


def check_teachers(config, spec) -> None:
    """Every teacher of a run, as its worker will build it: weights loaded from its checkpoint, its hint layer found
    where the method reads one. The driver calls it before Ray starts; the first problem is one ConfigError."""
    method = build_method(config)
    for j, settings in enumerate(config.teacher_list):
        model = build_model(settings.arch, spec, **settings.options)
        load_teacher_weights(model, settings.checkpoint, settings.arch, config.teacher_field(j))
        if HINT in method.outputs_needed(TEACHER):
            teacher_hint(model, config, j, spec)


def cache_folder(config, index: int = 0) -> str | None:
    """Where teacher ``index``'s ``cache`` keeps its outputs: the folder it names, or None (no cache). ``true`` is
    replaced by ``<run directory>/teacher_cache`` when the run starts; each teacher writes ``FOLDER/teacher<j>``."""
    cache = config.teacher_list[index].cache
    if cache is True:
        raise ConfigError(f"{config.teacher_field(index)}.cache", cache, "a folder: `raydistill train` sets it to the "
                          "run directory's teacher_cache/ (an engine Teacher built by hand needs the folder itself)")
    return cache or None


class Teacher:
    def __init__(self, index: int, config, data, spec, device: str | None = None, method=None):
        """data: the worker's DataView, shared by its members (or the run's data set: a view of its own); method: the
        run's method object, shared by a worker's members; None builds one."""
        torch.set_num_threads(config.resources.threads_per_peer)
        self.index = index
        self.config = config
        gpus = config.resources.gpus_per_teacher or 0.0
        self.device = torch.device(device) if device else pick_device(gpus)
        self.data = DataView.of(config, data)
        method = method or build_method(config)
        self.views = method.teacher_views()
        self.output_names = list(method.outputs_needed(TEACHER))
        self.settings = config.teacher_list[index]
        self.model = build_model(self.settings.arch, spec, **self.settings.options)
        load_teacher_weights(self.model, self.settings.checkpoint, self.settings.arch, config.teacher_field(index))
        self.model.to(self.device).eval()
        self.hint = None
        if HINT in self.output_names:
            self.hint = teacher_hint(self.model, config, index, spec)
        folder = cache_folder(config, index)
        self.cache = CachedTeacher(self, Path(folder) / teacher_name(index)) if folder else None

    def forward(self, epoch: int, step: int, replay: int = 0) -> dict[str, np.ndarray]:
        """The teacher's outputs for each view the peers train on at this step: logits [V, B, C] (and its hint
        features [V, B, ...] where the method asks for them), from the cache when there is one."""
        if self.cache is not None and not replay:       # the cache holds first attempts only, never a replay's order
            return self.cache.forward(epoch, step)
        return self.live_forward(epoch, step, replay)

    @torch.no_grad()
    def live_forward(self, epoch: int, step: int, replay: int = 0) -> dict[str, np.ndarray]:
        outputs = {name: [] for name in self.output_names}
        for v in self.views:
            with autocast(self.device, self.config.train.bf16):
                outputs[LOGITS].append(self.model(self.data.view(epoch, step, v, replay, self.device)).float())
            if self.hint is not None:
                outputs[HINT].append(self.hint.value.float())
                for k, features in enumerate(self.hint.attention):
                    outputs[attention_output(k)].append(features.float())
        # contiguous, as every exchange and the cache deliver them: a conv's channels_last map would otherwise
        # reduce in another order in process than after a transport (attention maps differ in the last bit)
        return {name: torch.stack(values).contiguous() for name, values in outputs.items()}

    def evaluate(self, split: str) -> np.ndarray:
        return self.data.predict(self.model, split, self.device)
