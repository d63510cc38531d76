"""`raydistill results`: methods x seeds on one setup; its tables hold exactly what the runs' summary.json files say,
computed here independently, and nothing in them is chosen on the test split."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from raydistill import results
from raydistill.errors import ConfigError

TINY = ["--set", "train.epochs=1", "--set", "model.options={hidden: [16]}", "--set", "train.batch_size=128"]


def run_results(tmp_path: Path, *args) -> Path:
    output = tmp_path / "results"
    assert results.main(["dml-digits", *TINY, *args, "--output", str(output)]) == 0     # args override TINY
    return output


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def mean_std(values) -> str:
    """The cell the table must show, from numpy: percent, two decimals, sample standard deviation."""
    values = 100 * np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory) -> Path:
    """independent and dml x seeds 0, 1, two epochs each: the tables' and the figures' results directory."""
    return run_results(tmp_path_factory.mktemp("two"), "--methods", "independent,dml", "--seeds", "2",
                       "--set", "train.epochs=2")


def test_tables_hold_the_runs_summaries_mean_and_std(two_methods):
    output = two_methods
    markdown = (output / "results.md").read_text()
    assert "raydistill results dml-digits --methods independent,dml --seeds 2" in markdown   # the exact command
    assert "cores" in markdown and "torch" in markdown                                        # the machine
    per_model = {(row[0], row[1]): row for row in table_rows(markdown, "method | model")}
    overview = {row[0]: row for row in table_rows(markdown, "method | seeds")}
    for method in ("independent", "dml"):
        summaries = [json.loads((output / f"{method}-s{seed}" / "summary.json").read_text()) for seed in (0, 1)]
        assert [s["method"] for s in summaries] == [method, method]
        for index in range(3):
            peers = [s["peers"][index] for s in summaries]
            row = per_model[(method, f"peer{index}")]
            assert row[2] == mean_std([p["test_acc"] for p in peers])
            assert row[3] == mean_std([p["test_acc_at_best_epoch"] for p in peers])
            assert row[5] == "2"
        ensemble = per_model[(method, "ensemble")]
        assert ensemble[2] == mean_std([s["ensemble_test_acc"] for s in summaries])
        assert ensemble[3] == mean_std([s["ensemble_test_acc_at_best_epoch"] for s in summaries])
        deployed_names = [s["deploy"]["name"] for s in summaries]
        deployed = next(row for key, row in per_model.items() if key[0] == method and key[1].startswith("deployed"))
        assert all(name in deployed[1] for name in deployed_names)
        deployed_last = [next(p for p in s["peers"] if f"peer{p['index']}" == s["deploy"]["name"])["test_acc"]
                         for s in summaries]
        assert deployed[2] == mean_std(deployed_last)
        peers_mean = [np.mean([p["test_acc"] for p in s["peers"]]) for s in summaries]
        assert overview[method][1] == "2" and overview[method][2] == mean_std(peers_mean)
        assert overview[method][4] == "—"                       # no EMA teachers in independent or dml
    paired = table_rows(markdown, "method | peers − independent")
    assert [row[0] for row in paired] == ["dml"]
    differences = []
    for seed in (0, 1):
        summaries = [json.loads((output / f"{method}-s{seed}" / "summary.json").read_text())
                     for method in ("dml", "independent")]
        means = [np.mean([p["test_acc"] for p in summary["peers"]]) for summary in summaries]
        differences.append(100 * (means[0] - means[1]))
    differences = np.asarray(differences)
    expected = f"{differences.mean():.2f} ± {differences.std(ddof=1):.2f}"
    assert paired[0][1] == ("+" if differences.mean() >= 0 else "") + expected and paired[0][3] == "2"
    figures = json.loads((output / "results.json").read_text())
    assert figures["dml"]["models"]["peer0"]["last"]["values"] == [
        json.loads((output / f"dml-s{seed}" / "summary.json").read_text())["peers"][0]["test_acc"] for seed in (0, 1)]


def test_without_a_validation_split_nothing_is_chosen(tmp_path):
    """val_fraction 0: best epochs and the deployed model would be chosen on the test split, so they are not shown."""
    output = run_results(tmp_path, "--methods", "dml", "--seeds", "2", "--set", "data.val_fraction=0")
    markdown = (output / "results.md").read_text()
    rows = table_rows(markdown, "method | model")
    assert [row[1] for row in rows][:4] == ["peer0", "peer1", "peer2", "ensemble"]
    assert all(row[3] == "—" and row[2] != "—" for row in rows)                           # last only
    deploys = [json.loads((output / f"dml-s{seed}" / "summary.json").read_text())["deploy"] for seed in (0, 1)]
    if len(rows) == 5:                            # a deployed model, shown only where the test split did not choose it
        assert rows[4][1].startswith("deployed") and not any(results.chosen_on_test(d) for d in deploys)
    else:
        assert any(results.chosen_on_test(d) for d in deploys)


def test_a_finished_run_is_kept_and_parallel_jobs_train_the_same_function(tmp_path):
    output = run_results(tmp_path, "--methods", "dml", "--seeds", "2", "--jobs", "2")   # two spawned processes
    first = json.loads((output / "dml-s1" / "summary.json").read_text())
    stamp = (output / "dml-s1" / "summary.json").stat().st_mtime_ns
    again = tmp_path / "again"
    assert results.main(["dml-digits", "--methods", "dml", "--seeds", "1,0", "--output", str(output), *TINY]) == 0
    assert (output / "dml-s1" / "summary.json").stat().st_mtime_ns == stamp         # kept, not trained again
    assert results.main(["dml-digits", "--methods", "dml", "--seeds", "0,1", "--output", str(again), *TINY]) == 0
    alone = json.loads((again / "dml-s1" / "summary.json").read_text())
    assert [p["test_acc"] for p in alone["peers"]] == [p["test_acc"] for p in first["peers"]]


def test_per_method_overrides_and_the_setups_own_method_block(tmp_path):
    specs = results.plan("kdcl-digits", ["kdcl", "dml"], [0], ["train.epochs=2", "kdcl:method.ensemble=mean_probs",
                                                               "dml:method.temperature=2"])
    by_method = {spec.method: spec.config for spec in specs}
    assert by_method["kdcl"]["method"]["ensemble"] == "mean_probs"
    assert by_method["dml"]["method"]["temperature"] == 2.0 and by_method["dml"]["method"]["ensemble"] is None
    assert all(config["train"]["epochs"] == 2 for config in by_method.values())
    own = results.plan("pcl-cifar10", ["pcl", "independent"], [3], ["data.root=nowhere"])
    assert own[0].config["method"]["rampup_epochs"] == 80.0 and own[0].config["seed"] == 3      # the preset's block
    assert own[1].config["method"]["alpha"] == 0.0                                              # independent's own


def test_a_results_directory_of_another_configuration_refuses(tmp_path):
    output = run_results(tmp_path, "--methods", "independent", "--seeds", "1")
    with pytest.raises(ConfigError) as err:
        results.main(["dml-digits", "--methods", "independent", "--seeds", "1", "--output", str(output), *TINY,
                      "--set", "train.lr=0.2"])
    assert err.value.field == "--output" and "train.lr" in err.value.allowed


@pytest.mark.parametrize("argv, field", [
    (["--methods", "dml,nope"], "--methods"),
    (["--seeds", "zero"], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
    (["--jobs", "0"], "--jobs"),
    (["--jobs", "2", "--runtime", "ray"], "--jobs"),
    (["--set", "pcl:method.temperature=2"], "--set"),              # a prefix outside --methods
    (["--set", "method.ensemble=mean_probs"], "method.ensemble"),   # dml does not use it
])
def test_bad_input_is_one_line_naming_the_field(tmp_path, argv, field):
    with pytest.raises(ConfigError) as err:
        results.main(["dml-digits", "--methods", "dml", *argv, "--output", str(tmp_path / "out")])
    assert err.value.field == field
    assert not re.search(r"\n", str(err.value))


# ---- the figures beside the tables ---------------------------------------------------------------------------------
def test_figures_draw_each_methods_curve_the_paired_difference_and_the_ensemble_gap(two_methods):
    """The figures' numbers at the last epoch are the runs' summary.json figures (a file the figures do not read);
    the files are real PNG and SVG images that results.md links."""
    from PIL import Image
    from xml.etree import ElementTree

    from raydistill import plots

    output = two_methods
    summaries = {(method, seed): json.loads((output / f"{method}-s{seed}" / "summary.json").read_text())
                 for method in ("independent", "dml") for seed in (0, 1)}
    peers_mean = {key: np.mean([p["test_acc"] for p in s["peers"]]) for key, s in summaries.items()}
    curves = plots.results_curves({m: {seed: output / f"{m}-s{seed}" for seed in (0, 1)}
                                   for m in ("independent", "dml")}, "acc")
    assert curves.baseline == "independent"
    for method in ("independent", "dml"):
        assert curves.peers[method].index.tolist() == [1, 2]                      # every epoch, not only the last
        for seed in (0, 1):
            assert curves.peers[method].loc[2, seed] == pytest.approx(peers_mean[method, seed], abs=1e-7)
            gap = summaries[method, seed]["ensemble_test_acc"] - peers_mean[method, seed]
            assert plots.ensemble_gap(curves, method).loc[2, seed] == pytest.approx(gap, abs=1e-7)
    for seed in (0, 1):
        difference = peers_mean["dml", seed] - peers_mean["independent", seed]
        assert plots.paired_difference(curves, "dml").loc[2, seed] == pytest.approx(difference, abs=1e-7)
    markdown = (output / "results.md").read_text()
    for name in ("curves", "paired_difference", "ensemble_gap"):
        png, svg = output / f"{name}.png", output / f"{name}.svg"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
        text = " ".join(ElementTree.parse(svg).getroot().itertext())
        assert "epoch" in text and ("(%)" in text or "percentage points" in text)     # axes labelled with units
        assert f"]({name}.png)" in markdown
    assert "peers' mean − independent (percentage points)" in (output / "paired_difference.svg").read_text()
