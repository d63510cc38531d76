"""`raydistill export`: one model of a finished run as one file that runs without raydistill, checked after writing.
No Ray.

    raydistill export RUN [--model deploy|peerK|peerK_ema|ensemble] --format onnx|pt2|state_dict --output FILE
                      [--batch dynamic|N]

Formats: ``onnx`` (torch.onnx's exporter, run by onnxruntime; needs the ``onnx`` extra), ``pt2`` (``torch.export``:
``torch.export.load(FILE).module()``), ``state_dict`` (the weights with what rebuilds the module:
``load_state_dict_export(FILE)``). Every export keeps one contract, whatever the model and the format:

- input ``images``: float32 [N, C, H, W] in [0, 1] (tabular data: ``features``, float32 [N, F], raw); the normalization
  is inside the graph, as in ``raydistill.load_model``. N is any batch size (``--batch dynamic``, the default) or fixed.
- output, classification: ``log_probs`` [N, classes], log-probabilities: a model's ``log_softmax(logits)``; the
  ensemble's log of the mean of its peers' probabilities (as ``raydistill eval`` scores it). ``exp`` gives the
  probabilities, argmax the class; they differ from logits by one constant per row, so ``softmax(log_probs / T)`` is
  the model's output softened at temperature T, as from its logits.
- output, regression: ``predictions`` [N, targets]: a model's outputs; the ensemble's mean of its peers'.
- metadata in the file (``read_metadata``): the model, its members, the task, the class names (where the data source
  knows them), the normalization (mean, std), the input shape, the output, the batch dimension.

The check after writing runs the file (an onnxruntime session, ``torch.export.load``, or the module rebuilt from the
state dict file) on a batch of the run's test images (or features) and compares its outputs with ``load_model``'s
(the ensemble: with ``raydistill eval``'s mean of the peers' probabilities): at most ``ATOL + RTOL * |expected|`` apart,
element by element; a dynamic batch is checked at two batch sizes. The file is written to a temporary name and takes
its own only once the check passes. A model that cannot be exported is refused in one line naming it and what stops it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raydistill.engine.manifest import class_names, read_manifest
from raydistill.errors import ConfigError

FORMATS = ("onnx", "pt2", "state_dict")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "state_dict": ".pt"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ATOL, RTOL = 1e-4, 1e-4              # float32 graphs reorder sums: differences of 1e-6 seen, 1e-4 allowed
CHECK_BATCH = 64                     # test images the check runs (a dynamic batch: and one more batch of 1)
EXAMPLE_BATCH = 2                    # the batch torch.export traces a dynamic batch with (1 would specialize it)
METADATA_KEY = "raydistill"          # ONNX metadata_props key, pt2 extra file "raydistill.json", state dict key
FORMAT_VERSION = 1


# ---- the module every format exports -------------------------------------------------------------------------------
class Deployable(nn.Module):
    """The export contract as a module: log-probabilities of one model or of the peers' ensemble (classification), or
    the predictions of one model or their mean (regression). ``members``: ``load_model`` modules (normalization
    inside)."""

    def __init__(self, members: list[nn.Module], task: str):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.task = task

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = [member(inputs) for member in self.members]
        if self.task == "regression":
            return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)
        if len(outputs) == 1:
            return torch.log_softmax(outputs[0], dim=-1)
        # as raydistill eval's ensemble: log of the mean probability, floored where every peer gives 0
        return torch.stack([torch.softmax(o, dim=-1) for o in outputs]).mean(0).clamp_min(1e-12).log()


@dataclasses.dataclass
class Choice:
    """What ``--model`` names: the exported name, its kind, and the manifest models it is made of."""
    name: str
    kind: str
    members: list


def choose(manifest: dict, model: str) -> Choice:
    """deploy (the run's deployable model), ensemble (its current peers), or a manifest name (peerK, peerK_ema)."""
    models = manifest["models"]
    peers = [n for n, entry in models.items() if entry["kind"] == "peer" and not entry.get("removed")]
    if model == "deploy":
        name = manifest["deploy"]["name"]
        return Choice(name, models[name]["kind"], [name])
    if model == "ensemble":
        if len(peers) < 2:
            raise ConfigError("--model", model, f"the run has {len(peers)} peer(s) and no ensemble; one of: "
                                                f"{', '.join(['deploy', *models])}")
        return Choice("ensemble", "ensemble", peers)
    if model not in models:
        ensemble = ["ensemble"] if len(peers) > 1 else []
        raise ConfigError("--model", model, f"one of: {', '.join(['deploy', *ensemble, *models])}")
    return Choice(model, models[model]["kind"], [model])


def io_names(task: str, input_shape) -> tuple[str, str]:
    return ("images" if len(input_shape) == 3 else "features"), ("predictions" if task == "regression" else "log_probs")


def metadata(run_dir, manifest: dict, choice: Choice, batch: int | None) -> dict:
    """What the file says about itself (JSON-ready)."""
    spec, task = manifest["spec"], manifest["task"]
    input_name, output_name = io_names(task, spec["input_shape"])
    outputs, rows = spec["num_classes"], "batch" if batch is None else batch
    if task == "regression":
        output = (f"{output_name}: float32 [{rows}, {outputs}] predictions" +
                  (" (the mean of the peers')" if choice.kind == "ensemble" else ""))
    else:
        output = (f"{output_name}: float32 [{rows}, {outputs}] log-probabilities" +
                  (" (log of the mean of the peers' probabilities)" if choice.kind == "ensemble" else
                   " (log_softmax of the logits)"))
    meaning = "images in [0, 1], NCHW" if input_name == "images" else "raw features"
    return {"format_version": FORMAT_VERSION, "run": Path(run_dir).resolve().name, "model": choice.name,
            "kind": choice.kind, "task": task,
            "members": [{"name": n, "arch": manifest["models"][n]["arch"], "options": manifest["models"][n]["options"]}
                        for n in choice.members],
            "class_names": class_names(spec),
            "normalization": {"mean": list(spec["mean"]), "std": list(spec["std"]),
                              "note": "inside the graph: feed unnormalized input"},
            "input": {"name": input_name, "shape": [rows, *spec["input_shape"]], "dtype": "float32",
                      "meaning": meaning},
            "output": {"name": output_name, "shape": [rows, outputs], "meaning": output},
            "batch": "dynamic" if batch is None else batch}


def deployable(run_dir, manifest: dict, choice: Choice) -> Deployable:
    from raydistill.export import load_model

    return Deployable([load_model(run_dir, name=n) for n in choice.members], manifest["task"]).eval()


# ---- inputs and the outputs they must give ------------------------------------------------------------------------
def sample_inputs(run_dir, manifest: dict, count: int) -> tuple[torch.Tensor, str]:
    """``count`` of the run's test inputs as float32 (repeated where the split is smaller), and where they came
    from; seeded uniform noise in the input's range where the run's data cannot be read here."""
    from raydistill.config import load_config
    from raydistill.engine.data import eval_inputs, load_run_data

    try:
        _, data = load_run_data(load_config(run_dir))
        x = torch.cat(list(eval_inputs(data, "test", count, count=count)))
        source = "the run's test split"
    except (ConfigError, OSError) as err:
        shape = manifest["spec"]["input_shape"]
        x = torch.rand((count, *shape), generator=torch.Generator().manual_seed(0))
        source = f"uniform noise in [0, 1] (the run's test split is not readable here: {err})"
    if len(x) < count:
        x = x.repeat((count + len(x) - 1) // len(x), *[1] * (x.dim() - 1))
    return x[:count].contiguous(), source


@torch.no_grad()
def expected_outputs(run_dir, manifest: dict, choice: Choice, inputs: torch.Tensor) -> np.ndarray:
    """What the contract promises, from load_model's modules and raydistill eval's ensemble (not from Deployable)."""
    from raydistill.engine.evaluation import ensemble_outputs
    from raydistill.export import load_model

    outputs = [load_model(run_dir, name=n)(inputs).numpy() for n in choice.members]
    task = manifest["task"]
    if choice.kind == "ensemble":
        return ensemble_outputs(task, outputs)
    if task == "regression":
        return outputs[0]
    return torch.log_softmax(torch.from_numpy(outputs[0]), dim=-1).numpy()


# ---- writing --------------------------------------------------------------------------------------------------------
def dynamic_shapes(module_input: str, batch: int | None):
    return None if batch is not None else {module_input: {0: torch.export.Dim("batch", min=1)}}


def write_onnx(module: Deployable, example: torch.Tensor, path: Path, batch: int | None, meta: dict) -> None:
    import warnings

    input_name, output_name = meta["input"]["name"], meta["output"]["name"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name],
                                    output_names=[output_name], dynamic_shapes=dynamic_shapes("inputs", batch),
                                    verbose=False)
    # one key with everything, and the few a deployer looks up on their own
    program.model.metadata_props.update({METADATA_KEY: json.dumps(meta), "class_names": json.dumps(meta["class_names"]),
                                         "normalization": json.dumps(meta["normalization"]),
                                         "input_shape": json.dumps(meta["input"]["shape"]),
                                         "output": meta["output"]["meaning"]})
    program.save(str(path), external_data=False)          # one self-contained file


def write_pt2(module: Deployable, example: torch.Tensor, path: Path, batch: int | None, meta: dict) -> None:
    program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes("inputs", batch))
    torch.export.save(program, str(path), extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def write_state_dict(module: Deployable, example: torch.Tensor, path: Path, batch: int | None, meta: dict) -> None:
    """Plain containers and tensors: ``torch.load(FILE, weights_only=True)`` reads it."""
    members = [{"name": m["name"], "arch": m["arch"], "options": m["options"], "state_dict": member.state_dict()}
               for m, member in zip(meta["members"], module.members)]
    spec = {"input_shape": meta["input"]["shape"][1:], "num_classes": meta["output"]["shape"][1]}
    torch.save({METADATA_KEY: meta, "spec": spec, "members": members}, path)


def load_state_dict_export(path) -> Deployable:
    """The module a ``state_dict`` export holds, rebuilt from the file alone (``build_model`` of each member)."""
    from raydistill.data import DataSpec
    from raydistill.models import build_model

    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved[METADATA_KEY]
    norm = meta["normalization"]
    spec = DataSpec(meta["task"], tuple(saved["spec"]["input_shape"]), saved["spec"]["num_classes"],
                    tuple(norm["mean"]), tuple(norm["std"]))
    members = []
    for member in saved["members"]:
        model = build_model(member["arch"], spec, **member["options"])
        model.load_state_dict(member["state_dict"])
        members.append(model)
    return Deployable(members, meta["task"]).requires_grad_(False).eval()


WRITERS = {"onnx": write_onnx, "pt2": write_pt2, "state_dict": write_state_dict}


# ---- reading back: what the check runs ------------------------------------------------------------------------------
def onnx_session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(path: Path, fmt: str):
    """A function from a float32 batch to the file's outputs (numpy), as a deployer would run the file."""
    if fmt == "onnx":
        session = onnx_session(path)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.numpy()})[0]
    if fmt == "pt2":
        module = torch.export.load(str(path)).module()
        return lambda x: module(x).detach().numpy()
    module = load_state_dict_export(path)
    return lambda x: module(x).detach().numpy()


