"""Figures of run directories and of results directories, drawn headless (matplotlib's Agg, no display). No Ray.

    raydistill plot RUN [RUN...] [--output DIR]

One figure per run from its ``metrics.parquet`` and ``summary.json``: the test figure of every model per epoch (each
peer, its EMA teacher, the teachers, the ensemble), each peer's training loss, the peers' consistency, the
distillation weights (alpha, ce_weight, ramp, beta), the temperature and each peer's learning rate; health rollbacks
and peer changes are marked on every panel's epoch axis, restarts (whose epochs a run does not record) counted in the
title. Several runs also get ``runs.png``: their peers' mean and ensemble side by side. ``raydistill results`` draws
its figures with ``draw_results``: per method the peers' mean per epoch (mean over seeds, a band of one standard
deviation), the paired difference against the baseline, and the ensemble's gap over the peers' mean.

matplotlib is an extra (``pip install 'raydistill[plots]'``); every figure is written as PNG and SVG.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import pandas as pd

from raydistill.engine.evaluation import primary_metric
from raydistill.errors import ConfigError

FORMATS = ("png", "svg")
MATPLOTLIB_MISSING = "needs matplotlib: pip install 'raydistill[plots]'"
RUN_FIGURE_DPI = 110
WEIGHTS = ("alpha", "ce_weight", "ramp", "beta")           # the dimensionless distillation weights metrics.parquet logs
# equal weights (alpha = ce_weight = 1) would hide each other: each its own line style and marker
WEIGHT_STYLES = {"alpha": {"linestyle": "-", "marker": "o", "linewidth": 2.5, "alpha": 0.8},
                 "ce_weight": {"linestyle": "--", "marker": "s", "linewidth": 1.5},
                 "ramp": {"linestyle": "-", "marker": "^", "linewidth": 1.5},
                 "beta": {"linestyle": ":", "marker": "D", "linewidth": 1.5}}


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:                 # a module set to None in sys.modules: blocked, as if not installed
        return False


def have_matplotlib() -> bool:
    return installed("matplotlib")


def require_matplotlib(field: str) -> None:
    """One line naming the command's field when the plots extra is not installed."""
    if not have_matplotlib():
        raise ConfigError(field, "matplotlib", MATPLOTLIB_MISSING)


def new_figure(width: float, height: float):
    """A figure on the Agg canvas, outside pyplot: no display, no global figure state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(figure, dpi: int = RUN_FIGURE_DPI) -> bytes:
    """The figure as a PNG of at most 256 colors: lines and text on white need no more, and the file is a third."""
    from PIL import Image            # matplotlib's own dependency

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        out = io.BytesIO()
        image.convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)
    return out.getvalue()


def save(figure, stem: Path, formats=FORMATS, dpi: int = RUN_FIGURE_DPI) -> list[Path]:
    """``stem``.png and .svg (SVG text stays text: smaller, and searchable)."""
    import matplotlib

    paths = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        if fmt == "png":
            path.write_bytes(png_bytes(figure, dpi))
        else:
            with matplotlib.rc_context({"svg.fonttype": "none"}):
                figure.savefig(path, metadata={"Date": None})
        paths.append(path)
    return paths


def metric_label(metric: str, what: str = "test") -> str:
    """An axis label with its unit."""
    return f"{what} accuracy (%)" if metric == "acc" else f"{what} {metric.upper()} (squared target units)"


def metric_scale(metric: str) -> float:
    return 100.0 if metric == "acc" else 1.0


def integer_epochs(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axis.set_xlabel("epoch")


# ---- one run: its curves, as data ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Marker:
    """Something that happened on the epoch axis: a rollback, a peer change, the stop of a run."""
    epoch: float        # where on the axis (a change between epochs N and N+1 sits at N + 0.5)
    tag: str            # a few characters on the axis
    label: str          # the whole story, in the figure's title
    kind: str           # rollback | change | stop


@dataclasses.dataclass
class RunCurves:
    """What a run's figure shows, read from its files; ``draw_run`` draws it and tests read it."""
    name: str
    title: str
    metric: str
    test: dict              # model name -> pd.Series of the test metric by epoch
    kinds: dict             # model name -> peer | ema_teacher | teacher | ensemble
    train_loss: dict        # peer name -> pd.Series
    lr: dict                # peer name -> pd.Series
    consistency: pd.Series | None
    weights: dict           # alpha, ce_weight, ramp, beta -> pd.Series (those the run logs)
    temperature: pd.Series | None
    epochs: int             # the last epoch recorded
    markers: list
    replayed: list          # epochs whose recorded attempt is a replay after a rollback
    restarts: int
    steps_redone: int


