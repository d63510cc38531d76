"""`raydistill results`: one setup, several methods x seeds, and the Markdown tables a results page quotes.

    raydistill results SETUP --methods independent,dml,kdcl,pcl,dkel --seeds 3 [--set KEY=VALUE] [--jobs N]
                       [--runtime inprocess|ray] [--output DIR]

SETUP is a preset or a YAML file: its data, models, peers and schedule are the setup; every method runs at its own
defaults (the setup's own ``method:`` block applies to its own method only). ``--set key=value`` changes every run,
``--set kdcl:method.ensemble=mean_probs`` only the runs of one method. Each run is ``raydistill.train(...)`` into
``DIR/<method>-s<seed>/``; ``--jobs N`` runs N of them at once, each in its own process. A run that already finished
in DIR with the same resolved config is kept, so an interrupted sweep continues where it stopped.

The tables (``DIR/results.md``, also printed; the figures in ``DIR/results.json``) give every figure as mean ± sample
standard deviation over the seeds, per model: each peer, each EMA teacher, the ensemble (mean of the peers'
probabilities) and the deployed model (``summary.json``'s ``deploy``), at the last epoch and at the best epoch.
The best epoch and the deployed model are chosen on the validation split, never on the test split: a setup without
one (``data.val_fraction: 0``) gets last-epoch figures only.

Beside the tables, with matplotlib installed (the ``plots`` extra), three figures as PNG and SVG, linked from
results.md: ``curves`` (the peers' mean test figure per epoch per method, mean over the seeds with a band of one
standard deviation), ``paired_difference`` (each method minus the baseline, seed by seed) and ``ensemble_gap`` (the
ensemble minus its peers' mean).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from raydistill.config import load_config, parse_override, raw_config
from raydistill.errors import ConfigError

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
TIMING_JSON = "timing.json"            # the wall time of the last command that trained, kept for --render
RUNTIMES = ("inprocess", "ray")
DEFAULT_METHODS = ("independent", "dml", "kdcl", "pcl", "dkel")


# ---- the plan: which runs, with which configs ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    overrides: tuple        # what turns the setup into this run (passed to raydistill.train)
    config: dict            # the resolved config, as config.yaml holds it

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"


def parse_methods(text: str) -> list[str]:
    from raydistill.methods import method_names

    methods = [m.strip() for m in text.split(",") if m.strip()]
    for method in methods:
        if method not in method_names():
            raise ConfigError("--methods", method, f"comma-separated names of: {', '.join(method_names())}")
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError("--methods", text, "one or more distinct method names, comma-separated")
    return methods


def parse_seeds(text: str) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``0,4,7`` -> those seeds."""
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError("--seeds", text, "a count N (seeds 0..N-1) or a comma-separated list of seeds") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError("--seeds", text, "distinct seeds >= 0")
    return seeds


