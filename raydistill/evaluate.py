"""`raydistill eval`: every exported model of a run on its test split (or another data set), without Ray."""
from __future__ import annotations

import numpy as np
import torch

from raydistill.config import load_config
from raydistill.engine.data import check_digest, eval_inputs, load_run_data
from raydistill.engine.evaluation import ensemble_outputs, score
from raydistill.errors import ConfigError
from raydistill.export import exported_models, load_model, read_manifest


@torch.no_grad()
def evaluate_run(run_dir, data: str | None = None, data_root: str | None = None, batch: int = 512) -> dict:
    """{model name: figures} on the test split of the run's data set, or of ``data`` (read from ``data_root``)."""
    overrides = {}
    if data is not None:
        overrides["data.name"] = data
    if data_root is not None or (data is not None and data != load_config(run_dir).data.name):
        overrides["data.root"] = data_root     # the run's root belongs to the run's data set
    config = load_config(run_dir, overrides)
    spec, data_set = load_run_data(config)
    if not overrides:
        check_digest(config, data_set)                  # the run's own test split: the set it trained on
    _check_same_shape(read_manifest(run_dir)["spec"], spec, config.data.name)
    y = data_set.labels("test")
    results, students = {}, []
    for name, kind in exported_models(run_dir).items():
        model = load_model(run_dir, name=name)
        out = torch.cat([model(x) for x in eval_inputs(data_set, "test", batch)]).numpy()
        results[name] = score(config.task, out, y)
        if kind == "peer":                     # the ensemble is the students', as during training
            students.append(out)
    if len(students) > 1:
        results["ensemble"] = score(config.task, ensemble_outputs(config.task, students), np.asarray(y))
    return results


def _check_same_shape(trained: dict, spec, name: str) -> None:
    """The models take the input shape and give the outputs they were trained for; another data set must match."""
    trained_shape, trained_outputs = tuple(trained["input_shape"]), trained["num_classes"]
    if (tuple(spec.input_shape), spec.num_classes) != (trained_shape, trained_outputs):
        raise ConfigError("data.name", name, f"its samples are {tuple(spec.input_shape)} with {spec.num_classes} "
                                             f"outputs; the run's models take {trained_shape} with {trained_outputs}")
