"""Bad input: one line naming the field, the value and what is allowed; a non-zero exit; no run directory written."""
import subprocess
import sys

import pytest

from raydistill.cli import main


def run_cli(args, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *args, "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out


@pytest.mark.parametrize("overrides, field, allowed", [
    (["method.name=dmll"], "method.name", "one of: dkel, dml, "),
    (["model.arch=resnet21"], "model.arch", "one of: resnet20"),
    (["peers=[{arch: mlp}, {arch: notanet}]"], "peers.1.arch", "torchvision"),
    (["data.name=mnist"], "data.name", "one of:"),
    (["method.temperature=0"], "method.temperature", "> 0"),
    (["method.temperature=-1"], "method.temperature", "> 0"),
    (["method.alpha=-0.1"], "method.alpha", ">= 0"),
    (["method.ce_weight=complement", "method.alpha=1.5"], "method.alpha", "[0, 1]"),
    (["peers=1"], "peers", "at least 2 peers"),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], "data.root", "data_batch"),
    (["train.batch_size=0"], "train.batch_size", ">= 1"),
    (["resources.strategy=RANDOM"], "resources.strategy", "STRICT_SPREAD"),
    (["method.kelvin=3"], "method.kelvin", "unknown key"),
    (["model.options={depth: 3}"], "model.options.depth", "mlp takes"),
    (["method.name=kd"], "teacher.checkpoint", "needs a teacher"),
    (["data.name=diabetes"], "task", "must be regression: data set diabetes is a regression task"),
    (["method.name=kd", "teacher={arch: mlp, checkpoint: /nonexistent.pt}"], "teacher.checkpoint", "does not exist"),
])
def test_bad_config_values_give_one_line(overrides, field, allowed, tmp_path, capsys):
    args = [a for o in overrides for a in ("--set", o)]
    code, err, out = run_cli(args, tmp_path, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"raydistill: error: {field}=") and allowed in err[0], err[0]
    assert not out.exists()


def test_unknown_preset_or_missing_file(tmp_path, capsys):
    code, err, out = run_cli(["no-such-preset"], tmp_path, capsys)
    assert code == 2 and "presets: " in err[0] and "dml-digits" in err[0]


def test_teacher_checkpoint_of_another_architecture(tmp_path, capsys):
    import torch

    from raydistill.data import load_dataset
    from raydistill.models import build_model

    spec = load_dataset("digits").spec
    torch.save(build_model("mlp", spec).state_dict(), tmp_path / "mlp.pt")
    code, err, out = run_cli(["--set", "method.name=kd", "--set", "peers=1",
                              "--set", f"teacher={{arch: cnn_small, checkpoint: {tmp_path / 'mlp.pt'}}}"],
                             tmp_path, capsys)
    assert code == 2 and len(err) == 1
    assert "teacher.checkpoint=" in err[0] and "does not fit teacher.arch=cnn_small" in err[0]
    assert not out.exists()


def test_more_gpus_than_the_cluster_has(ray_session, tmp_path, capsys):
    code, err, out = run_cli(["--set", "resources.gpus_per_peer=1"], tmp_path, capsys)
    assert code == 2 and len(err) == 1
    assert "resources.gpus_per_peer=1.0" in err[0] and "needs 3 GPUs" in err[0] and "the cluster has 0" in err[0]
    assert not out.exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    code, err, out = run_cli([], tmp_path, capsys)
    assert code == 2 and "--output=" in err[0] and (out / "keep.txt").read_text() == "mine"


def test_console_script_exits_non_zero(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "train", "--set", "method.temperature=0",
                           "--output", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("raydistill: error: method.temperature=0.0: must be a number > 0")
    assert len(proc.stderr.strip().splitlines()) == 1
