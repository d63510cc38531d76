"""load_model and `raydistill eval`: every exported model of a run (peers of mixed architectures, an EMA teacher trained
through Ray, a regression model) loads without Ray as a frozen torch.nn.Module in eval mode, holds the run's last
weights, and reproduces the test figures the run recorded; `eval` names the data set explicitly or reads another
one of the same shape."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import raydistill
from raydistill.cli import main as cli
from raydistill.config import load_config
from raydistill.data import load_dataset, to_float
from raydistill.engine.checkpoint import latest_checkpoint, load_checkpoint
from raydistill.engine.data import load_run_data
from tests.conftest import one_line, tiny_dml
from tests.test_data import _fake_cifar10

TINY = {"model.options": {"hidden": [16]}, "train.batch_size": 256, "train.lr": 0.1}
TINY_OVERRIDES = ["train.epochs=1", "model.options.hidden=[16]", "train.batch_size=256"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """DML on digits between an MLP and a small CNN, one epoch, in process."""
    config = tiny_dml(**{**TINY, "peers": [{"arch": "mlp"}, {"arch": "cnn_small", "options": {}}]})
    return raydistill.train(config, tmp_path_factory.mktemp("mixed") / "run", runtime="inprocess", progress=False)


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    """The dml-diabetes preset shrunk to one epoch of two 16-unit MLPs."""
    return raydistill.train("dml-diabetes", tmp_path_factory.mktemp("diabetes") / "run", overrides=TINY_OVERRIDES,
                            runtime="inprocess", progress=False)


@pytest.fixture(scope="module")
def pcl_ray_run(ray_session, tmp_path_factory):
    """The pcl-digits preset shrunk to one epoch of two 16-unit MLPs, each with its EMA teacher, through Ray actors."""
    return raydistill.train("pcl-digits", tmp_path_factory.mktemp("pcl") / "run",
                            overrides=[*TINY_OVERRIDES, "peers=2"], progress=False)


def outputs_on_test_split(model, run_dir) -> torch.Tensor:
    _, arrays = load_run_data(load_config(run_dir))
    return model(to_float(torch.from_numpy(arrays["test_x"])))


def checkpoint_peers(run_dir, num_peers):
    return load_checkpoint(latest_checkpoint(run_dir), num_peers)["peers"]


def assert_same_state(model, state):
    assert model.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def assert_frozen_inference_module(model, outputs):
    """A plain module in eval mode whose outputs carry no autograd history, though grad mode is on."""
    assert isinstance(model, nn.Module) and not model.training
    assert torch.is_grad_enabled() and not outputs.requires_grad and outputs.grad_fn is None
    assert not any(p.requires_grad for p in model.parameters())


# ---- load_model ----------------------------------------------------------------------------------------------------
def test_mixed_architecture_peers_load_by_index_with_their_weights_and_test_accuracy(mixed_run):
    run_dir, summary = mixed_run.run_dir, mixed_run.summary
    states = checkpoint_peers(run_dir, 2)
    accuracies = []
    for index, first_layer in ((0, nn.Linear), (1, nn.Conv2d)):
        model = raydistill.load_model(run_dir, peer=index)
        assert isinstance(model.net.layer1[0], first_layer)
        assert_same_state(model, states[index]["model"])                       # the run's last weights
        logits = outputs_on_test_split(model, run_dir)
        assert_frozen_inference_module(model, logits)
        _, arrays = load_run_data(load_config(run_dir))
        accuracies.append((logits.argmax(1).numpy() == arrays["test_y"]).mean())
        assert accuracies[-1] == pytest.approx(summary["peers"][index]["test_acc"], abs=1e-6)
    assert accuracies[0] != accuracies[1]           # two different models, so the comparison tells them apart


def test_a_loaded_model_can_be_unfrozen_for_fine_tuning(mixed_run):
    model = raydistill.load_model(mixed_run.run_dir, peer=1).requires_grad_(True).train()
    outputs_on_test_split(model, mixed_run.run_dir).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_regression_model_reproduces_the_recorded_test_mse_and_mae(regression_run):
    run_dir, summary = regression_run.run_dir, regression_run.summary
    _, arrays = load_run_data(load_config(run_dir))
    target = torch.from_numpy(arrays["test_y"]).float()
    metrics = pd.read_parquet(run_dir / "metrics.parquet").set_index("model")
    for index in (0, 1):
        model = raydistill.load_model(run_dir, peer=index)
        prediction = outputs_on_test_split(model, run_dir)
        assert prediction.shape == (len(target), 1)
        assert_frozen_inference_module(model, prediction)
        error = prediction[:, 0] - target
        assert (error ** 2).mean().item() == pytest.approx(summary["peers"][index]["test_mse"], rel=1e-5)
        assert error.abs().mean().item() == pytest.approx(metrics.loc[f"peer{index}", "test_mae"], rel=1e-5)
    # the default is the deployable model: the peer with the lowest validation MSE
    best = int(np.argmin([peer["val_mse"] for peer in summary["peers"]]))
    assert summary["deploy"]["name"] == f"peer{best}"
    assert_same_state(raydistill.load_model(run_dir), checkpoint_peers(run_dir, 2)[best]["model"])


def test_an_ema_teacher_trained_through_ray_loads_by_name_with_its_test_accuracy(pcl_ray_run):
    run_dir, summary = pcl_ray_run.run_dir, pcl_ray_run.summary
    assert summary["runtime"] == "ray" and [t["name"] for t in summary["ema_teachers"]] == ["peer0_ema", "peer1_ema"]
    teacher = raydistill.load_model(run_dir, name="peer0_ema")
    states = checkpoint_peers(run_dir, 2)
    assert_same_state(teacher, states[0]["ema_teacher"])
    assert not torch.equal(teacher.net.fc.weight, states[0]["model"]["net.fc.weight"])   # not the student
    logits = outputs_on_test_split(teacher, run_dir)
    assert_frozen_inference_module(teacher, logits)
    _, arrays = load_run_data(load_config(run_dir))
    accuracy = (logits.argmax(1).numpy() == arrays["test_y"]).mean()
    assert accuracy == pytest.approx(summary["ema_teachers"][0]["test_acc"], abs=1e-6)
    deploy = summary["deploy"]                                          # pcl deploys an EMA teacher by default
    assert deploy["kind"] == "ema_teacher"
    assert_same_state(raydistill.load_model(run_dir), states[deploy["index"]]["ema_teacher"])


def test_a_model_trained_through_ray_loads_in_a_process_without_ray(pcl_ray_run):
    probe = torch.linspace(0, 1, 2 * 64).reshape(2, 1, 8, 8)
    code = ("import json, sys, torch, raydistill\n"
            "model = raydistill.load_model(sys.argv[1], name='peer1_ema')\n"
            "out = model(torch.linspace(0, 1, 2 * 64).reshape(2, 1, 8, 8))\n"
            "assert not out.requires_grad\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'Ray was imported'\n"
            "print(json.dumps(out.tolist()))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(pcl_ray_run.run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = raydistill.load_model(pcl_ray_run.run_dir, name="peer1_ema")(probe)
    torch.testing.assert_close(torch.tensor(json.loads(proc.stdout)), expected, rtol=0, atol=1e-6)


def test_bad_model_choices_name_the_field_the_value_and_the_choices(mixed_run, tmp_path):
    with pytest.raises(raydistill.ConfigError, match=r"^peer=2: one of: 0, 1$"):
        raydistill.load_model(mixed_run.run_dir, peer=2)
    with pytest.raises(raydistill.ConfigError, match=r"^name='peer0_ema': one of: peer0, peer1$"):
        raydistill.load_model(mixed_run.run_dir, name="peer0_ema")
    with pytest.raises(raydistill.ConfigError, match=r"^peer=0: give peer or name, not both \(name='peer1'\)$"):
        raydistill.load_model(mixed_run.run_dir, peer=0, name="peer1")
    with pytest.raises(raydistill.ConfigError, match=r"^run_dir=.*: has no export/manifest.json"):
        raydistill.load_model(tmp_path)


# ---- raydistill eval -----------------------------------------------------------------------------------------------
def printed_figures(out: str) -> dict[str, dict[str, float]]:
    """`eval` prints "<model> <figure> <value>  <figure> <value> ..." per model."""
    figures = {}
    for line in out.splitlines():
        name, *pairs = line.split()
        figures[name] = {key: float(value) for key, value in zip(pairs[::2], pairs[1::2])}
    return figures


def test_eval_with_the_runs_data_set_named_prints_the_recorded_test_figures(mixed_run, capsys):
    assert cli(["eval", str(mixed_run.run_dir), "--data", "digits"]) == 0
    printed = printed_figures(capsys.readouterr().out)
    summary = mixed_run.summary
    metrics = pd.read_parquet(mixed_run.run_dir / "metrics.parquet").set_index("model")
    assert set(printed) == {"peer0", "peer1", "ensemble"}
    for index in (0, 1):
        assert printed[f"peer{index}"]["acc"] == pytest.approx(summary["peers"][index]["test_acc"], abs=5e-5)
        assert printed[f"peer{index}"]["loss"] == pytest.approx(metrics.loc[f"peer{index}", "test_loss"], abs=5e-5)
    assert printed["ensemble"]["acc"] == pytest.approx(summary["ensemble_test_acc"], abs=5e-5)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar_layout_run(tmp_path_factory):
    """A run on a small folder in the CIFAR-10 layout with its batches.meta (the class names), and a second folder of
    other images of the same shape, without one."""
    import pickle

    root = tmp_path_factory.mktemp("cifar")
    _fake_cifar10(root / "trained_on", batch_sizes=(200, 100), n_test=60, seed=0)
    meta = {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 10000, "num_vis": 3072}
    (root / "trained_on" / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    _fake_cifar10(root / "other", batch_sizes=(10,), n_test=90, seed=1)
    config = tiny_dml(**{**TINY, "peers": 2, "data": {"name": "cifar10", "root": str(root / "trained_on")}})
    run = raydistill.train(config, root / "run", runtime="inprocess", progress=False)
    return run, root / "other"


def test_eval_on_another_data_set_of_the_same_shape_reads_it_from_data_root(cifar_layout_run, capsys):
    run, other = cifar_layout_run
    assert cli(["eval", str(run.run_dir), "--data", "cifar10", "--data-root", str(other)]) == 0
    printed = printed_figures(capsys.readouterr().out)
    test = load_dataset("cifar10", str(other))
    assert len(test.test_y) == 90
    probs = []
    for index in (0, 1):
        logits = raydistill.load_model(run.run_dir, peer=index)(to_float(torch.from_numpy(test.test_x)))
        labels = torch.from_numpy(test.test_y)
        assert printed[f"peer{index}"]["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(),
                                                               abs=5e-5)
        assert printed[f"peer{index}"]["loss"] == pytest.approx(
            nn.functional.cross_entropy(logits, labels).item(), abs=5e-5)
        probs.append(logits.softmax(1))
    ensemble_acc = (torch.stack(probs).mean(0).argmax(1) == torch.from_numpy(test.test_y)).float().mean().item()
    assert printed["ensemble"]["acc"] == pytest.approx(ensemble_acc, abs=5e-5)


def test_eval_refuses_a_data_set_of_another_shape_in_one_line(cifar_layout_run, capsys):
    run, _ = cifar_layout_run
    assert cli(["eval", str(run.run_dir), "--data", "digits"]) == 2
    assert capsys.readouterr().err == (
        "raydistill: error: data.name='digits': its samples are (1, 8, 8) with 10 outputs; "
        "the run's models take (3, 32, 32) with 10\n")


# ---- class names in the manifest -----------------------------------------------------------------------------------
def test_the_manifest_records_the_class_names_its_data_source_knows(mixed_run, regression_run, cifar_layout_run):
    manifest = lambda run_dir: json.loads((run_dir / "export" / "manifest.json").read_text())  # noqa: E731
    assert manifest(mixed_run.run_dir)["class_names"] == [str(d) for d in range(10)]          # digits: 0..9
    assert manifest(cifar_layout_run[0].run_dir)["class_names"] == CIFAR10_NAMES             # from batches.meta
    assert manifest(regression_run.run_dir)["class_names"] is None                            # regression: none
    assert load_dataset("cifar10", str(cifar_layout_run[1])).spec.class_names is None        # no meta: unknown


# ---- raydistill export: one file, run without raydistill -------------------------------------------------------------
def run_exported(path, fmt: str, inputs: torch.Tensor) -> np.ndarray:
    """The file run as a deployer runs it: an onnxruntime session, or torch.export's program."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    return torch.export.load(str(path)).module()(inputs).detach().numpy()