def split_overrides(overrides: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``key=value`` for every run; ``method:key=value`` for the runs of that method only."""
    common, per_method = [], {m: [] for m in methods}
    for text in overrides:
        key = text.partition("=")[0]
        if ":" in key:
            method, _, rest = text.partition(":")
            if method not in per_method:
                raise ConfigError("--set", text, f"a method prefix among --methods ({', '.join(methods)})")
            per_method[method].append(rest)
        else:
            common.append(text)
    return common, per_method


def plan(setup: str, methods: list[str], seeds: list[int], overrides: list[str]) -> list[RunSpec]:
    """Every (method, seed) run with its resolved config; bad input fails here, before anything trains."""
    base = raw_config(setup)
    setup_name = base.get("name") or Path(str(setup)).stem
    own_method = base.get("method") or {}
    common, per_method = split_overrides(overrides, methods)
    specs = []
    for method in methods:
        # every method at its defaults; the setup's method block speaks for its own method only
        block = own_method if own_method.get("name") == method else {"name": method}
        for seed in seeds:
            run_overrides = (f"method={json.dumps(block)}", *common, *per_method[method], f"method.name={method}",
                             f"seed={seed}", f"name={setup_name}-{method}-s{seed}")
            config = load_config(setup, list(run_overrides))
            specs.append(RunSpec(method, seed, run_overrides, _plain(config.to_dict())))
    return specs


def _plain(mapping: dict) -> dict:
    """The config as config.yaml reads back (tuples as lists, ...), so that two runs compare equal."""
    return yaml.safe_load(yaml.safe_dump(mapping, sort_keys=False))


# ---- running --------------------------------------------------------------------------------------------------------
def prepare_run_dir(run_dir: Path, spec: RunSpec) -> bool:
    """True where the run must train. A finished run of the same config is kept; a run of another config refuses."""
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        existing = yaml.safe_load(config_file.read_text())
        if spec.config["data"].get("digest") is None and isinstance(existing.get("data"), dict):
            existing["data"]["digest"] = None       # a run fills it in: the digest of the set it read
        if existing != spec.config:
            changed = sorted(_differences(existing, spec.config))[:4]
            raise ConfigError("--output", str(run_dir.parent), f"holds {spec.name} of another configuration "
                              f"({', '.join(changed)} differ); choose a new directory")
    if (run_dir / "summary.json").is_file():
        return False
    if run_dir.exists():                       # interrupted: train it again from the start
        shutil.rmtree(run_dir)
    return True


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def train_one(job: tuple[str, tuple, str, str]) -> tuple[str, float, str | None]:
    """One run, in this process: (run name, seconds, error line or None). Top-level: a spawned worker calls it."""
    setup, overrides, run_dir, runtime = job
    import raydistill

    tic = time.perf_counter()
    try:
        raydistill.train(setup, run_dir, overrides=list(overrides), runtime=runtime, progress=False)
    except Exception as err:  # noqa: BLE001 — one failed run is reported, the others go on
        return Path(run_dir).name, time.perf_counter() - tic, f"{type(err).__name__}: {err}"
    return Path(run_dir).name, time.perf_counter() - tic, None


def run_all(setup: str, specs: list[RunSpec], output: Path, runtime: str, jobs: int, log=print) -> list[str]:
    """Trains what is not done yet; returns the error lines of the runs that failed."""
    todo = [(setup, spec.overrides, str(output / spec.name), runtime) for spec in specs
            if prepare_run_dir(output / spec.name, spec)]
    log(f"{len(specs) - len(todo)} of {len(specs)} runs already done in {output}; training {len(todo)}")
    errors = []

    def report(result):
        name, seconds, error = result
        log(f"{name}: {'FAILED ' + error if error else 'done'} ({seconds:.0f}s)")
        if error:
            errors.append(f"{name}: {error}")

    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            report(train_one(job))
    else:
        # spawn: a fresh process per run, with its own torch threads and no state shared with this one
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(todo)), maxtasksperchild=1) as pool:
            for result in pool.imap_unordered(train_one, todo):
                report(result)
    return errors


# ---- the tables ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Figure:
    """One model's figure over the seeds: the values (None where a run has no such figure)."""
    values: list

    def present(self) -> list[float]:
        return [v for v in self.values if v is not None]

    @property
    def mean(self) -> float | None:
        values = self.present()
        return statistics.mean(values) if values else None

    @property
    def std(self) -> float | None:
        values = self.present()
        return statistics.stdev(values) if len(values) > 1 else None


def chosen_on_test(deploy: dict) -> bool:
    """Whether a run chose its deployed model on the test split (older runs without a validation split did)."""
    return deploy.get("chosen_by", "").startswith("last-epoch test")


def model_figures(summary: dict, metric: str) -> dict[str, dict]:
    """Per model name: {"last", "best", "best_epoch"} test figures of one run, best only where chosen on validation."""
    has_val = any(p.get(f"best_val_{metric}") is not None for p in summary["peers"])
    entries = [(p.get("name", f"peer{p['index']}"), p) for p in summary["peers"]]
    entries += [(t["name"], t) for t in summary.get("ema_teachers", [])]
    ensemble = {k[len("ensemble_"):]: v for k, v in summary.items() if k.startswith("ensemble_")}
    if ensemble:
        entries.append(("ensemble", ensemble))
    figures = {name: {"last": entry.get(f"test_{metric}"),
                      "best": entry.get(f"test_{metric}_at_best_epoch") if has_val else None,
                      "best_epoch": entry.get("best_epoch") if has_val else None} for name, entry in entries}
    deploy = summary.get("deploy")
    if deploy and not chosen_on_test(deploy):
        figures["deployed"] = {**figures[deploy["name"]], "name": deploy["name"]}
    return figures


def collect(output: Path, specs: list[RunSpec], metric: str) -> dict:
    """{method: {"runs": [summary], "models": {model: {"last": Figure, "best": Figure, "best_epoch": Figure}}}}"""
    results = {}
    for method in dict.fromkeys(s.method for s in specs):
        done = [s for s in specs if s.method == method and (output / s.name / "summary.json").is_file()]
        runs = [json.loads((output / s.name / "summary.json").read_text()) for s in done]
        if not runs:
            continue
        per_run = [model_figures(summary, metric) for summary in runs]
        names = list(dict.fromkeys(name for figures in per_run for name in figures))
        models = {name: {key: Figure([f.get(name, {}).get(key) for f in per_run])
                         for key in ("last", "best", "best_epoch")} for name in names}
        deployed = [f["deployed"]["name"] for f in per_run if "deployed" in f]
        results[method] = {"runs": runs, "seeds": [s.seed for s in done], "models": models,
                           "deployed_names": deployed}
    return results


def fmt(figure: Figure, scale: float, digits: int) -> str:
    mean, std = figure.mean, figure.std
    if mean is None:
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def fmt_signed(figure: Figure, scale: float, digits: int) -> str:
    """A difference: its sign always shown."""
    if figure.mean is None:
        return "—"
    return ("+" if figure.mean >= 0 else "") + fmt(figure, scale, digits)


def group_mean(runs: list[dict], key: str, metric: str, figure: str) -> Figure:
    """Per run, the mean over a group of models (all peers, all EMA teachers); one value per seed."""
    field = f"test_{metric}" if figure == "last" else f"test_{metric}_at_best_epoch"
    values = []
    for summary in runs:
        group = summary.get(key) or []
        has_val = any(p.get(f"best_val_{metric}") is not None for p in summary["peers"])
        if not group or (figure == "best" and not has_val):
            values.append(None)
        else:
            values.append(statistics.mean(m[field] for m in group))
    return Figure(values)


def paired_differences(results: dict, metric: str, baseline: str, figure: str) -> dict[str, Figure]:
    """Per method, the difference of its peers' mean from the baseline's, seed by seed: runs of one seed share the
    peers' initial weights and the batches, so the pairing removes most of the seed-to-seed spread."""
    base = dict(zip(results[baseline]["seeds"], group_mean(results[baseline]["runs"], "peers", metric, figure).values))
    differences = {}
    for method, entry in results.items():
        if method == baseline:
            continue
        own = dict(zip(entry["seeds"], group_mean(entry["runs"], "peers", metric, figure).values))
        differences[method] = Figure([own[seed] - base[seed] for seed in sorted(set(own) & set(base))
                                      if own[seed] is not None and base[seed] is not None])
    return differences


def render(results: dict, metric: str, header: list[str]) -> str:
    scale, digits, unit = (100.0, 2, "test accuracy (%)") if metric == "acc" else (1.0, 3, f"test {metric}")
    lines = [*header, "",
             f"Every figure: {unit}, mean ± standard deviation over the seeds (sample std, n-1). \"last\": the "
             "model at the end of training; \"best\": the model at its epoch of best validation "
             f"{metric}. \"peers\" and \"EMA teachers\": the mean over a run's peers (EMA teachers), then over "
             "the seeds. \"deployed\": the model summary.json names for deployment (chosen on the last epoch's "
             "validation figure, as its chosen_by says). Nothing is chosen on the test split.", "",
             "| method | seeds | peers, last | peers, best | EMA teachers, last | EMA teachers, best | ensemble, last "
             "| ensemble, best | deployed, last | deployed, best | wall time per run (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, entry in results.items():
        runs, models = entry["runs"], entry["models"]
        cell = lambda name, key: fmt(models[name][key], scale, digits) if name in models else "—"  # noqa: E731
        wall = statistics.mean(s["wall_s"] for s in runs)
        lines.append("| " + " | ".join([
            method, str(len(runs)),
            fmt(group_mean(runs, "peers", metric, "last"), scale, digits),
            fmt(group_mean(runs, "peers", metric, "best"), scale, digits),
            fmt(group_mean(runs, "ema_teachers", metric, "last"), scale, digits),
            fmt(group_mean(runs, "ema_teachers", metric, "best"), scale, digits),
            cell("ensemble", "last"), cell("ensemble", "best"), cell("deployed", "last"), cell("deployed", "best"),
            f"{wall:.0f}" if wall >= 10 else f"{wall:.1f}"]) + " |")
    baseline = "independent" if "independent" in results else next(iter(results), None)
    if baseline is not None and len(results) > 1:
        last = paired_differences(results, metric, baseline, "last")
        best = paired_differences(results, metric, baseline, "best")
        lines += ["", f"Against {baseline}, seed by seed (the same seed gives the same initial weights and batches): "
                  f"the difference of the peers' mean {unit}, mean ± standard deviation over the paired seeds.", "",
                  f"| method | peers − {baseline}, last | peers − {baseline}, best | paired seeds |",
                  "|---|---|---|---|"]
        for method in last:
            lines.append(f"| {method} | {fmt_signed(last[method], scale, digits)} | "
                         f"{fmt_signed(best[method], scale, digits)} | "
                         f"{len(last[method].present())} |")
    lines += ["", "| method | model | last epoch | best epoch (by validation) | best epoch, mean | seeds |",
              "|---|---|---|---|---|---|"]
    for method, entry in results.items():
        for name, figure in entry["models"].items():
            epoch = figure["best_epoch"].mean
            label = name
            if name == "deployed":
                chosen = sorted(set(entry["deployed_names"]))
                label = f"deployed ({', '.join(chosen)})"
            lines.append(f"| {method} | {label} | {fmt(figure['last'], scale, digits)} | "
                         f"{fmt(figure['best'], scale, digits)} | {'—' if epoch is None else f'{epoch:.1f}'} | "
                         f"{len(figure['last'].present())} |")
    return "\n".join(lines) + "\n"


def as_json(results: dict) -> dict:
    return {method: {"seeds": len(entry["runs"]),
                     "models": {name: {key: {"values": f.values, "mean": f.mean, "std": f.std}
                                       for key, f in figure.items()} for name, figure in entry["models"].items()}}
            for method, entry in results.items()}


# ---- the figures ----------------------------------------------------------------------------------------------------
FIGURE_CAPTIONS = {
    "curves": "the peers' mean test figure per epoch, per method (mean over the seeds; band: ± one standard deviation)",
    "paired_difference": "each method's peers' mean minus the baseline's, seed by seed, per epoch (mean and band "
                         "over the paired seeds)",
    "ensemble_gap": "the ensemble's test figure minus its peers' mean, per epoch (mean and band over the seeds)",
}


def write_figures(output: Path, specs: list[RunSpec], metric: str, title: str) -> tuple[dict, str | None]:
    """The figures beside the tables ({name: [png, svg]}), or why there are none (one line)."""
    from raydistill import plots

    if not plots.have_matplotlib():
        return {}, f"figures skipped: matplotlib is not installed ({plots.MATPLOTLIB_MISSING})"
    run_dirs = {}
    for spec in specs:
        if (output / spec.name / "summary.json").is_file():
            run_dirs.setdefault(spec.method, {})[spec.seed] = output / spec.name
    if not run_dirs:
        return {}, "figures skipped: no finished run"
    return plots.draw_results(plots.results_curves(run_dirs, metric), output, title), None


def figures_section(figures: dict, skipped: str | None) -> str:
    if skipped:
        return f"\n{skipped}\n"
    lines = ["", "## Figures", ""]
    for name, paths in figures.items():
        lines += [f"![{FIGURE_CAPTIONS[name]}]({paths[0].name})", "", f"{FIGURE_CAPTIONS[name]} "
                  f"([SVG]({paths[1].name})).", ""]
    return "\n".join(lines)


# ---- the header: what ran, where, how --------------------------------------------------------------------------------
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.machine()}")


def describe_setup(config: dict) -> str:
    data, train, peers = config["data"], config["train"], config["peers"]
    archs = sorted({p["arch"] for p in peers})
    schedule = train["schedule"]
    if schedule == "step":
        schedule += f" (x{train['gamma']} at {train['milestones']})"
    if schedule == "onecycle":
        schedule += f" (pct_start {train['pct_start']})"
    if train.get("warmup_epochs"):
        schedule += f", {train['warmup_epochs']} warm-up epochs"
    augment = (f"crop pad {data['crop_pad']} ({data['pad_mode']}), flip {str(data['flip']).lower()}"
               if data.get("crop_pad") or data.get("flip") else "no augmentation")
    epochs = f"{train['epochs']} epoch" + ("s" if train["epochs"] != 1 else "")
    return (f"{data['name']} (validation fraction {data['val_fraction']}), {len(peers)} x {', '.join(archs)}, "
            f"{epochs}, batch {train['batch_size']}, {train['optimizer']} lr {train['lr']}, "
            f"{schedule}, weight decay {train['weight_decay']}; {augment}; bf16 {str(train['bf16']).lower()}")


def describe_methods(specs: list[RunSpec]) -> list[str]:
    lines, seen = [], set()
    for spec in specs:
        if spec.method in seen:
            continue
        seen.add(spec.method)
        m = spec.config["method"]
        keys = [k for k, v in m.items() if k != "name" and v is not None and k not in ("features",)]
        lines.append(f"  - {spec.method}: " + ", ".join(f"{k} {m[k]}" for k in keys))
    return lines


def command_line(args) -> str:
    parts = ["raydistill", "results", args.setup, "--methods", ",".join(args.methods_list),
             "--seeds", args.seeds]
    for override in args.overrides:
        parts += ["--set", override]
    parts += ["--jobs", str(args.jobs), "--runtime", args.runtime, "--output", args.output]
    return " ".join(shlex.quote(p) for p in parts)


# ---- the command --------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("results", help="run methods x seeds on one setup and write the results tables")
    parser.add_argument("setup", help="a preset name or a YAML file: data, models, peers and schedule of every run")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1, default 3) or a list such as 0,4,7")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="override a config key of every run, or of one method's runs with METHOD: (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    parser.add_argument("--runtime", default="inprocess", choices=RUNTIMES,
                        help="inprocess (default: every peer of a run in its process) or ray")
    parser.add_argument("--output", "-o", help="the results directory (default: runs/results-SETUP-TIMESTAMP)")
    parser.add_argument("--render", action="store_true", help="only write the tables of the runs already in --output")
    return parser


