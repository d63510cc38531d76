"""The shells of the commands that read finished runs (``plot``, ``report``, ``export``) and prepare data sets
(``data``). Arguments in, the work imported only when a command runs (matplotlib, pandas and torch cost seconds; ``raydistill presets`` needs none)."""
from __future__ import annotations

import datetime
from pathlib import Path


def add_parsers(subparsers) -> None:
    plot = subparsers.add_parser("plot", help="figures of run directories (PNG and SVG) from their metrics.parquet")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    plot.add_argument("--output", "-o", help="folder for the figures (default: RUN/plots for one run, "
                                             "runs/plots-TIMESTAMP for several)")

    report = subparsers.add_parser("report", help="one self-contained HTML page of a run: config, table, figures, "
                                                  "events, machine, command")
    report.add_argument("run", metavar="RUN", help="a run directory")
    report.add_argument("--output", "-o", help="the HTML file (default: RUN/report.html)")

    export = subparsers.add_parser("export", help="a run's model as one ONNX, torch.export (pt2) or state dict file, "
                                                  "checked against load_model")
    export.add_argument("run", metavar="RUN", help="a finished run directory")
    export.add_argument("--model", default="deploy", metavar="deploy|peerK|peerK_ema|ensemble",
                        help="deploy (default: the model summary.json names), a peer, an EMA teacher, or the "
                             "ensemble of the peers as one graph")
    export.add_argument("--format", required=True, dest="fmt", metavar="onnx|pt2|state_dict",
                        help="onnx (onnxruntime), pt2 (torch.export) or state_dict (weights and what rebuilds them)")
    export.add_argument("--output", "-o", required=True, help="the file to write")
    export.add_argument("--batch", default="dynamic", help="dynamic (the default: any batch size) or a fixed size")


def cmd_plot(args) -> int:
    from raydistill.errors import ConfigError
    from raydistill.plots import plot_runs

    for run_dir in args.runs:
        if not Path(run_dir).is_dir():
            raise ConfigError("RUN", run_dir, "a run directory (raydistill train --output DIR)")
    if args.output is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.output = str(Path(args.runs[0]) / "plots") if len(args.runs) == 1 else f"runs/plots-{stamp}"
    for path in plot_runs(args.runs, Path(args.output)):
        print(path)
    return 0


def cmd_report(args) -> int:
    from raydistill.report import write_report

    print(write_report(args.run, args.output, command=["raydistill", "report", args.run]
                       + (["--output", args.output] if args.output else [])))
    return 0


def cmd_export(args) -> int:
    from raydistill.export_formats import ATOL, RTOL, export, parse_batch

    result = export(args.run, args.output, args.fmt, args.model, parse_batch(args.batch))
    meta, checked = result.metadata, result.check
    print(f"wrote {result.path} ({result.format}, {meta['model']}, batch {meta['batch']}): "
          f"{meta['input']['name']} {meta['input']['shape']} -> {meta['output']['meaning']}")
    agree = "" if checked.same_argmax is None else "; the same class for every input"
    print(f"check: batches of {' and '.join(map(str, checked.batches))} from {checked.source}: largest difference "
          f"from load_model {checked.max_abs:.2g} (allowed {ATOL:g} + {RTOL:g}·|expected|){agree}")
    return 0




def cmd_data(args) -> int:
    """``raydistill data prepare|verify`` (arguments in cli.py); ``--address``: the decoding on Ray tasks of that
    cluster's nodes."""
    import sys

    from raydistill.data.prepare import Progress, prepare, run_task, verify
    from raydistill.errors import ConfigError

    if args.data_command == "verify":
        index = verify(args.dest)
        print(f"{args.dest}: every file matches its index (train {index['splits']['train']['count']:,}, test "
              f"{index['splits']['test']['count']:,} images; digest {index['digest']})")
        return 0
    if not args.shard_mb > 0:
        raise ConfigError("--shard-mb", args.shard_mb, "a number of MiB > 0")
    try:
        tasks = None
        if args.address:
            from raydistill.runtime.tasks import RayTasks

            tasks = RayTasks(args.address, run_task, args.workers)
        prepare(args.source, args.dest, size=args.size, workers=args.workers, tasks=tasks, root=args.root,
                download=args.download, val_labels=args.val_labels, view=args.view,
                shard_bytes=int(args.shard_mb * 2**20),
                progress=Progress(lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print("raydistill: prepare stopped; the shards written are kept: run the same command to resume",
              file=sys.stderr)
        raise
    return 0


HANDLERS = {"plot": cmd_plot, "report": cmd_report, "export": cmd_export, "data": cmd_data}
