"""The cluster workflow of docs/cluster.md on this machine: a Ray head started with `ray start --head` (token
authentication on, the dashboard on 127.0.0.1), and runs submitted, followed and stopped with the `ray job` commands
from the repository root, as a user does from a laptop.

This test covers:
- the dashboard answers on 127.0.0.1 while the head runs, refuses a request without the token, and listens on no
  other address of the machine;
- `ray job submit --working-dir .` uploads what git would commit: never .git, .venv, runs/ or another ignored path;
- a `raydistill train` job joining the head (`resources.address=auto`), stopped by `ray job stop` (SIGTERM, then
  SIGKILL a few seconds later): the job reads STOPPED, its log (`ray job logs`) names the last checkpoint and the
  resume command, and that command, submitted as a job, continues the run to the parameters of an uninterrupted run;
- the same for a `raydistill tune` job (2 trials of 2 epochs): stopped, then continued by `raydistill tune --resume`
  to a complete search;
- the head is stopped through its own processes (never a global `ray stop`: the suite's Ray runs beside it), and none
  of them is left.
The head has its own HOME (so its own ~/.ray/auth_token, made by `ray get-auth-token --generate`), temp dir and ports;
none of the suite's RAY_* variables (RAY_AUTH_MODE=disabled) reaches it or the job client.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import yaml

import raydistill
from raydistill.engine.checkpoint import list_checkpoints
from raydistill.runtime.reaper import descendants
from tests.test_failures import alive, start_time, wait_for
from tests.test_runtime import assert_same_parameters, final_parameters

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent               # the project's environment: `ray` and `raydistill` live here
HEAD_READY_S = 180.0
JOB_S = 300.0                                   # a job's start (the upload, a driver and its workers importing torch)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PEERS = 2
# the default job shrunk: 2 peers of 16 hidden units; 200 epochs, so that no stop comes after its end
TRAIN = ["--set", "resources.address=auto", "--set", f"peers={PEERS}", "--set", "model.options.hidden=[16]",
         "--set", "train.batch_size=32", "--set", "train.epochs=200"]
TUNE = ["--set", "resources.address=auto", "--set", f"peers={PEERS}", "--set", "model.options.hidden=[16]",
        "--set", "train.epochs=2", "--samples", "2", "--max-concurrent", "1"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def outward_address() -> str | None:
    """This machine's address toward other machines (where a dashboard bound to 0.0.0.0 would be reached), if any.
    A UDP connect sends nothing; it only picks the route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


