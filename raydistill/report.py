"""`raydistill report RUN`: a run directory as one self-contained HTML page (figures inlined, no external file, no
script): the final table, the figures of ``raydistill plot``, restarts, rollbacks and peer changes, the exported
models, the resolved config, the machine and the command. The page a paper's appendix or a pull request quotes.
No Ray.

What the run directory does not record, the page says it does not know: the command that started the run (the page
gives the one that repeats it from the resolved config) and the machine beyond the host name in TensorBoard's event
file names and the nodes ``summary.json`` lists.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
import shlex
from pathlib import Path

import yaml

from raydistill.engine.evaluation import primary_metric
from raydistill.engine.manifest import class_names, manifest_path
from raydistill.errors import ConfigError

REPORT = "report.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1.5em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
.lead { color: #444; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.deployed td { background: #eef6ee; font-weight: 600; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; }
.none { color: #666; font-style: italic; }
.stopped { color: #a00; font-weight: 600; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def table(header: list, rows: list, numeric: set = frozenset(), row_class=None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class(i)}"' if row_class and row_class(i) else ""
        cells = "".join(f'<td class="num">{esc(c)}</td>' if j in numeric else f"<td>{esc(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def number(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ---- the sections ---------------------------------------------------------------------------------------------------
def model_rows(summary: dict, metric: str) -> list[tuple]:
    """Every model of the run with its last-epoch and best-epoch figures, as the console's final table."""
    entries = [(p.get("name", f"peer{p['index']}"), "peer", p) for p in summary.get("peers", [])]
    entries += [(t["name"], "EMA teacher", t) for t in summary.get("ema_teachers", [])]
    entries += [(t.get("name", f"teacher{t['index']}"), "teacher", t) for t in summary.get("teachers", [])]
    if f"ensemble_test_{metric}" in summary:
        entries.append(("ensemble", "mean of the peers' probabilities" if metric == "acc" else "mean of the peers",
                        {k[len("ensemble_"):]: v for k, v in summary.items() if k.startswith("ensemble_")}))
    rows = []
    for name, kind, entry in entries:
        if entry.get("removed_at_epoch") is not None:
            name = f"{name} (removed after epoch {entry['removed_at_epoch']})"
        rows.append((name, kind, entry.get("arch", "—"), number(entry.get(f"val_{metric}")),
                     number(entry.get(f"best_val_{metric}")), number(entry.get("best_epoch")),
                     number(entry.get(f"test_{metric}")), number(entry.get(f"test_{metric}_at_best_epoch"))))
    return rows


def final_section(summary: dict, metric: str) -> str:
    rows = model_rows(summary, metric)
    deploy = summary.get("deploy") or {}
    deployed = [i for i, row in enumerate(rows) if row[0] == deploy.get("name")]
    text = table(["model", "kind", "arch", f"val {metric}", f"best val {metric}", "best epoch (by val)",
                  f"test {metric}", f"test {metric} at best epoch"], rows, numeric={3, 4, 5, 6, 7},
                 row_class=lambda i: "deployed" if i in deployed else "")
    notes = []
    if deploy:
        notes.append(f"Deployed model: <b>{esc(deploy['name'])}</b> (chosen by {esc(deploy.get('chosen_by', '?'))}).")
    if summary.get("selection") is None and summary.get("peers"):
        notes.append("No validation split: no best epoch is chosen, and the test split chooses nothing.")
    notes.append(f"Last epoch = the model at the end of training; best epoch = its epoch of best validation {metric}.")
    return text + "".join(f"<p>{n}</p>" for n in notes)


def events_section(summary: dict) -> str:
    parts = [f"<p>Restarts of a lost worker: <b>{esc(summary.get('restarts', 0))}</b>, steps redone: "
             f"<b>{esc(summary.get('steps_redone', 0))}</b>.</p>"]
    events = (summary.get("rollbacks") or {}).get("events", [])
    if events:
        parts.append(table(["rollback", "at epoch", "rule", "back to (epochs kept)", "reason"],
                           [(i + 1, e["epoch"], e["rule"], e["back_to"], e["reason"]) for i, e in enumerate(events)],
                           numeric={0, 1, 3}))
    else:
        parts.append('<p class="none">No health rollback.</p>')
    changes = summary.get("peer_changes", [])
    if changes:
        parts.append(table(["after epoch", "change", "peer", "arch", "init"],
                           [(c["epoch"], c["action"], c["peer"], c.get("arch", "—"), c.get("init", "—"))
                            for c in changes], numeric={0}))
    else:
        parts.append('<p class="none">No peer added or removed.</p>')
    stopped = summary.get("stopped")
    if stopped:
        parts.append(f'<p class="stopped">Stopped at epoch {esc(stopped["epoch"])} by {esc(stopped["rule"])}: '
                     f'{esc(stopped["reason"])}</p>')
    return "".join(parts)


def exports_section(run_dir: Path) -> str:
    if not manifest_path(run_dir).is_file():
        return '<p class="none">No export/ folder: the run has not finished.</p>'
    manifest = json.loads(manifest_path(run_dir).read_text())
    rows = [(name, entry["kind"], entry["arch"], json.dumps(entry.get("options", {})), f"export/{entry['file']}")
            for name, entry in manifest["models"].items()]
    names = class_names(manifest["spec"])
    spec = manifest["spec"]
    return (table(["model", "kind", "arch", "options", "file"], rows) +
            f"<p>Input {esc(tuple(spec['input_shape']))}, normalization inside the model (mean "
            f"{esc([round(m, 4) for m in spec['mean']])}, std {esc([round(s, 4) for s in spec['std']])}); "
            f"class names: {esc(', '.join(names)) if names else 'not known to the data source'}.</p>"
            f"<p>Load one without Ray: <code>raydistill.load_model(RUN, name=...)</code>; ship one as a file: "
            f"<code>raydistill export RUN --model deploy|peerK|peerK_ema|ensemble --format onnx|pt2|state_dict "
            f"--output FILE</code>.</p>")