def exported_metadata(path, fmt: str) -> dict:
    """The metadata as a deployer reads it: onnxruntime's custom metadata, or torch.export's extra file."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return json.loads(session.get_modelmeta().custom_metadata_map["raydistill"])
    extra = {"raydistill.json": ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra["raydistill.json"])


def export_cli(run_dir, path, fmt, *args) -> int:
    return cli(["export", str(run_dir), "--format", fmt, "--output", str(path), *args])


def split_of(run_dir):
    """The run's test inputs as float32 and their labels or targets."""
    _, arrays = load_run_data(load_config(run_dir))
    return to_float(torch.from_numpy(arrays["test_x"])), arrays["test_y"]


@pytest.mark.parametrize("model, fmt", [("peer0", "onnx"), ("peer0", "pt2"), ("peer1", "onnx"), ("peer1", "pt2"),
                                        ("ensemble", "onnx")])          # an MLP, a CNN, both as one graph
def test_an_exported_classifier_gives_load_models_log_probabilities_and_its_recorded_accuracy(mixed_run, tmp_path,
                                                                                              capsys, fmt, model):
    run_dir, summary = mixed_run.run_dir, mixed_run.summary
    path = tmp_path / f"{model}.{fmt}"
    assert export_cli(run_dir, path, fmt, "--model", model) == 0
    assert "check: batches of 64 and 1 from the run's test split" in capsys.readouterr().out
    x, y = split_of(run_dir)                                   # all 360: a batch size the check did not run
    got = run_exported(path, fmt, x)
    logits = [raydistill.load_model(run_dir, peer=i)(x) for i in (0, 1)]
    if model == "ensemble":                                     # the log of the mean of the peers' probabilities
        expected, recorded = torch.stack([z.softmax(1) for z in logits]).mean(0).log(), summary["ensemble_test_acc"]
    else:
        index = int(model[-1])
        expected, recorded = logits[index].log_softmax(1), summary["peers"][index]["test_acc"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)      # the documented tolerance
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-5)               # log-probabilities
    assert (got.argmax(1) == y).mean() == pytest.approx(recorded, abs=1e-6)        # the run's own test figure
    meta = exported_metadata(path, fmt)
    spec = json.loads((run_dir / "export" / "manifest.json").read_text())["spec"]
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["normalization"]["mean"] == spec["mean"] and meta["normalization"]["std"] == spec["std"]
    assert meta["input"]["name"] == "images" and meta["input"]["shape"] == ["batch", 1, 8, 8]
    assert meta["output"]["name"] == "log_probs" and meta["output"]["shape"] == ["batch", 10]
    assert [m["arch"] for m in meta["members"]] == {"peer0": ["mlp"], "peer1": ["cnn_small"],
                                                    "ensemble": ["mlp", "cnn_small"]}[model]