class Head:
    """`ray start --head --block` in its own session, as docs/cluster.md starts a head (token authentication, the
    dashboard on 127.0.0.1); `stop` ends it through that process, whose SIGTERM handler ends what Ray started, and
    checks that no process below it is left."""

    def __init__(self, root: Path):
        self.root = root
        home = root / "home"
        home.mkdir()
        # the user's shell: none of the suite's RAY_* variables, the project's environment on PATH
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        self.env.update(HOME=str(home), RAY_AUTH_MODE="token",
                        PATH=os.pathsep.join([str(BIN), *filter(None, [os.environ.get("PATH")])]))
        # Ray's socket paths are limited to about 100 characters: a short temp dir of its own
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rd-head-"))
        self.process = None
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # 127.0.0.1 never via a proxy

    def start(self) -> None:
        self.ray("get-auth-token", "--generate")
        token_file = Path(self.env["HOME"]) / ".ray" / "auth_token"
        token_file.chmod(0o600)
        self.token = token_file.read_text().strip()
        gcs, self.dashboard_port, client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = \
            free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client}",
                   f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                   f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                   f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                   f"--temp-dir={self.temp_dir}", "--num-cpus=8", f"--object-store-memory={200 * 1024 * 1024}",
                   "--disable-usage-stats"]
        self.log = (self.root / "head.log").open("w")
        # no drain on SIGTERM (Ray's default waits up to 30 s for Serve proxies this head does not run)
        self.process = subprocess.Popen(command, env={**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                                        cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

        def ready():
            if self.process.poll() is not None:
                pytest.fail(f"ray start --head ended ({self.process.returncode}):\n{self.head_log()}")
            return self.get("/api/jobs/")[0] == 200            # the job server, the last part to come up
        wait_for(ready, HEAD_READY_S, lambda: f"the head's job server\n{self.head_log()}", poll_s=0.5)

    def head_log(self) -> str:
        return (self.root / "head.log").read_text()

    def get(self, path: str, token: bool = True) -> tuple[int | None, bytes]:
        """(HTTP status, body) of a GET on the dashboard; (None, b"") when nothing answers."""
        request = urllib.request.Request(self.address + path,
                                         headers={"Authorization": f"Bearer {self.token}"} if token else {})
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return None, b""

    def ray(self, *args: str, timeout_s: float = 120.0) -> str:
        """`ray ARGS` from the repository root in the user's shell; its output. A non-zero exit fails the test."""
        try:
            done = subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"ray {' '.join(args)}: no end within {timeout_s:g}s\n{expired.stdout}\n{expired.stderr}")
        assert done.returncode == 0, f"ray {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def submit(self, job_id: str, *entrypoint: str, wait: bool) -> str:
        """`ray job submit --working-dir .` as docs/cluster.md writes it; wait: follow its log to the end."""
        return self.ray("job", "submit", "--address", self.address, "--submission-id", job_id,
                        *(() if wait else ("--no-wait",)), "--working-dir", ".", "--", *entrypoint,
                        timeout_s=JOB_S)

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.address, job_id)

    def stop_job(self, job_id: str) -> str:
        return self.ray("job", "stop", "--address", self.address, job_id)

    def status(self, job_id: str) -> str | None:
        code, body = self.get(f"/api/jobs/{job_id}")
        return json.loads(body)["status"] if code == 200 else None

    def wait_while_running(self, job_id: str, condition, what: str):
        def check():
            status = self.status(job_id)
            if status in TERMINAL:
                pytest.fail(f"job {job_id} ended ({status}) before {what}:\n{self.logs(job_id)}")
            return condition()
        return wait_for(check, JOB_S, what, poll_s=0.2)

    def stop(self) -> None:
        """SIGTERM to `ray start --block`: Ray ends the processes it started; then every process that was below it
        (the jobs' drivers included) must be gone."""
        if self.process is not None:
            processes = {**descendants(self.process.pid), self.process.pid: start_time(self.process.pid)}
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            self.log.close()

            def left():
                return [pid for pid, start in processes.items() if alive(pid) and start_time(pid) == start]
            try:
                wait_for(lambda: not left(), 30, lambda: f"the head's processes {left()} ending")
            finally:
                for pid in left():
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = Head(tmp_path_factory.mktemp("head"))
    try:
        head.start()
        yield head
    finally:
        head.stop()


