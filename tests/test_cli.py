"""The command line's success paths, as a user runs them: real tiny runs on digits.

This test covers:
- `train --stop-after-epoch` then `train --resume DIR --set train.lr=...` (in this process, on the session's Ray);
- `presets` (every preset, its whole description) and `bench` (every runtime and transport side by side, with a ratio);
- in subprocesses, the console a user sees: quiet by default on a Ray the run starts itself (token authentication
  on, Ray's records in RUN_DIR/ray.log), `--address` to a running cluster with `--verbose` showing Ray's own lines,
  and Ctrl+C, which prints a resume command that works.
A subprocess that starts its own Ray costs ~15 s; the others join the session's Ray (`--address`).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import raydistill
from raydistill.cli import main
from raydistill.config import PRESET_DIR, preset_description, preset_names
from tests.conftest import tiny_dml

REPO = Path(raydistill.__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 300
# Ray's own console formats: a Python log record, a C++ log line of a level W/E/F, a worker error
RAY_WARNING_OR_ERROR = re.compile(
    r"(WARNING|ERROR) \S+\.py:\d+ --|^\[[^\]]* [WEF] \d+ \d+\]|ERROR worker\.py|core_worker", re.M)
STARTING_LOCAL_RAY = re.compile(r"^starting Ray \(local, \d+ CPUs, token authentication on\)…$", re.M)
WORKERS_READY = re.compile(r"^\d+ workers? ready in \d+\.\ds \(transport \w+; workers: .+\)$", re.M)


def epoch_lines(text: str, epochs: int) -> list[str]:
    return re.findall(rf"^epoch +\d+/{epochs} \| loss \d+\.\d+ \| .*$", text, re.M)


def config_file(folder: Path, **overrides) -> Path:
    """A tiny DML run as a YAML file (the numbers written the way people write them: 5e-2, YAML 1.2)."""
    raw = tiny_dml(**{"train.epochs": 2, **overrides})
    text = yaml.safe_dump(raw, sort_keys=False).replace("lr: 0.05", "lr: 5e-2")
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


def environment(**changes) -> dict:
    """This process's environment (without RAY_AUTH_MODE where asked: None), with this checkout's code first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def raydistill_cli(*args: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydistill.cli", *args], capture_output=True, text=True,
                          env=env or environment(), cwd=cwd, timeout=SUBPROCESS_TIMEOUT_S)


def session_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


