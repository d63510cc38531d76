"""Ray Tune searches: spaces are checked before any trial, ASHA stops a bad trial, PBT perturbs, a search interrupted
at any stage resumes to the same trials as one run straight through, a trial's bad input is one line, a trial whose
process is killed is an error, the best trial is the best final figure; each trial is a real raydistill run on digits,
and every search is bounded by its time_budget_s and each test by a deadline. Stops from outside the search's driver
(SIGTERM, kill -9) are in test_tune_stops.py."""
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray.tune import Callback, ExperimentAnalysis

from raydistill.cli import main
from raydistill.config import apply_overrides, load_config, preset_names, raw_config
from raydistill.errors import ConfigError
from raydistill.runtime.loop import TrainingError
from raydistill.tune import (SETTINGS, clamp_to_space, load_space, max_concurrent_trials, segment_dir, start_over,
                             trial_history, trial_run_dirs, tune)
from tests.conftest import one_line

BUDGET_S = 480          # every search's time_budget_s: a leaked reservation ends the search instead of hanging it
pytestmark = pytest.mark.timeout(600)     # a search that waits on a reservation that never comes fails, not hangs


def tiny(**train) -> dict:
    """2 peers of a 16-unit MLP on digits, a few steps per epoch."""
    return {"name": "tiny-tune", "seed": 3, "data": {"name": "digits"},
            "model": {"arch": "mlp", "options": {"hidden": [16]}}, "peers": 2, "method": {"name": "dml"},
            "train": {"epochs": 2, "batch_size": 256, "lr": 0.2, **train},
            "resources": {"peers_per_worker": 2}}           # one worker per trial: a trial's start is its processes'


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard tag -> [(step, value)] of one run directory's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_trial_curves(row, peers: int = 2) -> None:
    """The trial's own run directory holds its curves: per peer, the ensemble, its hyper-parameters, one step per
    epoch it ran, and the figure trials.parquet reports."""
    curves = scalars(row["run_dir"])
    tags = {f"peer{i}/{part}" for i in range(peers) for part in ("train/loss", "val/acc")}
    tags |= {"ensemble/val/acc", "hyper/temperature", "consistency"}
    assert tags <= set(curves), f"{row['trial']}: missing {sorted(tags - set(curves))}"
    epochs = list(range(1, row["epochs"] + 1))
    assert all([step for step, _ in curves[tag]] == epochs for tag in tags), row["trial"]
    assert all(value == pytest.approx(row["method.temperature"]) for _, value in curves["hyper/temperature"])
    assert last_val_acc(row["run_dir"], peers) == pytest.approx(row["final_val_acc"])