def uploaded_files(head: Head) -> set[str]:
    """The files of the working directory as the head unpacked it for a job (one package per content)."""
    packages = [p for p in (head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
                if p.is_dir()]
    assert len(packages) == 1, packages
    return {str(p.relative_to(packages[0])) for p in packages[0].rglob("*") if p.is_file()}


def committable_files() -> set[str] | None:
    """What git would commit: the tracked files that exist and the untracked ones no .gitignore names (None
    without git or outside a git checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-per-directory=.gitignore"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    if listed.returncode != 0:
        return None
    return {path for path in listed.stdout.split("\0") if path and (REPO / path).is_file()}


# ---- the head and its dashboard ------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_the_dashboard_answers_on_127_0_0_1_with_the_token_and_nowhere_else(head):
    code, body = head.get("/api/version")
    assert code == 200 and json.loads(body)["ray_version"] == version("ray"), body
    assert head.get("/api/version", token=False)[0] == 401          # token authentication is on
    outward = outward_address()
    if outward is not None:                                         # --dashboard-host=127.0.0.1: not on the network
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((outward, head.dashboard_port), timeout=10).close()


# ---- a train job: submitted, stopped, resumed ------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_a_train_job_stopped_by_ray_job_stop_resumes_to_the_parameters_of_an_uninterrupted_run(head, tmp_path):
    run_dir = tmp_path / "run"
    # phase 1: submitted from the repository root, the run joins the head's cluster and writes checkpoints
    head.submit("train-stopped", "raydistill", "train", "--output", str(run_dir), *TRAIN, wait=False)
    # any checkpoint: the first one is rotated away within a few epochs of 0.1 s, sooner than `ray job status` answers
    head.wait_while_running("train-stopped", lambda: any((run_dir / "checkpoints").glob("epoch_*")),
                            "the run's first checkpoint")
    # phase 2: what --working-dir . uploaded
    uploaded = uploaded_files(head)
    assert "raydistill/cli.py" in uploaded and "pyproject.toml" in uploaded
    assert not {path for path in uploaded if path.split("/")[0] in (".git", ".venv", "runs")}, sorted(uploaded)
    committable = committable_files()
    if committable is not None:
        assert uploaded == committable, (sorted(uploaded - committable), sorted(committable - uploaded))
    # phase 3: `ray job stop` sends SIGTERM; the run keeps its last checkpoint and says how to go on, in the job's log
    assert "was stopped" in head.stop_job("train-stopped")
    assert head.status("train-stopped") == "STOPPED"
    logs = head.logs("train-stopped")
    kept = [path.name for path in list_checkpoints(run_dir)]
    said = re.findall(rf"^stopped by SIGTERM: the last checkpoint is (epoch_\d+); continue with "
                      rf"`raydistill train --resume {re.escape(str(run_dir))}`$", logs, re.M)
    assert said == [kept[-1]], logs
    assert "raydistill: stopped by SIGTERM" in logs.splitlines(), logs
    assert not (run_dir / "summary.json").exists()
    epochs = int(kept[-1].removeprefix("epoch_")) + 2
    # phase 4: the printed command, submitted as a job, continues the run for two epochs (then it stops on its own,
    # with a checkpoint); the job succeeds and its log ends with the run's summary
    head.submit("train-resumed", "raydistill", "train", "--resume", str(run_dir), "--stop-after-epoch", str(epochs),
                wait=True)
    assert head.status("train-resumed") == "SUCCEEDED"
    logs = head.logs("train-resumed")
    assert "connecting to Ray at auto" in logs and f"summary: {run_dir / 'summary.json'}" in logs, logs
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == epochs
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resources"]["address"] == "auto"
    assert len(pd.read_parquet(run_dir / "metrics.parquet").query("epoch == @epochs")) > 0
    # ... with the parameters of the same run trained without a stop (in process: every runtime computes the same)
    uninterrupted = raydistill.train(str(run_dir / "config.yaml"), tmp_path / "uninterrupted", runtime="inprocess",
                                     stop_after_epoch=epochs, progress=False)
    assert_same_parameters(final_parameters(run_dir, PEERS), final_parameters(uninterrupted.run_dir, PEERS))


# ---- a tune job: submitted, stopped, resumed -------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_a_tune_job_stopped_by_ray_job_stop_resumes_to_a_complete_search(head, tmp_path):
    experiment = tmp_path / "search"

    def reported():
        return any(path.read_text().strip() for path in (experiment / "trials").glob("*.jsonl"))
    # phase 1: the search, its space a file of the uploaded checkout, runs its first trial on the head
    head.submit("tune-stopped", "raydistill", "tune", "--space", "tune_spaces/dml.yaml", "--output", str(experiment),
                *TUNE, wait=False)
    head.wait_while_running("tune-stopped", reported, "the first trial's first epoch")
    # phase 2: `ray job stop`; what the search said is checked last (below)
    assert "was stopped" in head.stop_job("tune-stopped")
    assert head.status("tune-stopped") == "STOPPED"
    logs = head.logs("tune-stopped")
    # phase 3: the resume command, submitted as a job, completes the search
    head.submit("tune-resumed", "raydistill", "tune", "--resume", str(experiment), wait=True)
    assert head.status("tune-resumed") == "SUCCEEDED"
    best = json.loads((experiment / "best.json").read_text())
    assert best["complete"] is True, best["statuses"]
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) <= {"completed", "stopped early"}, trials
    # phase 4: the stopped search named SIGTERM and the command that continues it
    resume = f"raydistill tune --resume {experiment}"
    assert [line for line in logs.splitlines() if "SIGTERM" in line and resume in line], logs
