"""Figures of a model's outputs on a split: accuracy and loss (classification), MSE/MAE/R^2 (regression)."""
import numpy as np
import torch
import torch.nn.functional as F


def primary_metric(task: str) -> tuple[str, str]:
    """The figure that decides "best": (name, mode)."""
    return ("mse", "min") if task == "regression" else ("acc", "max")


def score(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if len(labels) == 0:
        return {}
    out = torch.tensor(np.asarray(outputs, dtype=np.float32))      # a copy: object-store arrays are read-only
    if task == "regression":
        target = torch.tensor(np.asarray(labels, dtype=np.float32)).reshape(out.shape[0], -1)
        pred = out.reshape(out.shape[0], -1)
        mse = F.mse_loss(pred, target).item()
        variance = ((target - target.mean(0)) ** 2).mean().item()
        return {"mse": mse, "mae": (pred - target).abs().mean().item(),
                "r2": 1.0 - mse / variance if variance > 0 else float("nan")}
    y = torch.tensor(np.asarray(labels, dtype=np.int64))
    return {"acc": (out.argmax(1) == y).float().mean().item(), "loss": F.cross_entropy(out, y).item()}


def ensemble_outputs(task: str, outputs: list[np.ndarray]) -> np.ndarray:
    """The peers' ensemble for evaluation: mean of probabilities (as log-probs), or mean prediction (regression)."""
    stacked = torch.tensor(np.stack(outputs).astype(np.float32))
    if task == "regression":
        return stacked.mean(0).numpy()
    return stacked.softmax(-1).mean(0).clamp_min(1e-12).log().numpy()
