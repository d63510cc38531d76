"""How a search's driver is stopped from outside, and what it leaves: subprocesses running `raydistill tune --quiet`.

This test covers:
- SIGTERM from `ray job stop` to a search that joined a cluster (the job's process alone has it): Tune's own stop
  saves the experiment, both files are written, the command that continues it is printed, exit 143, before
  `ray job stop` sends SIGKILL;
- SIGTERM to the process group of a search on the local Ray it started (a terminal, or `ray job stop` of such a
  job: Ray's own processes have it too): the same two lines and exit 143 at once, and no process left;
- kill -9 of the driver of a local search: its watcher (runtime/reaper.py) ends every process of its Ray.
Each search is tiny (digits, a 16-unit MLP, one trial at a time); under --quiet nothing but these lines is printed.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill.runtime.reaper import descendants
from tests.test_cli import session_address
from tests.test_failures import REPO, assert_all_gone, command_line, wait_while_running
from tests.test_tune import search_of

RAY_JOB_STOP_WAIT_S = 3          # `ray job stop` sends SIGKILL this long after SIGTERM (RAY_JOB_STOP_WAIT_TIME_S)


def start_tune(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """`raydistill tune --quiet` of two trials of 2 epochs, one at a time, in its own session (as a terminal or a job
    starts it); returns the process and its experiment directory."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "raydistill.cli",
               *search_of(tmp_path, {"train.lr": {"grid": [0.2, 0.1]}}, epochs=2), "--quiet", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True), tmp_path / "exp"


def reported(output: Path) -> bool:
    """The first trial reported its first epoch (its own record of it)."""
    return any(path.read_text().strip() for path in (output / "trials").glob("*.jsonl")) \
        if (output / "trials").is_dir() else False


def sigterm(proc: subprocess.Popen) -> tuple[str, str]:
    """What `ray job stop` does: SIGTERM, then SIGKILL if the job has not ended RAY_JOB_STOP_WAIT_S later."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=RAY_JOB_STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"raydistill tune did not end within {RAY_JOB_STOP_WAIT_S}s of SIGTERM:\n{out}\n{err}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_a_search_on_a_cluster_saves_it_and_prints_how_to_continue(ray_session, tmp_path):
    proc, output = start_tune(tmp_path, "--address", session_address(ray_session))
    try:
        wait_while_running(proc, lambda: reported(output), 240, "the first trial's first epoch")
        out, err = sigterm(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert (out, err) == (f"stopped by SIGTERM: continue with raydistill tune --resume {output}\n",
                          "raydistill: stopped by SIGTERM\n")
    # Tune's own stop ran: its state, and both files, say where the search stands
    best = json.loads((output / "best.json").read_text())
    assert best["complete"] is False and best["statuses"] == {"unfinished": 1, "not started": 1}, best
    assert (output / "trials.parquet").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["sigterm_to_the_group", "kill_9_of_the_driver"])
def test_a_search_on_its_own_local_ray_stopped_from_outside_leaves_no_process(tmp_path, how):
    """The driver is left unreaped (a zombie) while the processes are counted, as a parent that has not waited for
    it yet leaves it."""
    proc, output = start_tune(tmp_path)
    try:
        def trial_running():
            names = " ".join(command_line(pid) for pid in descendants(proc.pid))
            return "ray::WorkerShell" in names and reported(output)
        wait_while_running(proc, trial_running, 240, "a trial training, its first epoch reported")
        processes = descendants(proc.pid)
        names = " ".join(command_line(pid) for pid in processes)
        assert "raylet" in names and "gcs_server" in names and "raydistill.runtime.reaper" in names, names
        assert "ray::ImplicitFunc" in names, names
        if how == "kill_9_of_the_driver":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            out, err = sigterm(proc)
            assert proc.returncode == 143, err
            assert (out, err) == (f"stopped by SIGTERM: continue with raydistill tune --resume {output}\n",
                                  "raydistill: stopped by SIGTERM\n")
        assert_all_gone(processes, 20, "every process of the stopped search's Ray")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