def read_run(run_dir) -> tuple[pd.DataFrame, dict]:
    """(metrics.parquet, summary.json); a directory without them is refused in one line."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.parquet").is_file():
        raise ConfigError("RUN", str(run_dir), "is not a run directory with epochs recorded (no metrics.parquet)")
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return metrics, summary


def run_markers(summary: dict) -> list[Marker]:
    """Rollbacks at the epoch they fired (``back_to``: the epochs kept), peer changes between epochs, the stop."""
    markers = [Marker(float(e["epoch"]), "rollback", f"epoch {e['epoch']}: rollback to epoch {e['back_to']} "
                      f"({e['rule']})", "rollback") for e in (summary.get("rollbacks") or {}).get("events", [])]
    for change in summary.get("peer_changes", []):
        tag = ("+" if change["action"] == "add" else "−") + change["peer"]
        verb = "added" if change["action"] == "add" else "removed"
        markers.append(Marker(change["epoch"] + 0.5, tag, f"after epoch {change['epoch']}: {change['peer']} {verb}",
                              "change"))
    stopped = summary.get("stopped")
    if stopped:
        markers.append(Marker(float(stopped["epoch"]), "stop", f"epoch {stopped['epoch']}: stopped "
                              f"({stopped['rule']})", "stop"))
    return markers


def run_curves(run_dir) -> RunCurves:
    run_dir = Path(run_dir)
    metrics, summary = read_run(run_dir)
    task = summary.get("task") or ("regression" if "test_mse" in metrics.columns else "classification")
    metric = primary_metric(task)[0]
    by_epoch = metrics.drop_duplicates("epoch").set_index("epoch").sort_index()     # the run-wide columns
    models = list(dict.fromkeys(metrics["model"]))
    kinds = dict(zip(metrics["model"], metrics["kind"]))

    def series(frame: pd.DataFrame, column: str) -> pd.Series | None:
        if column not in frame.columns:
            return None
        values = frame.set_index("epoch")[column].dropna().sort_index()
        return values if len(values) else None

    per_model = {name: metrics[metrics["model"] == name] for name in models}
    test = {name: s for name, frame in per_model.items() if (s := series(frame, f"test_{metric}")) is not None}
    peers = [name for name in models if kinds[name] == "peer"]
    train_loss = {name: s for name in peers if (s := series(per_model[name], "train_loss")) is not None}
    lr = {name: s for name in peers if (s := series(per_model[name], "train_lr")) is not None}
    weights = {key: by_epoch[key].dropna() for key in WEIGHTS
               if key in by_epoch.columns and by_epoch[key].notna().any()}
    temperature = by_epoch["temperature"].dropna() if "temperature" in by_epoch.columns else None
    consistency = by_epoch["consistency"].dropna() if "consistency" in by_epoch.columns else None
    replayed = sorted(by_epoch.index[by_epoch["replay"] > 0].tolist()) if "replay" in by_epoch.columns else []
    name = summary.get("name") or run_dir.name
    method = summary.get("method", "?")
    dataset = summary.get("dataset", "?")
    done = summary.get("epochs_completed", int(by_epoch.index.max()))
    title = (f"{name}: {method} on {dataset}, {summary.get('runtime', '?')} runtime, "
             f"{done}/{summary.get('epochs', '?')} epochs")
    restarts, redone = int(summary.get("restarts", 0) or 0), int(summary.get("steps_redone", 0) or 0)
    return RunCurves(name, title, metric, test, kinds, train_loss, lr,
                     consistency if consistency is not None and len(consistency) else None, weights,
                     temperature if temperature is not None and len(temperature) else None,
                     int(by_epoch.index.max()), run_markers(summary), replayed, restarts, redone)


# ---- one run: the figure ---------------------------------------------------------------------------------------------
MARKER_STYLE = {"rollback": ("tab:red", "--"), "change": ("0.35", ":"), "stop": ("black", "-.")}


def mark_events(axis, curves: RunCurves, tags: bool) -> None:
    """The run's events as vertical lines on an epoch axis, tagged on the first panel (a repeated event counted);
    replayed epochs as red ticks on the axis."""
    at = {}
    for marker in curves.markers:
        at.setdefault(marker.epoch, {}).setdefault((marker.kind, marker.tag), 0)
        at[marker.epoch][(marker.kind, marker.tag)] += 1
    for epoch, events in at.items():
        color, style = MARKER_STYLE[next(iter(events))[0]]
        axis.axvline(epoch, color=color, linestyle=style, linewidth=1.2, zorder=0)
        if tags:
            text = " ".join(f"{tag}×{count}" if count > 1 else tag for (_, tag), count in events.items())
            axis.annotate(text, (epoch, 0.98), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7,
                          color=color, bbox={"facecolor": "white", "edgecolor": color, "pad": 1.5})
    for epoch in curves.replayed:
        axis.plot(epoch, 0, marker="^", color="tab:red", markersize=6, clip_on=False,
                  transform=axis.get_xaxis_transform(), zorder=5)
    axis.set_xlim(0.5, max([curves.epochs, *at]) + 0.5)


def events_text(curves: RunCurves) -> str:
    """The events in words, for the figure's title (wrapped)."""
    import textwrap

    counts = {}
    for marker in curves.markers:
        counts[marker.label] = counts.get(marker.label, 0) + 1
    parts = [f"{label} (×{count})" if count > 1 else label for label, count in counts.items()]
    if curves.replayed:
        parts.append(f"red ▲: epochs recorded from a replay ({', '.join(map(str, curves.replayed))})")
    if curves.restarts:
        parts.append(f"{curves.restarts} restart(s) of a lost worker, {curves.steps_redone} steps redone (their "
                     "epochs are not recorded)")
    return "\n".join(textwrap.wrap("events: " + "; ".join(parts), 160)) if parts else ""