# ---- in this process -------------------------------------------------------------------------------------------
def test_stop_after_epoch_then_resume_with_a_new_learning_rate(ray_session, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = config_file(tmp_path, **{"peers": 2, "resources.peers_per_worker": 2})
    assert main(["train", str(config), "--output", str(run_dir), "--stop-after-epoch", "1", "--quiet"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and "deploy" not in summary
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["epoch_0001"]
    first = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert first["train"]["lr"] == 0.05 and [p["lr"] for p in first["peers"]] == [0.05, 0.05]

    assert main(["train", "--resume", str(run_dir), "--set", "train.lr=1e-2", "--quiet"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and "deploy" in summary
    resumed = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resumed["train"]["lr"] == 0.01
    assert [p["lr"] for p in resumed["peers"]] == [0.01, 0.01]     # they had the run's lr: they follow it
    assert capsys.readouterr().out.splitlines()[-1] == f"summary: {run_dir / 'summary.json'}"


def working_folder() -> str:
    return os.getcwd()


def test_a_relative_teacher_checkpoint_reaches_actors_that_run_in_another_folder(ray_session, tmp_path, monkeypatch):
    """kd-diabetes names its teacher by a relative path. The worker actors run in the folder their cluster was started
    in, not the driver's: the driver hands them the path made absolute (config.yaml keeps it so, for --resume)."""
    import torch

    from raydistill.data import load_dataset
    from raydistill.models import build_model

    monkeypatch.chdir(tmp_path)
    assert ray_session.get(ray_session.remote(working_folder).remote()) != str(tmp_path)   # the premise
    torch.save(build_model("mlp", load_dataset("diabetes").spec, hidden=[32]).state_dict(), "teacher.pt")
    teacher = "teacher={arch: mlp, options: {hidden: [32]}, checkpoint: teacher.pt}"
    assert main(["train", "kd-diabetes", "--set", teacher, "--set", "train.epochs=1",
                 "--set", "resources.peers_per_worker=2", "--output", "run", "--quiet"]) == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["teacher"]["checkpoint"] == str(tmp_path / "teacher.pt")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_completed"] == 1


def test_presets_lists_every_preset_with_its_whole_description(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    blocks = re.split(r"^(?=\S)", out, flags=re.M)[1:]        # a preset's block: its first line and the indented rest
    listed = {block.split()[0]: " ".join(block.split()[1:]) for block in blocks}
    assert sorted(listed) == preset_names() and len(listed) >= 10
    for name, text in listed.items():
        comment = []
        for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        whole = " ".join(" ".join(comment).split())
        assert " ".join(preset_description(name).split()) == whole
        assert text == whole, name                              # whole, and no word broken across lines


# ---- in subprocesses -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_is_quiet_by_default_and_keeps_rays_records_in_the_run_directory(tmp_path):
    """Its own local Ray, RAY_AUTH_MODE unset: Ray's default (token authentication) is the one exercised."""
    run_dir = tmp_path / "run"
    proc = raydistill_cli("train", "--set", "train.epochs=2", "--output", str(run_dir),
                          env=environment(RAY_AUTH_MODE=None, RAY_DEDUP_LOGS=None), cwd=tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    assert not RAY_WARNING_OR_ERROR.search(console), console
    assert proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert STARTING_LOCAL_RAY.match(lines[0]), lines[0]
    assert WORKERS_READY.match(lines[1]), lines[1]
    assert len(epoch_lines(proc.stdout, 2)) == 2 and lines[-1] == f"summary: {run_dir / 'summary.json'}"
    ray_log = (run_dir / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log and "Token authentication is enabled" in ray_log


@pytest.mark.slow
def test_address_joins_the_running_cluster_and_verbose_shows_rays_own_lines(ray_session, tmp_path):
    """One peer (self-distillation) on the session's cluster: the run's worker is on its node."""
    run_dir, address = tmp_path / "run", session_address(ray_session)
    proc = raydistill_cli("train", "self-digits", "--address", address, "--set", "train.epochs=1",
                          "--output", str(run_dir), "--verbose")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    assert proc.stdout.splitlines()[0] == f"connecting to Ray at {address}…"
    assert re.search(rf"INFO worker\.py:\d+ -- Connecting to existing Ray cluster at address: {re.escape(address)}",
                     console), console
    assert "starting Ray" not in console and len(epoch_lines(proc.stdout, 1)) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peers"][0]["node"] == ray_session.get_runtime_context().get_node_id()
    assert "Connecting to existing Ray cluster" in (run_dir / "ray.log").read_text()


@pytest.mark.slow
def test_bench_prints_the_runtimes_and_transports_side_by_side_with_a_ratio(ray_session, capsys):
    # the gloo row's tensor all-gather is the multi-node path (tests/test_multinode.py); the stacked rows are
    # tests/test_gpu_path.py's subject
    assert main(["bench", "--steps", "5", "--repeats", "1", "--only", "inprocess,object_store,collective"]) == 0
    stdout = capsys.readouterr().out
    row = (r"^(inprocess|ray) +(inprocess|object_store|collective) +(\d+\.\d\d) +(\d+) +"
           r"(\d+\.\d\d) +(\d+\.\d\d\d|-) +.+$")
    rows = {m[1]: m for m in re.findall(row, stdout, re.M)}
    assert sorted(rows) == ["collective", "inprocess", "object_store"], stdout
    assert rows["inprocess"][0] == "inprocess" and rows["collective"][0] == rows["object_store"][0] == "ray"
    assert float(rows["inprocess"][4]) == 1.0                  # the ratio is to the in-process runtime
    assert rows["object_store"][5] == "-" and float(rows["collective"][5]) > 0   # the exchange alone: where it is
    for _, _, ms, _, ratio, _ in rows.values():
        assert float(ratio) == pytest.approx(float(ms) / float(rows["inprocess"][2]), rel=0.05, abs=0.01)


def test_a_long_epoch_shows_a_live_progress_line_on_a_terminal_and_none_in_a_pipe(ray_session, tmp_path, capfd):
    """`raydistill train` on the session's Ray with a pseudo-terminal for stderr: the epoch's line moves while the
    epoch runs (images done of the epoch's, images/s, time left; worker 0 tells the driver a few times a second how
    many steps its host has run). The same command with stderr in a pipe (here: pytest's capture) prints none."""
    import pty

    config = config_file(tmp_path, **{"train.batch_size": 8, "train.epochs": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    main_fd, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "train", str(config), "--address",
                             session_address(ray_session), "--output", str(tmp_path / "tty")], env=env,
                            stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:                          # the child closed its end: it has ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(main_fd)
    proc.communicate(timeout=240)
    assert proc.returncode == 0, seen.decode(errors="replace")
    updates = re.findall(rb"epoch 1/1:\s+(\d+)%\|[^\r\n]*\|\s*[\d.]+k?/[\d.]+k? \[[\d:]+<[\d:?]+,\s*[\d.?]+k?img/s\]",
                         seen)
    assert len(set(updates)) >= 2, seen.decode(errors="replace")     # it moved during the epoch
    assert main(["train", str(config), "--output", str(tmp_path / "pipe")]) == 0
    err = capfd.readouterr().err
    assert "img/s" not in err and "\r" not in err and "epoch 1/1:" not in err
