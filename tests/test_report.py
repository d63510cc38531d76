"""`raydistill plot` and `raydistill report`: the figures and the HTML page of real run directories.

This test covers:
- a DKEL run trained through Ray actors (two peers with EMA teachers, the ensemble, consistency, the ramp and β
  schedules): its figure draws every model that metrics.parquet records, with the numbers summary.json reports at the
  last epoch, every panel's axes labelled with units, as real PNG and SVG files; several runs add a comparison figure;
- the health watch's rollbacks, the replayed epoch and the stop of a run (a consistency bound crossed at every epoch)
  marked on the epoch axis of every panel and told in the title; peers added and removed by resuming, marked between
  the epochs where they happened;
- the report of the Ray run: one self-contained page (the figure inlined, no script, nothing fetched) naming every model
  of the run with its figures, the exported models with their class names, the config, where it trained and the
  command that repeats it; the report of the stopped run tells its rollbacks and the stop;
- a folder that is not a run directory is refused in one line.
Runs are tiny (digits, 16-unit MLPs, one or two epochs). The page's look is checked by hand in headless Chromium.
"""
import base64
import io
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import pandas as pd
import pytest
from PIL import Image

import raydistill
from raydistill import plots
from raydistill.cli import main as cli
from raydistill.runtime.loop import TrainingError
from tests.conftest import one_line, tiny_dml, write_config

TINY = ["model.options.hidden=[16]", "train.batch_size=256", "peers=2"]


@pytest.fixture(scope="module")
def ray_run(ray_session, tmp_path_factory):
    """The dkel-digits preset shrunk to two epochs of two 16-unit MLPs, through Ray actors."""
    return raydistill.train("dkel-digits", tmp_path_factory.mktemp("dkel") / "run",
                            overrides=[*TINY, "train.epochs=2"], progress=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A consistency bound crossed at every epoch: epoch 1 rolled back to the start and replayed, then the stop."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(TrainingError, match="max_consistency"):
        raydistill.train("dkel-digits", run_dir, runtime="inprocess", progress=False,
                         overrides=[*TINY, "train.epochs=2",
                                    "train.health={max_consistency: 1.0e-9, max_rollbacks: 1}"])
    return run_dir


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory) -> Path:
    """Three epochs; peer3 added (a copy of peer2) after epoch 1, peer1 removed after epoch 2, both by resuming."""
    folder = tmp_path_factory.mktemp("elastic")
    config = write_config(folder / "run.yaml", tiny_dml(**{"train.epochs": 3, "model.options": {"hidden": [16]}}))
    run_dir = str(folder / "run")
    inprocess = ["--runtime", "inprocess", "--quiet"]
    assert cli(["train", config, "--output", run_dir, "--stop-after-epoch", "1", *inprocess]) == 0
    assert cli(["train", "--resume", run_dir, "--stop-after-epoch", "2", "--set", "peers.3.init=peer:2",
                *inprocess]) == 0
    assert cli(["train", "--resume", run_dir, "--set", "peers=[{id: 0}, {id: 2}, {id: 3}]", *inprocess]) == 0
    return Path(run_dir)


def vertical_lines(axis) -> list[float]:
    """The x of every full-height vertical line drawn on an axis (axvline)."""
    return sorted({line.get_xdata()[0] for line in axis.get_lines()
                   if len(set(line.get_xdata())) == 1 and list(line.get_ydata()) == [0, 1]})


def svg_text(path: Path) -> str:
    return " ".join(ElementTree.parse(path).getroot().itertext())