def draw_series(axis, series: dict, styles: dict | None = None, scale: float = 1.0) -> None:
    for name, values in series.items():
        style = (styles or {}).get(name, {})
        axis.plot(values.index, scale * values.to_numpy(dtype=float), label=name, **{"marker": "o", "markersize": 3,
                                                                                      **style})


def model_styles(curves: RunCurves) -> dict:
    """A peer and its EMA teacher share a color (solid, dashed); teachers dotted grey; the ensemble thick black."""
    import matplotlib

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    peers = [n for n, k in curves.kinds.items() if k == "peer"]
    color_of = {name: colors[i % len(colors)] for i, name in enumerate(peers)}
    styles = {}
    for name, kind in curves.kinds.items():
        if kind == "peer":
            styles[name] = {"color": color_of[name], "linewidth": 1.2}
        elif kind == "ema_teacher":
            styles[name] = {"color": color_of.get(name[:-len("_ema")], "0.5"), "linestyle": "--", "linewidth": 1.2}
        elif kind == "teacher":
            styles[name] = {"color": "0.45", "linestyle": ":", "linewidth": 1.5}
        else:
            styles[name] = {"color": "black", "linewidth": 2.4}
    return styles


def draw_run(curves: RunCurves):
    """Six panels over the epochs: test figure per model, training loss, consistency, weights, temperature, lr."""
    figure = new_figure(12, 10.5)
    axes = figure.subplots(3, 2)
    events = events_text(curves)
    figure.suptitle(curves.title + (f"\n{events}" if events else ""), fontsize=10)
    (acc, loss), (consistency, weights), (temperature, lr) = axes
    scale = metric_scale(curves.metric)
    draw_series(acc, curves.test, model_styles(curves), scale)
    acc.set_ylabel(metric_label(curves.metric))
    acc.set_title("every model on the test split")
    draw_series(loss, curves.train_loss, model_styles(curves))
    loss.set_ylabel("training loss, all terms, epoch mean (nats)" if curves.metric == "acc" else
                    "training loss, all terms, epoch mean (squared target units)")
    loss.set_title("each peer's training loss")
    if curves.consistency is not None:
        draw_series(consistency, {"consistency": curves.consistency}, {"consistency": {"color": "tab:purple"}})
    consistency.set_ylabel("mean pairwise KL between peers (nats)")
    consistency.set_title("the peers' consistency (validation split)")
    draw_series(weights, curves.weights, WEIGHT_STYLES)
    weights.set_ylabel("weight (dimensionless)")
    weights.set_title("distillation weights at each epoch")
    if curves.temperature is not None:
        draw_series(temperature, {"temperature": curves.temperature}, {"temperature": {"color": "tab:orange"}})
    temperature.set_ylabel("temperature T (dimensionless)")
    temperature.set_title("distillation temperature")
    draw_series(lr, curves.lr, model_styles(curves))
    lr.set_ylabel("learning rate (epoch mean)")
    lr.set_title("each peer's learning rate")
    for i, axis in enumerate(axes.flat):
        integer_epochs(axis)
        axis.grid(alpha=0.3)
        mark_events(axis, curves, tags=i == 0)
        if axis.has_data() and axis.get_legend_handles_labels()[0] and i != 2:
            axis.legend(fontsize=7, ncols=2)
        elif not axis.has_data():
            axis.text(0.5, 0.5, "not recorded by this run", transform=axis.transAxes, ha="center", color="0.5")
    return figure