def read_metadata(path, fmt: str | None = None) -> dict:
    """The metadata an export carries, read as a deployer would (onnxruntime, torch.export, torch.load)."""
    path = Path(path)
    fmt = fmt or next((f for f, suffix in SUFFIXES.items() if path.suffix == suffix), "state_dict")
    if fmt == "onnx":
        return json.loads(onnx_session(path).get_modelmeta().custom_metadata_map[METADATA_KEY])
    if fmt == "pt2":
        extra = {f"{METADATA_KEY}.json": ""}
        torch.export.load(str(path), extra_files=extra)
        return json.loads(extra[f"{METADATA_KEY}.json"])
    return torch.load(path, map_location="cpu", weights_only=True)[METADATA_KEY]


@dataclasses.dataclass
class Check:
    """The check after writing: the largest difference from the expected outputs over the batches run."""
    batches: list           # batch sizes run
    max_abs: float
    max_allowed_excess: float    # max over elements of |diff| - (ATOL + RTOL |expected|): <= 0 passes
    same_argmax: bool | None      # classification: the same class for every input
    source: str

    @property
    def passed(self) -> bool:
        return self.max_allowed_excess <= 0 and self.same_argmax is not False


def check(path: Path, fmt: str, run_dir, manifest: dict, choice: Choice, batch: int | None,
          inputs: torch.Tensor, source: str) -> Check:
    """inputs: at least CHECK_BATCH (a fixed batch: ``batch``) of them."""
    run = runner(path, fmt)
    sizes = [batch] if batch is not None else [CHECK_BATCH, 1]
    max_abs, excess, same = 0.0, -np.inf, True
    for size in sizes:
        x = inputs[:size]
        got, want = np.asarray(run(x)), expected_outputs(run_dir, manifest, choice, x)
        if got.shape != want.shape:
            raise RuntimeError(f"the exported {fmt} file gives outputs of shape {got.shape}, load_model {want.shape}")
        diff = np.abs(got.astype(np.float64) - want)
        max_abs = max(max_abs, float(diff.max()))
        excess = max(excess, float((diff - (ATOL + RTOL * np.abs(want))).max()))
        if manifest["task"] != "regression":
            same = same and bool((got.argmax(1) == want.argmax(1)).all())
    return Check(sizes, max_abs, excess, same if manifest["task"] != "regression" else None, source)