# ---- raydistill plot ------------------------------------------------------------------------------------------------
def test_the_figure_of_a_ray_run_draws_every_model_with_its_recorded_figures(ray_run, elastic_run, tmp_path, capsys):
    run_dir, summary = ray_run.run_dir, ray_run.summary
    assert summary["runtime"] == "ray"
    assert cli(["plot", str(run_dir), str(elastic_run), "--output", str(tmp_path)]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert written == {"run.png", "run.svg", "run_.png", "run_.svg", "runs.png", "runs.svg"}     # two runs named run
    for name in written:
        assert (tmp_path / name).stat().st_size > 10_000
    with Image.open(tmp_path / "run.png") as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 900

    curves = plots.run_curves(run_dir)
    models = list(dict.fromkeys(pd.read_parquet(run_dir / "metrics.parquet")["model"]))
    assert sorted(models) == ["ensemble", "peer0", "peer0_ema", "peer1", "peer1_ema"]
    figure = plots.draw_run(curves)
    accuracy = figure.axes[0]
    lines = {line.get_label(): line for line in accuracy.get_lines()}
    assert set(lines) == set(models)
    last = {p["name"]: p["test_acc"] for p in summary["peers"] + summary["ema_teachers"]}
    last["ensemble"] = summary["ensemble_test_acc"]
    for name, line in lines.items():
        assert list(line.get_xdata()) == [1, 2]
        assert line.get_ydata()[-1] == pytest.approx(100 * last[name], abs=1e-4)      # percent
    assert set(curves.weights) == {"alpha", "ce_weight", "ramp", "beta"}            # dkel's schedules
    assert curves.temperature is not None and curves.consistency is not None
    assert curves.consistency.iloc[-1] == pytest.approx(summary["consistency"], abs=1e-9)
    for axis in figure.axes:
        assert axis.get_xlabel() == "epoch" and re.search(r"\(.+\)$", axis.get_ylabel()), axis.get_ylabel()
    text = svg_text(tmp_path / "run.svg")
    for label in ("test accuracy (%)", "mean pairwise KL between peers (nats)", "weight (dimensionless)",
                  "temperature T (dimensionless)", "peer1_ema", "ensemble"):
        assert label in text


def test_rollbacks_the_replayed_epoch_and_the_stop_are_marked_on_the_epoch_axis(stopped_run):
    summary = json.loads((stopped_run / "summary.json").read_text())
    events = summary["rollbacks"]["events"]
    assert [(e["epoch"], e["back_to"], e["rule"]) for e in events] == [(1, 0, "max_consistency")]
    assert summary["stopped"]["rule"] == "max_consistency"
    curves = plots.run_curves(stopped_run)
    assert [(m.epoch, m.kind) for m in curves.markers] == [(1.0, "rollback"), (1.0, "stop")]
    assert curves.replayed == [1]                           # the recorded epoch 1 is its replay
    figure = plots.draw_run(curves)
    assert "epoch 1: rollback to epoch 0 (max_consistency)" in figure.get_suptitle()
    assert "epoch 1: stopped (max_consistency)" in figure.get_suptitle()
    for axis in figure.axes:
        assert vertical_lines(axis) == [1.0]


def test_peers_added_and_removed_are_marked_between_the_epochs_where_they_changed(elastic_run):
    curves = plots.run_curves(elastic_run)
    assert [(m.epoch, m.tag) for m in curves.markers] == [(1.5, "+peer3"), (2.5, "−peer1")]
    assert list(curves.test["peer3"].index) == [2, 3] and list(curves.test["peer1"].index) == [1, 2]
    figure = plots.draw_run(curves)
    assert vertical_lines(figure.axes[0]) == [1.5, 2.5]
    assert {t.get_text() for t in figure.axes[0].texts} >= {"+peer3", "−peer1"}


def test_a_folder_that_is_not_a_run_directory_is_refused_in_one_line(tmp_path, capsys):
    assert cli(["plot", str(tmp_path), "--output", str(tmp_path / "plots")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"raydistill: error: RUN='{tmp_path}': is not a run directory with epochs recorded (no metrics.parquet)")
    assert not (tmp_path / "plots").exists()


# ---- raydistill report ----------------------------------------------------------------------------------------------
def test_the_report_is_one_self_contained_page_naming_every_model_of_the_run(ray_run, capsys):
    run_dir, summary = ray_run.run_dir, ray_run.summary
    assert cli(["report", str(run_dir)]) == 0
    page_path = Path(capsys.readouterr().out.strip())
    assert page_path == run_dir / "report.html"
    page = page_path.read_text()
    assert not re.search(r"<script|<link|<iframe|(src|href)=\"(https?:|//|file:)", page)    # nothing to fetch
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as image:
        assert image.format == "PNG" and image.width >= 1000
    final_table = page.split("<h2>Curves</h2>")[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr[^>]*><td>([\w ()]+)</td>.*?</tr>", final_table)}
    for name in pd.read_parquet(run_dir / "metrics.parquet")["model"].unique():
        assert name in rows, name                                                      # every model of the run
    for peer in summary["peers"]:
        assert f"{peer['test_acc']:.4f}" in rows[peer["name"]]
    assert f"{summary['ensemble_test_acc']:.4f}" in rows["ensemble"]
    assert 'class="deployed"><td>' + summary["deploy"]["name"] in page
    assert "class names: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in page
    assert (run_dir / "config.yaml").read_text().replace("'", "&#x27;") in page             # the resolved config
    assert "runtime ray, transport" in page and "raydistill train" in page and "raydistill report" in page
    assert "No health rollback." in page and "No peer added or removed." in page


def test_the_report_of_a_stopped_run_tells_its_rollbacks_and_the_stop(stopped_run, tmp_path):
    assert cli(["report", str(stopped_run), "--output", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    summary = json.loads((stopped_run / "summary.json").read_text())
    reason = summary["rollbacks"]["events"][0]["reason"]
    assert f"<td>{reason}</td>" in page
    assert "Stopped at epoch 1 by max_consistency" in page
    assert "No export/ folder: the run has not finished." in page
    for name in ("peer0", "peer1", "peer0_ema", "peer1_ema", "ensemble"):
        assert f"<td>{name}</td>" in page
