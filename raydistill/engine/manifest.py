"""A run's export/ folder: the deployable models as state dicts and the manifest that names them. No Ray.

Written once by the run (``write_export``), read by ``raydistill.load_model``, ``raydistill eval`` and a teacher
that learns from a finished run (``read_manifest``, ``deployed_entry``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from raydistill.errors import ConfigError
from raydistill.files import DiskFull, disk_write

EXPORT_DIR = "export"
MANIFEST = "manifest.json"


def manifest_path(run_dir) -> Path:
    return Path(run_dir) / EXPORT_DIR / MANIFEST


def read_manifest(run_dir, field: str = "run_dir") -> dict:
    """The manifest of a finished run; a run without one is refused in one line naming ``field``."""
    path = manifest_path(run_dir)
    if not path.is_file():
        raise ConfigError(field, str(run_dir), f"has no {EXPORT_DIR}/{MANIFEST} (the run has not finished; give a "
                          "finished raydistill run directory)")
    return json.loads(path.read_text())


def model_file(run_dir, entry: dict) -> Path:
    return Path(run_dir) / EXPORT_DIR / entry["file"]


def class_names(spec: dict) -> list | None:
    """The class names in label order where the data source knows them (None for regression and unnamed labels)."""
    names = spec.get("class_names")
    return list(names) if names is not None else None


def deployed_entry(manifest: dict) -> dict:
    return manifest["models"][manifest["deploy"]["name"]]


def write_export(run_dir, spec: dict, task: str, states: dict, settings_of, deploy: dict) -> None:
    """export/ written to a temporary name and renamed: one ``NAME.pt`` per model (states: name -> {kind, index,
    state}, or with its own ``settings`` and index None: a peer removed from the run) and the manifest (each model's
    kind, index, arch and options from ``settings_of(index)``, the data spec, the task, the class names, and the deploy
    choice)."""
    import torch

    tmp, final = Path(run_dir) / f".{EXPORT_DIR}.tmp", Path(run_dir) / EXPORT_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    models = {}
    try:
        with disk_write(final):
            tmp.mkdir()
            for name, entry in states.items():
                settings = entry.get("settings") or dataclasses.asdict(settings_of(entry["index"]))   # removed: own
                torch.save(entry["state"], tmp / f"{name}.pt")
                models[name] = {"kind": entry["kind"], "index": entry["index"], "arch": settings["arch"],
                                "options": settings["options"], "file": f"{name}.pt",
                                **({"removed": True} if entry.get("settings") else {})}
            manifest = {"spec": spec, "task": task, "models": models, "deploy": deploy,
                        "class_names": class_names(spec),
                        "input": "float images in [0, 1], NCHW (normalization is inside the model)"}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    except DiskFull:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