# ---- refusals -------------------------------------------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def why_not(err: BaseException) -> str:
    """What stopped an export, in a few words: the operator ONNX has no function for, else the first line of the
    innermost error."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    text = " ".join(ANSI.sub("", str(e)) for e in chain)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)
    if op:
        return f"it uses {op.group(1)}, which has no ONNX translation"
    lines = [ANSI.sub("", line).strip() for e in reversed(chain) for line in str(e).splitlines()]
    first = next((line for line in lines if line), type(chain[-1]).__name__)
    return first if len(first) <= 200 else first[:197] + "..."


def require_onnx() -> None:
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError("--format", "onnx", f"needs {', '.join(missing)}: pip install 'raydistill[onnx]'")


def parse_batch(text) -> int | None:
    if text in (None, "dynamic"):
        return None
    try:
        batch = int(text)
    except ValueError:
        batch = 0
    if batch < 1:
        raise ConfigError("--batch", text, "dynamic (any batch size, the default) or a fixed batch size >= 1")
    return batch


# ---- the export -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Exported:
    path: Path
    format: str
    metadata: dict
    check: Check


def export(run_dir, output, fmt: str = "onnx", model: str = "deploy", batch: int | None = None) -> Exported:
    """Writes ``model`` of the finished run in ``run_dir`` to ``output`` as ``fmt`` and checks it (module docstring)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    manifest = read_manifest(run_dir, field="RUN")
    choice = choose(manifest, model)
    meta = metadata(run_dir, manifest, choice, batch)
    module = deployable(run_dir, manifest, choice)
    inputs, source = sample_inputs(run_dir, manifest, batch or CHECK_BATCH)
    example = inputs[:batch or EXAMPLE_BATCH]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{SUFFIXES[fmt]}")      # torch.export.load wants its own suffix
    try:
        try:
            WRITERS[fmt](module, example, tmp, batch, meta)
        except Exception as err:  # noqa: BLE001 — the exporter's own error, told in one line
            archs = ", ".join(sorted({m["arch"] for m in meta["members"]}))
            hint = " (try --format pt2 or state_dict)" if fmt == "onnx" else ""
            raise ConfigError("--model", model, f"{choice.name} ({archs}) cannot be exported to {fmt}: "
                                                f"{why_not(err)}{hint}") from None
        result = check(tmp, fmt, run_dir, manifest, choice, batch, inputs, source)
        if not result.passed:
            raise RuntimeError(f"the exported {fmt} file of {choice.name} differs from load_model by up to "
                               f"{result.max_abs:.3g} (allowed {ATOL:g} + {RTOL:g}·|expected|) on {result.source}; "
                               "nothing was written")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(output, fmt, meta, result)
