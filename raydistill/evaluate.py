"""`raydistill eval`: every exported model of a run on its test split (or another data set), without Ray."""
from __future__ import annotations

import numpy as np
import torch

from raydistill.config import load_config
from raydistill.data.views import to_float
from raydistill.engine.data import load_run_data
from raydistill.engine.evaluation import ensemble_outputs, score
from raydistill.export import exported_models, load_model


@torch.no_grad()
def evaluate_run(run_dir, data: str | None = None, data_root: str | None = None, batch: int = 512) -> dict:
    overrides = {}
    if data is not None:
        overrides["data.name"] = data
    if data_root is not None:
        overrides["data.root"] = data_root
    config = load_config(run_dir, overrides)
    _, arrays = load_run_data(config)
    x, y = torch.from_numpy(arrays["test_x"]), arrays["test_y"]
    results, students = {}, []
    for name, kind in exported_models(run_dir).items():
        model = load_model(run_dir, name=name)
        out = torch.cat([model(to_float(x[i:i + batch])) for i in range(0, len(x), batch)]).numpy()
        results[name] = score(config.task, out, y)
        if kind == "peer":                     # the ensemble is the students', as during training
            students.append(out)
    outputs = students
    if len(outputs) > 1:
        results["ensemble"] = score(config.task, ensemble_outputs(config.task, outputs), np.asarray(y))
    return results