def figure_section(run_dir: Path) -> str:
    from raydistill.plots import draw_run, have_matplotlib, png_bytes, run_curves

    if not have_matplotlib():
        return '<p class="none">No figures: matplotlib is not installed (pip install \'raydistill[plots]\').</p>'
    data = base64.b64encode(png_bytes(draw_run(run_curves(run_dir)))).decode("ascii")
    return (f'<img alt="the run\'s curves per epoch" src="data:image/png;base64,{data}">'
            "<p>Test figures per epoch of every model, each peer's training loss, the peers' consistency, the "
            "distillation weights, the temperature and the learning rates; rollbacks and peer changes are the "
            "vertical lines.</p>")


def trained_on(run_dir: Path, summary: dict) -> list[str]:
    """What the run directory says of where it trained: TensorBoard's event file names carry the host and the start
    time; summary.json the runtime, the transport and the nodes."""
    lines = []
    events = sorted((run_dir / "tb").glob("events.out.tfevents.*")) if (run_dir / "tb").is_dir() else []
    if events:
        first = events[0].name.split(".")      # events.out.tfevents.<seconds>.<host>.<pid>.<n>
        started = datetime.datetime.fromtimestamp(int(first[3])).strftime("%Y-%m-%d %H:%M")
        lines.append(f"host {'.'.join(first[4:-2])} (the driver; started {started})")
    if summary:
        nodes = sorted(set(summary.get("worker_nodes") or []))
        lines.append(f"runtime {summary.get('runtime', '?')}, transport {summary.get('transport', '?')}, "
                     f"worker nodes: {', '.join(nodes) if nodes else '—'}")
        if summary.get("wall_s") is not None:
            done = summary.get("epochs_completed", 0)
            lines.append(f"{done} epoch{'' if done == 1 else 's'} in {summary['wall_s']:.1f} s, "
                         f"{summary.get('train_samples_per_s', 0):.0f} training samples/s")
    return lines


def machine_section(run_dir: Path, summary: dict, config_file: Path, command: list[str] | None) -> str:
    from raydistill.results import machine

    runtime = summary.get("runtime", "ray")
    again = ["raydistill", "train", str(config_file), "--output", "NEW_DIR"] + (
        ["--runtime", "inprocess"] if runtime == "inprocess" else [])
    trained = "".join(f"<li>{esc(line)}</li>" for line in trained_on(run_dir, summary))
    made = shlex.join(command) if command else "raydistill.report.write_report(...)"
    return (f"<p>Trained on:</p><ul>{trained or '<li>not recorded</li>'}</ul>"
            "<p>The command that started the run is not recorded in its directory; this one trains it again from "
            f"its resolved config (every default filled in):</p><pre>{esc(shlex.join(again))}</pre>"
            f"<p>This page was made on {esc(machine())} by</p><pre>{esc(made)}</pre>")


# ---- the page -------------------------------------------------------------------------------------------------------
def render(run_dir, command: list[str] | None = None) -> str:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file() or not (run_dir / "metrics.parquet").is_file():
        raise ConfigError("RUN", str(run_dir), "is not a run directory with epochs recorded (config.yaml and "
                          "metrics.parquet)")
    config_text = config_file.read_text()
    config = yaml.safe_load(config_text)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    metric = primary_metric(config.get("task", "classification"))[0]
    name = summary.get("name") or config.get("name") or run_dir.name
    method, dataset = config["method"]["name"], config["data"]["name"]
    status = (f"{summary['epochs_completed']} of {summary['epochs']} epochs" if summary
              else "no summary.json yet (the run has not finished an epoch's summary)")
    if summary.get("stopped"):
        status += f", stopped by {summary['stopped']['rule']}"
    final = final_section(summary, metric) if summary else '<p class="none">No summary.json yet.</p>'
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    from raydistill import __version__

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(name)}: raydistill report</title><style>{STYLE}</style></head>
<body>
<h1>{esc(name)}</h1>
<p class="lead">{esc(method)} on {esc(dataset)}, {esc(len(config.get('peers') or []))} peer(s), task
{esc(config.get('task', 'classification'))}: {esc(status)}. Run directory <code>{esc(run_dir.resolve().name)}</code>;
report made {esc(made)} by raydistill {esc(__version__)}.</p>
<h2>Final figures</h2>
{final}
<h2>Curves</h2>
{figure_section(run_dir)}
<h2>Restarts, rollbacks and peer changes</h2>
{events_section(summary)}
<h2>Exported models</h2>
{exports_section(run_dir)}
<h2>Machine and command</h2>
{machine_section(run_dir, summary, config_file, command)}
<h2>Config (resolved)</h2>
<pre>{esc(config_text)}</pre>
</body></html>
"""


def write_report(run_dir, output=None, command: list[str] | None = None) -> Path:
    """Writes the page (to a temporary name, then renamed); returns its path (default RUN/report.html)."""
    page = render(run_dir, command)
    output = Path(output) if output is not None else Path(run_dir) / REPORT
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    return output