@pytest.mark.parametrize("model, fmt", [("deploy", "onnx"), ("ensemble", "pt2")])
def test_an_exported_regressor_predicts_as_load_model_with_its_recorded_mse(regression_run, tmp_path, fmt, model):
    run_dir, summary = regression_run.run_dir, regression_run.summary
    path = tmp_path / f"{model}.{fmt}"
    assert export_cli(run_dir, path, fmt, "--model", model) == 0
    x, y = split_of(run_dir)
    got = run_exported(path, fmt, x)
    predictions = [raydistill.load_model(run_dir, peer=i)(x) for i in (0, 1)]
    if model == "ensemble":
        expected, recorded = torch.stack(predictions).mean(0), summary["ensemble_test_mse"]
    else:
        index = summary["deploy"]["index"]
        expected, recorded = predictions[index], summary["peers"][index]["test_mse"]
    assert got.shape == (len(y), 1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert ((got[:, 0] - y) ** 2).mean() == pytest.approx(recorded, rel=1e-5)
    meta = exported_metadata(path, fmt)
    assert meta["input"]["name"] == "features" and meta["input"]["shape"] == ["batch", 10]
    assert meta["output"]["name"] == "predictions" and meta["class_names"] is None


def test_a_state_dict_export_rebuilds_the_deployed_model_from_the_file_alone(mixed_run, tmp_path):
    from raydistill.export_formats import load_state_dict_export

    run_dir, summary = mixed_run.run_dir, mixed_run.summary
    path = tmp_path / "deploy.pt"
    assert export_cli(run_dir, path, "state_dict") == 0
    saved = torch.load(path, weights_only=True)                 # plain containers and tensors
    assert [m["name"] for m in saved["members"]] == [summary["deploy"]["name"]]
    x, _ = split_of(run_dir)
    expected = raydistill.load_model(run_dir)(x).log_softmax(1)
    assert torch.equal(load_state_dict_export(path)(x), expected)


def test_a_fixed_batch_takes_that_batch_size_and_no_other(mixed_run, tmp_path):
    import onnxruntime

    path = tmp_path / "fixed.onnx"
    assert export_cli(mixed_run.run_dir, path, "onnx", "--batch", "8") == 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [8, 1, 8, 8]
    x, _ = split_of(mixed_run.run_dir)
    assert session.run(None, {"images": x[:8].numpy()})[0].shape == (8, 10)
    with pytest.raises(Exception, match="images"):                                   # the size past it
        session.run(None, {"images": x[:9].numpy()})


def build_cummax_mlp(spec, hidden=(16,)):
    """A user's architecture whose forward uses torch.cummax (running maxima over the hidden units): torch.export
    takes it, ONNX has no operator for it."""

    class CummaxMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(int(np.prod(spec.input_shape)), hidden[0])
            self.fc = nn.Linear(hidden[0], spec.num_classes)

        def forward(self, x):
            return self.fc(torch.cummax(self.hidden(x.flatten(1)), dim=1).values)

    return CummaxMLP()


@pytest.fixture(scope="module")
def cummax_run(tmp_path_factory):
    from raydistill.models.registry import model_names, register_model

    if "cummax_mlp" not in model_names():
        register_model("cummax_mlp")(build_cummax_mlp)
    config = tiny_dml(**{**TINY, "peers": 2, "model": {"arch": "cummax_mlp", "options": {}}})
    return raydistill.train(config, tmp_path_factory.mktemp("cummax") / "run", runtime="inprocess", progress=False)


def test_a_model_onnx_cannot_express_is_refused_in_one_line_naming_it_and_the_operator(cummax_run, tmp_path,
                                                                                         capsys):
    run_dir, deployed = cummax_run.run_dir, cummax_run.summary["deploy"]["name"]
    assert export_cli(run_dir, tmp_path / "student.onnx", "onnx") == 2
    assert one_line(capsys.readouterr().err) == (
        f"raydistill: error: --model='deploy': {deployed} (cummax_mlp) cannot be exported to onnx: it uses "
        "aten.cummax, which has no ONNX translation (try --format pt2 or state_dict)")
    assert list(tmp_path.iterdir()) == []                        # nothing written, no temporary file left
    assert export_cli(run_dir, tmp_path / "student.pt2", "pt2") == 0                     # torch.export has it


@pytest.mark.parametrize("args, line", [
    (["--model", "peer7"], "--model='peer7': one of: deploy, ensemble, peer0, peer1"),
    (["--batch", "0"], "--batch='0': dynamic (any batch size, the default) or a fixed batch size >= 1"),
    (["--format", "tflite"], "--format='tflite': one of: onnx, pt2, state_dict"),
])
def test_bad_export_input_is_one_line_naming_the_field(mixed_run, tmp_path, capsys, args, line):
    argv = ["export", str(mixed_run.run_dir), "--output", str(tmp_path / "m.onnx"), *args]
    assert cli(argv + ([] if "--format" in args else ["--format", "onnx"])) == 2
    assert one_line(capsys.readouterr().err) == f"raydistill: error: {line}"
    assert list(tmp_path.iterdir()) == []
