"""Ray Tune searches: spaces are checked before any trial, ASHA stops a bad trial, PBT perturbs, an interrupted
experiment resumes; each trial is a real raydistill run on digits."""
import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray.tune import Callback, ExperimentAnalysis

from raydistill.cli import main
from raydistill.config import apply_overrides, load_config, preset_names, raw_config
from raydistill.errors import ConfigError
from raydistill.tune import (SETTINGS, clamp_to_space, load_space, max_concurrent_trials, segment_dir, trial_history,
                             trial_run_dirs, tune)


def tiny(**train) -> dict:
    """2 peers of a 16-unit MLP on digits, a few steps per epoch."""
    return {"name": "tiny-tune", "seed": 3, "data": {"name": "digits"},
            "model": {"arch": "mlp", "options": {"hidden": [16]}}, "peers": 2, "method": {"name": "dml"},
            "train": {"epochs": 2, "batch_size": 256, "lr": 0.2, **train}}


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
])
def test_bad_space_fails_with_one_line_naming_the_field(tmp_path, space, field, words):
    with pytest.raises(ConfigError) as err:
        tune(tiny(), space, output=tmp_path / "exp")
    assert err.value.field == field and words in str(err.value) and "\n" not in str(err.value)
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
            space = load_space(path, base)
            assert space.params == {key: tuple(spec.items())[0] for key, spec in written.items()
                                    if key not in SETTINGS}, (path.name, preset)
            regression = load_config(base).task == "regression"
            assert (space.metric, space.mode) == (("val_mse", "min") if regression else ("val_acc", "max"))
            checked.append((path.stem, preset))
    assert len({stem for stem, _ in checked}) == len(files)


def test_concurrency_counts_whole_runs():

    config = load_config(tiny())            # bundles: coordinator+trial 2 CPU, 2 peers x 1 CPU -> 4 CPU per trial
    assert max_concurrent_trials(config, {"CPU": 8}) == 2
    assert max_concurrent_trials(config, {"CPU": 11.5}) == 2
    gpu = load_config(tiny(), ["resources.gpus_per_peer=0.5"])    # 1 GPU per trial
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 3}) == 3
    with pytest.raises(ConfigError, match="one trial reserves"):
        max_concurrent_trials(config, {"CPU": 3})


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


# ---- real searches ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asha_search(ray_session, tmp_path_factory):
    """4 trials x 2 epochs, one after another so that ASHA's rung sees them in grid order: lr 0.2, 1e-6, 0.2, 1e-6."""
    output = tmp_path_factory.mktemp("asha") / "exp"
    space = {"train.lr": {"grid": [0.2, 1e-6]}, "method.temperature": {"uniform": [1, 4]},
             "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}}
    best = tune(tiny(), space, samples=2, output=output, max_concurrent=1, progress=False)
    return output, best


@pytest.mark.slow
def test_asha_search_writes_best_json_and_trials_parquet(asha_search):
    output, best = asha_search
    trials = pd.read_parquet(output / "trials.parquet")
    assert len(trials) == 4
    assert {"trial", "status", "train.lr", "method.temperature", "epochs", "final_val_acc", "best_val_acc",
            "run_dir"} <= set(trials.columns)
    written = json.loads((output / "best.json").read_text())
    assert written["metric"] == "val_acc" and written["complete"] is True
    assert written["value"] == pytest.approx(trials["final_val_acc"][trials["status"] == "completed"].max())
    assert written["config"]["train"]["lr"] == 0.2 and written["config"]["peers"][0]["lr"] == 0.2
    assert written["config"]["method"]["temperature"] == pytest.approx(best["params"]["method.temperature"])
    # every trial's run directory sits under one TensorBoard log dir
    for run_dir in trials["run_dir"]:
        assert run_dir.startswith(str(output / "trials")) and any((output / "trials").glob("*/tb/events.*"))
    # the best config trains as it is

    assert load_config(output / "best.json").method.temperature == pytest.approx(written["config"]["method"]
                                                                                 ["temperature"])


@pytest.mark.slow
def test_asha_stops_the_clearly_worse_trials_after_one_epoch(asha_search):
    output, _ = asha_search
    trials = pd.read_parquet(output / "trials.parquet")
    bad, good = trials[trials["train.lr"] < 1e-3], trials[trials["train.lr"] > 1e-3]
    assert (bad["status"] == "stopped early").all() and (bad["epochs"] == 1).all()
    assert (good["status"] == "completed").all() and (good["epochs"] == 2).all()
    assert good["final_val_acc"].min() > bad["final_val_acc"].max()


@pytest.mark.slow
def test_pbt_clones_and_perturbs_temperature(ray_session, tmp_path):
    """Two trials, synchronous PBT (deterministic: both wait at every perturbation), perturbations after epochs 1 and
    2: the lr=1e-6 trial is the lower half at the first and continues from the other's checkpoint with a perturbed
    temperature."""
    space = {"method.temperature": {"uniform": [1, 4]}, "train.lr": {"grid": [0.2, 1e-6]},
             "scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "synch": True,
                           "resample_probability": 0.0, "mutate": ["method.temperature"]}}
    output = tmp_path / "exp"
    tune(tiny(epochs=3), space, samples=1, output=output, max_concurrent=2, progress=False)
    analysis = ExperimentAnalysis(str(output))
    histories = {t.trial_id: trial_history(output / "trials", t.trial_id) for t in analysis.trials}
    assert all(h["epoch"].tolist() == [1, 2, 3] for h in histories.values())     # every epoch, once, in order
    changed = [t for t in analysis.trials if histories[t.trial_id]["temperature"].nunique() > 1]
    assert changed, "no trial's logged temperature changed"
    trial = changed[0]
    # it continued from a cloned checkpoint in a new segment of its run, with the mutated config
    assert len(trial_run_dirs(output / "trials", trial.trial_id)) >= 2
    history = histories[trial.trial_id]
    assert history["temperature"].iloc[-1] == pytest.approx(trial.config["method.temperature"])
    assert pd.read_parquet(output / "trials.parquet")["status"].eq("completed").all()


class InterruptAfterFirstCheckpoint(Callback):
    """Ends the experiment the way Ctrl+C does, once the first checkpoint is registered: deterministic."""

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_interrupted_experiment_resumes_from_its_checkpoint(ray_session, tmp_path):
    output = tmp_path / "exp"
    first = tune(tiny(), {"method.temperature": {"uniform": [1, 4]}}, samples=1, output=output, max_concurrent=1,
                 progress=False, callbacks=[InterruptAfterFirstCheckpoint()])
    assert first["complete"] is False
    assert pd.read_parquet(output / "trials.parquet")["status"].tolist() == ["unfinished"]
    best = tune(resume=output, progress=False)
    trials = pd.read_parquet(output / "trials.parquet")
    assert best["complete"] is True and trials["status"].tolist() == ["completed"] and trials["epochs"][0] == 2
    dirs = trial_run_dirs(output / "trials", trials["trial"][0])
    assert [d.name.split(".")[-1] for d in dirs][1:] == ["2_from_epoch_0001"]     # continued, not restarted
    assert json.loads((dirs[-1] / "summary.json").read_text())["epochs_completed"] == 2