def draw_comparison(runs: list[RunCurves]):
    """Several runs: the peers' mean (solid) and the ensemble (dashed) per run, and each run's consistency."""
    import matplotlib

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    figure = new_figure(12, 4.5)
    acc, consistency = figure.subplots(1, 2)
    for i, curves in enumerate(runs):
        color = colors[i % len(colors)]
        scale = metric_scale(curves.metric)
        peers = [s for n, s in curves.test.items() if curves.kinds[n] == "peer"]
        if peers:
            mean = pd.concat(peers, axis=1).mean(axis=1)
            acc.plot(mean.index, scale * mean.to_numpy(), color=color, marker="o", markersize=3,
                     label=f"{curves.name}: peers' mean")
        if "ensemble" in curves.test:
            ensemble = curves.test["ensemble"]
            acc.plot(ensemble.index, scale * ensemble.to_numpy(), color=color, linestyle="--",
                     label=f"{curves.name}: ensemble")
        if curves.consistency is not None:
            consistency.plot(curves.consistency.index, curves.consistency.to_numpy(), color=color, marker="o",
                             markersize=3, label=curves.name)
    acc.set_ylabel(metric_label(runs[0].metric))
    acc.set_title("the runs on the test split")
    consistency.set_ylabel("mean pairwise KL between peers (nats)")
    consistency.set_title("the peers' consistency (validation split)")
    for axis in (acc, consistency):
        integer_epochs(axis)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return figure


def plot_runs(run_dirs: list, output: Path) -> list[Path]:
    """One figure per run (``output/<run>.png``, ``.svg``) and, for several runs, ``output/runs.png``."""
    require_matplotlib("raydistill plot")
    curves = [run_curves(run_dir) for run_dir in run_dirs]
    written, used = [], set()
    for run_dir, run in zip(run_dirs, curves):
        stem = Path(run_dir).resolve().name
        while stem in used:                       # two runs of one name from different folders
            stem += "_"
        used.add(stem)
        written += save(draw_run(run), output / stem)
    if len(curves) > 1:
        written += save(draw_comparison(curves), output / "runs")
    return written


# ---- a results directory: methods x seeds ----------------------------------------------------------------------------
@dataclasses.dataclass
class ResultsCurves:
    """Per method, epochs x seeds tables of the test metric: the peers' mean and the ensemble; ``draw_results``
    draws them and tests read them."""
    metric: str
    baseline: str | None
    peers: dict             # method -> DataFrame (index epoch, one column per seed)
    ensemble: dict          # method -> DataFrame, for methods whose runs have an ensemble