# ---- spaces: one clear line before any trial -----------------------------------------------------------------------
@pytest.mark.parametrize("space, field, words", [
    ({"method.temprature": {"uniform": [1, 4]}}, "method.temprature", "unknown config key"),
    ({"train.lr": {"loguniform": [0.5, 0.01]}}, "train.lr", "low 0.5 > high 0.01"),
    ({"method.alpha": {"gaussian": [0, 1]}}, "method.alpha", "unknown distribution 'gaussian'"),
    ({"method.temperature": {"uniform": [0, 4]}}, "method.temperature", "must be a number > 0"),
    ({"method": {"uniform": [0, 1]}}, "method", "is a section"),
    ({"train.lr": {"choice": []}}, "train.lr", "non-empty list"),
    ({"method.alpha": {"uniform": [0, 1]}, "metric": "test_acc"}, "metric", "never selects"),
    ({"method.alpha": {"uniform": [0, 1]}, "metric": "val_mse"}, "metric", "reports *_acc, not *_mse"),
    ({"method.alpha": {"uniform": [0, 1]}, "scheduler": "hyperband"}, "scheduler", "one of: asha, pbt"),
    ({"train.lr": {"uniform": [0.1, 0.2]}, "scheduler": "pbt"}, "scheduler.mutate", "method.temperature"),
    ({"train.lr": {"uniform": [0.1, 0.2]}, "time_budget_s": 0}, "time_budget_s", "a number > 0"),
])
def test_bad_space_fails_with_one_line_naming_the_field(tmp_path, space, field, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        tune(tiny(), space, output=tmp_path / "exp")
    assert err.value.field == field and "\n" not in str(err.value)
    assert not (tmp_path / "exp").exists()          # refused before anything was written or started


def test_cli_bad_space_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text("method.temperature: {loguniform: [10, 1]}\n")
    assert main(["tune", "dml-digits", "--space", str(path), "--output", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydistill: error: method.temperature=") and "low 10 > high 1" in err
    assert len(err.splitlines()) == 1


def test_optuna_missing_or_misused_is_one_line():
    try:
        import optuna  # noqa: F401
        with pytest.raises(ConfigError, match="use choice instead of grid"):
            load_space({"train.lr": {"grid": [0.1, 0.2]}, "search": "optuna"}, tiny())
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'raydistill\[optuna\]'"):
            load_space({"train.lr": {"uniform": [0.1, 0.2]}, "search": "optuna"}, tiny())


def test_every_shipped_space_loads_against_every_preset_of_its_method(tmp_path):
    """Each file of tune_spaces/ against each preset of its method (a teacher checkpoint where the method needs one):
    the keys and distributions as written, and the preset's own selection figure (val_mse for regression)."""
    folder = Path(__file__).parent.parent / "tune_spaces"
    files = sorted(folder.glob("*.yaml"))
    assert {"dml", "kd", "kdcl", "pcl", "dkel", "fitnet"} <= {f.stem for f in files}
    checked = []
    for path in files:
        written = yaml.safe_load(path.read_text())
        presets = [p for p in preset_names() if p.split("-")[0] == path.stem]
        assert presets, f"{path.name}: no preset of method {path.stem} to check it against"
        for preset in presets:
            base = raw_config(preset)
            if base.get("teacher"):
                base = apply_overrides(base, [f"teacher.checkpoint={tmp_path}"])
            if base["data"].get("val_fraction", 0.1) <= 0:      # a reference recipe trains on all its training images
                with pytest.raises(ConfigError, match=r"^data\.val_fraction=0\.0: a search selects on the validation"):
                    load_space(path, base)
                base = apply_overrides(base, ["data.val_fraction=0.1"])
            space = load_space(path, base)
            assert space.params == {key: tuple(spec.items())[0] for key, spec in written.items()
                                    if key not in SETTINGS}, (path.name, preset)
            regression = load_config(base).task == "regression"
            assert (space.metric, space.mode) == (("val_mse", "min") if regression else ("val_acc", "max"))
            checked.append((path.stem, preset))
    assert len({stem for stem, _ in checked}) == len(files)


def test_concurrency_counts_whole_runs():
    config = load_config(tiny(), ["resources.peers_per_worker=1"])   # trial 1 CPU + 2 workers x 1 CPU = 3 per trial
    assert max_concurrent_trials(config, {"CPU": 8}) == 2
    assert max_concurrent_trials(config, {"CPU": 11.5}) == 3
    reference = load_config(tiny(), ["resources.peers_per_worker=1", "resources.transport=object_store"])
    assert max_concurrent_trials(reference, {"CPU": 11.5}) == 2      # + the coordinator actor's CPU: 4 per trial
    gpu = load_config(tiny(), ["resources.gpus_per_peer=0.5"])    # 1 GPU per trial
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 3}) == 3
    with pytest.raises(ConfigError, match="one trial reserves"):
        max_concurrent_trials(config, {"CPU": 2})


def test_pbt_perturbations_stay_inside_the_space():
    assert clamp_to_space({"method.temperature": 12.0, "method.alpha": 0.5}, {"method.temperature": (1, 10)}) == \
        {"method.temperature": 10, "method.alpha": 0.5}


def test_segments_of_a_trial_are_ordered(tmp_path):
    first = segment_dir(tmp_path, "abc_00001", None)
    first.mkdir()
    second = segment_dir(tmp_path, "abc_00001", 3)
    second.mkdir()
    third = segment_dir(tmp_path, "abc_00001", 1)
    third.mkdir()
    (tmp_path / "abc_000010").mkdir()          # another trial whose id shares the prefix
    assert trial_run_dirs(tmp_path, "abc_00001") == [first, second, third]
    assert second.name == "abc_00001.2_from_epoch_0003"


def test_a_trial_started_over_forgets_only_its_own_lost_attempt(tmp_path):
    """What a restart without a checkpoint clears: the trial's segments and reported rows, not another trial's."""
    for name in ("abc_00001", "abc_00001.2_from_epoch_0001", "abc_000010"):
        (tmp_path / name / "tb").mkdir(parents=True)
    for trial in ("abc_00001", "abc_000010"):
        (tmp_path / f"{trial}.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_acc": 0.6}\n')
    start_over(tmp_path, "abc_00001")
    assert trial_run_dirs(tmp_path, "abc_00001") == [] and trial_history(tmp_path, "abc_00001") is None
    assert trial_run_dirs(tmp_path, "abc_000010") == [tmp_path / "abc_000010"]
    assert trial_history(tmp_path, "abc_000010")["epoch"].tolist() == [1, 2]


# ---- real searches ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asha_search(ray_session, tmp_path_factory):
    """2 trials x 2 epochs, one after another in grid order (lr 0.2, then 1e-6), so that ASHA's rung at epoch 1 holds
    the good trial's figure when the bad one reports."""
    output = tmp_path_factory.mktemp("asha") / "exp"
    space = {"train.lr": {"grid": [0.2, 1e-6]}, "method.temperature": {"uniform": [1, 4]}, "time_budget_s": BUDGET_S,
             "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}}
    best = tune(tiny(), space, samples=1, output=output, max_concurrent=1, progress=False)
    return output, best


@pytest.mark.slow
def test_asha_search_writes_best_json_and_trials_parquet(asha_search):
    output, best = asha_search
    trials = pd.read_parquet(output / "trials.parquet")
    assert trials["trial"].tolist() == sorted(trials["trial"]) and len(trials) == 2
    assert {"trial", "status", "train.lr", "method.temperature", "epochs", "final_val_acc", "best_val_acc",
            "run_dir"} <= set(trials.columns)
    written = json.loads((output / "best.json").read_text())
    assert written["metric"] == "val_acc" and written["complete"] is True
    assert written["statuses"] == {"completed": 1, "stopped early": 1}
    assert written["value"] == pytest.approx(trials["final_val_acc"][trials["status"] == "completed"].max())
    assert written["config"]["train"]["lr"] == 0.2 and written["config"]["peers"][0]["lr"] == 0.2
    assert written["config"]["method"]["temperature"] == pytest.approx(best["params"]["method.temperature"])
    # each trial's own run directory, under the one TensorBoard log dir, holds its own curves
    for _, row in trials.iterrows():
        assert Path(row["run_dir"]).parent == output / "trials"
        assert_trial_curves(row)
    # the best config trains as it is
    assert load_config(output / "best.json").method.temperature == pytest.approx(written["config"]["method"]
                                                                                 ["temperature"])


@pytest.mark.slow
def test_asha_stops_the_clearly_worse_trial_after_one_epoch(asha_search):
    output, _ = asha_search
    trials = pd.read_parquet(output / "trials.parquet")
    bad, good = trials[trials["train.lr"] < 1e-3], trials[trials["train.lr"] > 1e-3]
    assert bad["status"].tolist() == ["stopped early"] and bad["epochs"].tolist() == [1]
    assert good["status"].tolist() == ["completed"] and good["epochs"].tolist() == [2]
    assert good["final_val_acc"].min() > bad["final_val_acc"].max()


@pytest.mark.slow
def test_pbt_clones_and_perturbs_temperature(ray_session, tmp_path):
    """Two trials, synchronous PBT (deterministic: both wait at the perturbation after epoch 1): the lr=1e-6 trial is
    the lower half and continues from the other's checkpoint, with its config and a perturbed temperature."""
    space = {"method.temperature": {"uniform": [1, 4]}, "train.lr": {"grid": [0.2, 1e-6]}, "time_budget_s": BUDGET_S,
             "scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "synch": True,
                           "resample_probability": 0.0, "mutate": ["method.temperature"]}}
    output = tmp_path / "exp"
    tune(tiny(), space, samples=1, output=output, max_concurrent=2, progress=False)
    analysis = ExperimentAnalysis(str(output))
    histories = {t.trial_id: trial_history(output / "trials", t.trial_id) for t in analysis.trials}
    assert all(h["epoch"].tolist() == [1, 2] for h in histories.values())     # every epoch, once, in order
    changed = [t for t in analysis.trials if histories[t.trial_id]["temperature"].nunique() > 1]
    assert len(changed) == 1, "exactly the lower trial's logged temperature changes"
    trial = changed[0]
    other = next(t for t in analysis.trials if t is not trial)
    assert histories[trial.trial_id]["val_acc"][0] < histories[other.trial_id]["val_acc"][0]      # the lower half
    assert trial.config["train.lr"] == other.config["train.lr"] == 0.2      # cloned: the upper trial's config
    # it continued from a cloned checkpoint in a new segment of its run, with the mutated config
    assert [d.name for d in trial_run_dirs(output / "trials", trial.trial_id)] == \
        [trial.trial_id, f"{trial.trial_id}.2_from_epoch_0001"]
    assert histories[trial.trial_id]["temperature"].iloc[-1] == pytest.approx(trial.config["method.temperature"])
    assert pd.read_parquet(output / "trials.parquet")["status"].eq("completed").all()


@pytest.mark.slow
def test_a_spent_time_budget_ends_the_search_incomplete(ray_session, tmp_path):
    """A budget far below one trial's start-up: the search ends by itself, and says the trial is out of time."""
    output = tmp_path / "exp"
    with pytest.raises(TrainingError, match="time_budget_s ran out"):
        tune(tiny(), {"train.lr": {"uniform": [0.1, 0.2]}, "time_budget_s": 1}, samples=1, output=output,
             progress=False)
    best = json.loads((output / "best.json").read_text())
    assert best["complete"] is False and best["statuses"] == {"out of time": 1} and best["value"] is None


@pytest.mark.slow
def test_a_trial_refusing_its_sampled_config_reaches_the_cli_as_one_line(ray_session, tmp_path, capsys, caplog):
    """alpha 1.5 and ce_weight complement each pass the space check, which tries one key at a time; together the
    trial's config refuses them: exit 2 with the config's own line, and no traceback logged by Tune."""
    config, space = tmp_path / "config.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(tiny()))
    space.write_text(yaml.safe_dump({"method.alpha": {"grid": [1.5]}, "method.ce_weight": {"grid": ["complement"]},
                                     "time_budget_s": BUDGET_S}))
    output = tmp_path / "exp"
    tune_log = logging.getLogger("ray.tune")        # Ray's loggers do not reach the root logger caplog listens to
    tune_log.addHandler(caplog.handler)
    try:
        code = main(["tune", str(config), "--space", str(space), "--samples", "1", "--output", str(output), "--quiet"])
    finally:
        tune_log.removeHandler(caplog.handler)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert re.fullmatch(r"raydistill: error: method\.alpha=1\.5: must be in \[0, 1\] when method\.ce_weight is "
                        r"complement \(in trial \w+_00000\)", err), err
    assert "Trials did not complete" in caplog.text           # Tune's log was heard ...
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)    # ... without a trace
    trials = pd.read_parquet(output / "trials.parquet")
    assert trials["status"].tolist() == ["error"]
    assert json.loads((output / "best.json").read_text())["complete"] is False