def run(args) -> int:
    args.methods_list = parse_methods(args.methods)
    seeds = parse_seeds(str(args.seeds))
    if args.jobs < 1:
        raise ConfigError("--jobs", args.jobs, "an integer >= 1")
    if args.runtime == "ray" and args.jobs > 1:
        raise ConfigError("--jobs", args.jobs, "1 with --runtime ray (Ray places one run's peers); several runs at "
                          "once with --runtime inprocess")
    for override in args.overrides:
        parse_override(override)               # the one-line error for a malformed --set, before any run
    specs = plan(args.setup, args.methods_list, seeds, args.overrides)
    if args.output is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.output = str(Path("runs") / f"results-{Path(str(args.setup)).stem}-{stamp}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    errors = [] if args.render else run_all(args.setup, specs, output, args.runtime, args.jobs)
    elapsed = time.perf_counter() - tic
    metric = "mse" if specs[0].config["task"] == "regression" else "acc"
    results = collect(output, specs, metric)
    header = [f"# {Path(str(args.setup)).stem}: {', '.join(args.methods_list)} x {len(seeds)} seeds", "",
              "```bash", command_line(args), "```", "",
              f"- Machine: {machine()}; runtime {args.runtime}, {args.jobs} run(s) at once.",
              f"- Setup: {describe_setup(specs[0].config)}.",
              "- Methods, as resolved:", *describe_methods(specs)]
    if not args.render:
        (output / TIMING_JSON).write_text(json.dumps({"minutes": elapsed / 60, "runs": len(specs)}))
    if (output / TIMING_JSON).is_file():
        timing = json.loads((output / TIMING_JSON).read_text())
        header.append(f"- Wall time of the command that trained: {timing['minutes']:.1f} min for {timing['runs']} "
                      "runs (runs kept from an earlier command not counted).")
    figures, skipped = write_figures(output, specs, metric, Path(str(args.setup)).stem)
    table = render(results, metric, header) + figures_section(figures, skipped)
    (output / RESULTS_MD).write_text(table)
    (output / RESULTS_JSON).write_text(json.dumps(as_json(results), indent=2))
    print(table)
    print(f"tables: {output / RESULTS_MD}")
    if figures:
        print(f"figures: {', '.join(str(paths[0]) for paths in figures.values())} (and .svg)")
    if skipped:
        print(f"raydistill: {skipped}")
    if errors:
        for line in errors:
            print(f"raydistill: run failed: {line}")
        return 1
    missing = [s.name for s in specs if not (output / s.name / "summary.json").is_file()]
    if missing:
        print(f"raydistill: no summary yet for {', '.join(missing)}")
        return 1
    return 0


def main(argv=None) -> int:
    """``python -m raydistill.results``: the same command without the raydistill CLI."""
    parser = argparse.ArgumentParser(prog="raydistill")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["results", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    raise SystemExit(main())