def results_curves(run_dirs: dict, metric: str) -> ResultsCurves:
    """run_dirs: {method: {seed: run directory}} of finished runs."""
    peers, ensemble = {}, {}
    for method, seeds in run_dirs.items():
        peer_columns, ensemble_columns = {}, {}
        for seed, run_dir in seeds.items():
            column = f"test_{metric}"
            metrics = pd.read_parquet(Path(run_dir) / "metrics.parquet", columns=["epoch", "kind", column])
            peer_columns[seed] = metrics[metrics["kind"] == "peer"].groupby("epoch")[column].mean()
            members = metrics[metrics["kind"] == "ensemble"]
            if len(members):
                ensemble_columns[seed] = members.set_index("epoch")[column]
        if peer_columns:
            peers[method] = pd.DataFrame(peer_columns).sort_index()
        if ensemble_columns:
            ensemble[method] = pd.DataFrame(ensemble_columns).sort_index()
    baseline = "independent" if "independent" in peers else next(iter(peers), None)
    return ResultsCurves(metric, baseline if len(peers) > 1 else None, peers, ensemble)


def paired_difference(curves: ResultsCurves, method: str) -> pd.DataFrame:
    """Seed by seed, the method's peers' mean minus the baseline's, per epoch (the seeds both have)."""
    own, base = curves.peers[method], curves.peers[curves.baseline]
    seeds = [s for s in own.columns if s in base.columns]
    return (own[seeds] - base[seeds]).dropna(how="all")


def ensemble_gap(curves: ResultsCurves, method: str) -> pd.DataFrame:
    """Seed by seed, the ensemble's test metric minus the peers' mean, per epoch."""
    own, peers = curves.ensemble[method], curves.peers[method]
    seeds = [s for s in own.columns if s in peers.columns]
    return (own[seeds] - peers[seeds]).dropna(how="all")


def band(axis, table: pd.DataFrame, label: str, color, scale: float) -> None:
    """The mean over the seeds (columns) and a band of one sample standard deviation where there are two seeds."""
    mean = scale * table.mean(axis=1)
    axis.plot(table.index, mean.to_numpy(), color=color, marker="o", markersize=3, label=label)
    if table.shape[1] > 1:
        std = scale * table.std(axis=1, ddof=1)
        axis.fill_between(table.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=color, alpha=0.2,
                          linewidth=0)


def draw_results(curves: ResultsCurves, output: Path, title: str) -> dict[str, list[Path]]:
    """``curves``, ``paired_difference`` (with a baseline) and ``ensemble_gap`` (with ensembles), PNG and SVG."""
    import matplotlib

    colors = dict(zip(curves.peers, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    scale = metric_scale(curves.metric)
    seeds = max(table.shape[1] for table in curves.peers.values())
    spread = "band: ± one standard deviation over the seeds" if seeds > 1 else "one seed: no band"
    points = "percentage points" if curves.metric == "acc" else "squared target units"
    written = {}

    figure = new_figure(7.5, 4.5)
    axis = figure.subplots()
    for method, table in curves.peers.items():
        band(axis, table, f"{method} ({table.shape[1]} seeds)", colors[method], scale)
    axis.set_ylabel(metric_label(curves.metric, "peers' mean test"))
    axis.set_title(f"{title}: the peers' mean per epoch\n({spread})", fontsize=10)
    written["curves"] = finish(figure, axis, output / "curves")

    if curves.baseline is not None:
        figure = new_figure(7.5, 4.5)
        axis = figure.subplots()
        axis.axhline(0, color="black", linewidth=0.8)
        for method in curves.peers:
            if method != curves.baseline:
                band(axis, paired_difference(curves, method), method, colors[method], scale)
        axis.set_ylabel(f"peers' mean − {curves.baseline} ({points})")
        axis.set_title(f"{title}: each method − {curves.baseline}, seed by seed\n({spread})", fontsize=10)
        written["paired_difference"] = finish(figure, axis, output / "paired_difference")

    if curves.ensemble:
        figure = new_figure(7.5, 4.5)
        axis = figure.subplots()
        axis.axhline(0, color="black", linewidth=0.8)
        for method in curves.ensemble:
            band(axis, ensemble_gap(curves, method), method, colors[method], scale)
        axis.set_ylabel(f"ensemble − peers' mean ({points})")
        axis.set_title(f"{title}: the ensemble's gain over its peers' mean\n({spread})", fontsize=10)
        written["ensemble_gap"] = finish(figure, axis, output / "ensemble_gap")
    return written


def finish(figure, axis, stem: Path) -> list[Path]:
    integer_epochs(axis)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save(figure, stem)