# ---- one search straight through, and the same search interrupted at every stage ----------------------------------
# No rung before the last epoch: Tune does not save a scheduler's state, so early stopping could differ after --resume.
SEARCH = {"train.lr": {"loguniform": [0.05, 0.5]}, "method.temperature": {"uniform": [1, 4]},
          "scheduler": {"name": "asha", "grace_period": 2}, "time_budget_s": BUDGET_S}
SAME = ["status", "train.lr", "method.temperature", "epochs", "final_val_acc", "best_val_acc", "best_epoch"]


@pytest.fixture(scope="module")
def search_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("search")
    (folder / "config.yaml").write_text(yaml.safe_dump(tiny()))
    (folder / "space.yaml").write_text(yaml.safe_dump(SEARCH))
    return folder


def cli(*args) -> tuple[int, str, str]:
    """`raydistill ARGS --quiet` in this process (the session's Ray): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--quiet"])
    return code, out.getvalue(), err.getvalue()


def search_command(files: Path, output: Path) -> list[str]:
    """Two samples of SEARCH, one trial at a time."""
    return ["tune", str(files / "config.yaml"), "--space", str(files / "space.yaml"), "--samples", "2",
            "--max-concurrent", "1", "--output", str(output)]


@pytest.fixture(scope="module")
def straight_search(ray_session, search_files):
    """The search run straight through by the command line: the CLI's success path and the drill's reference."""
    output = search_files / "straight"
    code, out, _ = cli(*search_command(search_files, output))
    return output, code, out


@pytest.mark.slow
def test_cli_tune_exits_0_and_prints_the_best_trial(straight_search):
    output, code, out = straight_search
    best = json.loads((output / "best.json").read_text())
    trials = pd.read_parquet(output / "trials.parquet")
    assert code == 0
    assert best["complete"] is True and best["statuses"] == {"completed": 2}
    assert trials["status"].tolist() == ["completed"] * 2 and trials["epochs"].tolist() == [2, 2]
    assert trials["train.lr"].nunique() == 2 and trials["train.lr"].between(0.05, 0.5).all()   # sampled, in range
    assert best["value"] == trials["final_val_acc"].max() and best["trial"] in trials["trial"].tolist()
    lines = out.splitlines()
    assert lines[0] == f"best val_acc {best['value']:.4f}: trial {best['trial']} ({best['run_dir']})"
    assert lines[1:3] == [f"  {key} = {value}" for key, value in best["params"].items()]
    assert f"{output}/best.json" in lines[3]
    assert load_config(output / "best.json").train.lr == best["params"]["train.lr"]


@pytest.mark.slow
def test_every_trial_writes_its_own_tensorboard_curves(straight_search):
    output, _, _ = straight_search
    trials = pd.read_parquet(output / "trials.parquet")
    assert len(set(trials["run_dir"])) == len(trials) == 2
    for _, row in trials.iterrows():
        assert_trial_curves(row)


class CtrlC(Callback):
    """Presses Ctrl+C once, at the stage its subclass names: Tune saves its state and ends the search. Installed
    through Ray Tune's RAY_TUNE_CALLBACKS, so the real `raydistill tune` command is the one interrupted."""
    pressed = False

    def press(self):
        if not self.pressed:
            # without Tune's handler the signal would end pytest itself: fail the test instead
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "Tune does not catch Ctrl+C"
            self.pressed = True
            os.kill(os.getpid(), signal.SIGINT)


class CtrlCBeforeAnyReport(CtrlC):
    def on_trial_start(self, iteration, trials, trial, **info):
        self.press()


class CtrlCBeforeFirstCheckpoint(CtrlC):
    """On a trial's first result: Tune saves the checkpoint that came with it in a later step, which never comes."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.press()


class CtrlCBetweenTrials(CtrlC):
    def on_trial_complete(self, iteration, trials, trial, **info):
        self.press()


class CtrlCAfterFirstCheckpoint(CtrlC):
    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.press()


@pytest.mark.slow
def test_search_interrupted_at_every_stage_resumes_to_the_same_trials(straight_search, search_files, monkeypatch):
    """This test covers: Ctrl+C before any trial reported, mid-trial before its first checkpoint, between trials and
    after a checkpoint, each followed by `raydistill tune --resume`; every interrupted phase exits non-zero with
    "complete": false; the last resume ends with every trial TERMINATED and the rows of the straight search."""
    output = search_files / "drill"

    def phase(stage: str | None, *command):
        if stage is None:
            monkeypatch.delenv("RAY_TUNE_CALLBACKS")
        else:
            monkeypatch.setenv("RAY_TUNE_CALLBACKS", f"{__name__}.{stage}")
        code, out, err = cli(*command) if command else cli("tune", "--resume", str(output))
        return code, err, json.loads((output / "best.json").read_text()), pd.read_parquet(output / "trials.parquet")

    resume_hint = f"raydistill tune --resume {output}"
    # 1. trial 0 started, Tune recorded no result (the trial itself may still report an epoch before it is stopped:
    #    its own history then holds it, and the resume below starts it over)
    code, err, best, trials = phase("CtrlCBeforeAnyReport", *search_command(search_files, output))
    assert code != 0 and resume_hint in err
    assert best["complete"] is False
    assert best["statuses"] == {"unfinished": 1, "not started": 1} and len(trials) == 1
    first = trials["trial"][0]
    # 2. trial 0 started over and reported epoch 1; Tune holds no checkpoint of it
    code, err, best, trials = phase("CtrlCBeforeFirstCheckpoint")
    assert code != 0 and resume_hint in err
    assert best["complete"] is False and best["statuses"] == {"unfinished": 1, "not started": 1}
    assert trials["epochs"][0] >= 1
    assert [t.checkpoint for t in ExperimentAnalysis(str(output)).trials] == [None]
    # 3. trial 0 starts over in a fresh run directory (its lost attempt's folder and rows gone) and completes
    code, err, best, trials = phase("CtrlCBetweenTrials")
    assert code != 0 and resume_hint in err
    assert best["complete"] is False and best["statuses"] == {"completed": 1, "not started": 1}
    assert trial_run_dirs(output / "trials", first) == [output / "trials" / first]
    assert [json.loads(line)["epoch"] for line in (output / "trials" / f"{first}.jsonl").read_text().splitlines()] \
        == [1, 2]
    # 4. trial 1, drawn from the restored seeded generator, reports epoch 1 with its checkpoint
    code, err, best, trials = phase("CtrlCAfterFirstCheckpoint")
    assert code != 0 and resume_hint in err
    assert best["complete"] is False and best["statuses"] == {"completed": 1, "unfinished": 1}
    second = trials["trial"][1]
    # 5. trial 1 continues from that checkpoint in a new segment; the search is whole
    code, err, best, trials = phase(None)
    assert code == 0, err
    assert best["complete"] is True and best["statuses"] == {"completed": 2}
    assert {t.status for t in ExperimentAnalysis(str(output)).trials} == {"TERMINATED"}
    assert [d.name for d in trial_run_dirs(output / "trials", second)] == [second, f"{second}.2_from_epoch_0001"]
    straight = pd.read_parquet(straight_search[0] / "trials.parquet")
    pd.testing.assert_frame_equal(trials[SAME], straight[SAME])
    assert not math.isnan(best["value"]) and best["value"] == straight["final_val_acc"].max()



# ---- a trial's process killed; a checkpoint folder gone that Tune still lists; which trial is best ----------------
class KillTrialAfterASnapshot(Callback):
    """kill -9 of the first trial's process (`ray::ImplicitFunc`; its pid from its own report) while it trains: at
    the end of the step of Tune's loop in which Tune saved its state after the trial's first checkpoint (Tune saves
    it at a trial's second checkpoint at the latest)."""
    pid = None
    saved = killed = False

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.pid is None:
            self.pid = trial.last_result["pid"]

    def get_state(self):                # asked whenever Tune saves its state
        self.saved = self.pid is not None
        return None

    def on_step_end(self, iteration, trials, **info):
        if self.saved and not self.killed:
            self.killed = True
            os.kill(self.pid, signal.SIGKILL)


def search_of(folder: Path, space: dict, epochs: int) -> list[str]:
    """The command of a search of `space` (one sample, one trial at a time) over tiny(epochs), in `folder`."""
    config, path = folder / "config.yaml", folder / "space.yaml"
    config.write_text(yaml.safe_dump(tiny(epochs=epochs)))
    path.write_text(yaml.safe_dump({**space, "time_budget_s": BUDGET_S,
                                    "scheduler": {"name": "asha", "grace_period": epochs}}))    # no early stop
    return ["tune", str(config), "--space", str(path), "--samples", "1", "--max-concurrent", "1",
            "--output", str(folder / "exp")]


@dataclasses.dataclass
class Ended:
    """What a `raydistill tune` command said and left: its exit code, its stderr, best.json, trials.parquet."""
    code: int
    err: str
    best: dict
    trials: pd.DataFrame


def run_search(output: Path, *command: str) -> Ended:
    code, _, err = cli(*command)
    return Ended(code, err, json.loads((output / "best.json").read_text()), pd.read_parquet(output / "trials.parquet"))


@pytest.fixture(scope="module")
def killed_search(ray_session, tmp_path_factory) -> tuple[Path, Ended, Ended]:
    """Two trials of 3 epochs, one after another: lr 1.2, whose best epoch is its first (val_acc 0.2431, 0.2083,
    0.2083), then lr 0.02, which ends better (0.1806, 0.2083, 0.2292). The first one's process is killed while it
    trains; then the search is resumed with the command it printed."""
    folder = tmp_path_factory.mktemp("killed")
    command, output = search_of(folder, {"train.lr": {"grid": [1.2, 0.02]}}, epochs=3), folder / "exp"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TUNE_CALLBACKS", f"{__name__}.KillTrialAfterASnapshot")
        killed = run_search(output, *command)
    return output, killed, run_search(output, "tune", "--resume", str(output))


@pytest.mark.slow
def test_a_killed_trial_is_an_error_named_with_the_command_that_resumes_it(killed_search):
    """Tune lets a trial whose process died go before it fails the trial's call, and does not save that trial's
    state again (its saved state keeps it RUNNING): the search must still say error (exit 1, not the 130 of an
    interrupted search), name the trial, its error and the command that continues it, which then runs the trial
    again from its last checkpoint."""
    output, stopped, resumed = killed_search
    killed = stopped.trials["trial"][0]
    assert stopped.trials["status"].tolist() == ["error", "completed"]
    assert stopped.best["complete"] is False and stopped.best["statuses"] == {"error": 1, "completed": 1}
    assert stopped.code == 1, stopped.err
    died = "ActorDiedError: The actor died unexpectedly before finishing this task."
    assert stopped.best["errors"] == {killed: died}
    assert one_line(stopped.err) == (
        f"raydistill: trial {killed} failed: {died} ({output}/{killed}/error.txt); the search did not finish "
        f"({', '.join(f'{n} {status}' for status, n in stopped.best['statuses'].items())}); continue with "
        f"raydistill tune --resume {output} (a failed trial runs again from its last checkpoint)")
    assert "died" in (output / killed / "error.txt").read_text()
    # the printed command: the killed trial continues from its last checkpoint, in a new segment of its run
    assert resumed.code == 0, resumed.err
    assert resumed.trials["status"].tolist() == ["completed"] * 2
    segments = [d.name for d in trial_run_dirs(output / "trials", killed)]
    assert len(segments) == 2 and segments[1].startswith(f"{killed}.2_from_epoch_"), segments


def last_val_acc(run_dir, peers: int = 2) -> float:
    """The best peer's validation accuracy at the last epoch of a run, from its TensorBoard curves."""
    curves = scalars(run_dir)
    return max(curves[f"peer{i}/val/acc"][-1][1] for i in range(peers))


@pytest.mark.slow
def test_the_best_trial_is_the_best_final_figure_not_the_best_epoch(killed_search):
    """best.json holds the trial with the best final figure among the completed ones (docs/tune.md, README): here
    the trial whose best epoch beats every epoch of the other is the worse one at its end. The final figures are
    read from each trial's own run (its last segment's TensorBoard curves: the best peer's last val/acc)."""
    _, _, resumed = killed_search
    best, trials = resumed.best, resumed.trials.set_index("trial")
    assert (trials["status"] == "completed").all() and (trials["epochs"] == 3).all()
    first = trials.index[0]
    assert trials["best_val_acc"].idxmax() == first and trials["best_epoch"][first] == 1, trials     # the premise
    final = {trial: last_val_acc(run_dir) for trial, run_dir in trials["run_dir"].items()}
    assert max(final, key=final.get) != first, final
    assert best["complete"] is True
    assert best["trial"] == max(final, key=final.get) and best["value"] == pytest.approx(max(final.values()))
    assert best["params"]["train.lr"] == 0.02 and best["config"]["train"]["lr"] == 0.02


class CtrlCAtSecondCheckpoint(CtrlC):
    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if checkpoint.path.endswith("checkpoint_000001"):
            self.press()


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.slow
def test_a_resumed_search_deletes_a_checkpoint_tune_still_lists_without_an_error(ray_session, tmp_path, monkeypatch):
    """One trial of 3 epochs, Ctrl+C once its second checkpoint is in, whose first one is then removed: what Tune's
    state holds after a search stopped outright (kill -9, a lost machine) just after Tune deleted that folder. The
    resume deletes it again at the trial's next checkpoint: no FileNotFoundError traceback in Tune's log."""
    command, output = search_of(tmp_path, {"train.lr": {"grid": [0.2]}}, epochs=3), tmp_path / "exp"
    monkeypatch.setenv("RAY_TUNE_CALLBACKS", f"{__name__}.CtrlCAtSecondCheckpoint")
    assert cli(*command)[0] == 130
    monkeypatch.delenv("RAY_TUNE_CALLBACKS")
    trial = pd.read_parquet(output / "trials.parquet")["trial"][0]
    shutil.rmtree(output / trial / "checkpoint_000000")        # Tune's state lists it beside checkpoint_000001
    tune_log, recorder = logging.getLogger("ray.tune"), Recorder()     # Ray's loggers do not reach the root logger
    tune_log.addHandler(recorder)
    try:
        code, _, err = cli("tune", "--resume", str(output))
    finally:
        tune_log.removeHandler(recorder)
    assert code == 0, err
    failures = [r.getMessage() for r in recorder.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not failures, failures       # was: "Error handling checkpoint" with a FileNotFoundError traceback
    assert sorted(p.name for p in (output / trial).glob("checkpoint_*")) == ["checkpoint_000001", "checkpoint_000002"]
