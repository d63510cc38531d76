"""The shell: parses arguments, builds a config, calls the Python API, prints. Nothing else lives here."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from raydistill.errors import report_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydistill", description="Distributed peer training by distillation on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a run (default: DML with 3 peers on digits)")
    train.add_argument("config", nargs="?", help="a preset name, a YAML file, or a best.json (default: dml-digits)")
    train.add_argument("--output", "-o", help="run directory (default: runs/NAME-TIMESTAMP)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set method.temperature=3 (repeatable)")
    train.add_argument("--runtime", default="ray", choices=("ray", "inprocess"),
                       help="ray: one actor per peer (default); inprocess: everything in this process (the reference)")
    train.add_argument("--resume", metavar="DIR", help="continue a run directory from its last checkpoint")
    train.add_argument("--address", help="connect to this Ray cluster (auto, ray://host:10001); sets resources.address")
    train.add_argument("--stop-after-epoch", type=int, metavar="N", help="stop (with a checkpoint) after N epochs")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.add_argument("--verbose", action="store_true", help="show Ray's own log lines (else in DIR/ray.log)")

    peers = commands.add_parser("peers", help="add or remove a peer of a running run (at its next epoch boundary)")
    peer_commands = peers.add_subparsers(dest="peers_command", required=True)
    add = peer_commands.add_parser("add", help="add a peer to a running run")
    add.add_argument("run", help="the run directory, or a run name under runs/")
    add.add_argument("--arch", help="the new peer's architecture (default: the run's model.arch)")
    add.add_argument("--init", default="scratch", metavar="scratch|ensemble|peer:K",
                     help="scratch (default); ensemble: distilled toward the current ensemble for a few steps; "
                          "peer:K: a copy of peerK")
    add.add_argument("--ranks", type=int, help="the new peer's data-parallel ranks (default: resources.ranks_per_peer)")
    add.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the run's answer (120)")
    remove = peer_commands.add_parser("remove", help="remove a peer from a running run (its records stay)")
    remove.add_argument("run", help="the run directory, or a run name under runs/")
    remove.add_argument("--peer", type=int, required=True, metavar="K", help="the peer to remove: peerK")
    remove.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the run's answer (120)")

    evaluate = commands.add_parser("eval", help="accuracy of every exported model of a run on its test split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", help="another data set name")
    evaluate.add_argument("--data-root", help="its root folder")

    tune = commands.add_parser("tune", help="search hyper-parameters with Ray Tune; each trial is one whole run")
    tune.add_argument("config", nargs="?", help="a preset name or a YAML file (default: dml-digits)")
    tune.add_argument("--space", help="a search space YAML, e.g. tune_spaces/dml.yaml")
    tune.add_argument("--samples", type=int, help="trials to sample (a grid is repeated this many times; default 4)")
    tune.add_argument("--output", "-o", help="experiment directory (default: runs/tune-NAME-TIMESTAMP)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key of every trial, e.g. --set train.epochs=10 (repeatable)")
    tune.add_argument("--scheduler", choices=("asha", "pbt"), help="over the space's own (default there: asha)")
    tune.add_argument("--resume", metavar="DIR", help="continue an interrupted experiment directory")
    tune.add_argument("--max-concurrent", type=int, metavar="N",
                      help="trials at once (default: as many whole runs as the cluster holds)")
    tune.add_argument("--address", help="connect to this Ray cluster (auto, ray://host:10001); sets resources.address")
    tune.add_argument("--quiet", action="store_true", help="no progress table")

    commands.add_parser("presets", help="list the built-in presets")

    data = commands.add_parser("data", help="prepare an image data set once, to train from memory maps")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="decode an image folder or a source once into a prepared set "
                                                       "(resumes an unfinished one)")
    prepare.add_argument("source", metavar="SOURCE", help="an image folder (train/<class>/ and val/: ImageNet, "
                                                          "TinyImageNet) or a source: cifar10, cifar100, digits, synthetic")
    prepare.add_argument("dest", metavar="DEST", help="the prepared set's folder")
    prepare.add_argument("--size", type=int, help="side S of the stored S x S images (default: 128 for a folder, a "
                                                  "source's own size)")
    prepare.add_argument("--workers", type=int, help="decoding processes (default: one per core)")
    prepare.add_argument("--address", help="decode with Ray tasks on this cluster's nodes (auto, ray://host:10001); "
                                           "SOURCE must be at the same path on every node")
    prepare.add_argument("--val-labels", metavar="FILE", help="the labels of a flat val/ folder: ImageNet's "
                                                              "LOC_val_solution.csv, or lines 'FILE CLASS'")
    prepare.add_argument("--view", metavar="random-resized-crop|crop-pad=N",
                         help="the views the set trains with (default: random-resized-crop for a folder, a source's "
                              "own crop-pad)")
    prepare.add_argument("--root", help="a source's data root (cifar10's python batches, ...)")
    prepare.add_argument("--download", action="store_true", help="fetch a source's files into --root first")
    prepare.add_argument("--shard-mb", type=float, default=1024.0, help="MiB of images per file (default 1024)")
    verify = data_commands.add_parser("verify", help="read every file of a prepared set and check it against its index")
    verify.add_argument("dest", metavar="DEST")

    from raydistill import results, run_commands
    from raydistill.bench import runtimes

    runtimes.add_arguments(commands.add_parser("bench", help="per-step time of every runtime and transport, side by "
                                                              "side"))
    results.add_parser(commands)
    run_commands.add_parsers(commands)

    cluster = commands.add_parser("cluster", help="cluster YAML tools")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    check = cluster_commands.add_parser("check", help="validate cluster YAMLs offline, the way Ray does")
    check.add_argument("files", nargs="+")
    return parser


def cmd_train(args) -> int:
    from raydistill.runtime.launch import train

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"resources.address={args.address}")
    result = train(args.config, args.output, overrides=overrides, runtime=args.runtime, resume=args.resume,
                   stop_after_epoch=args.stop_after_epoch, progress=not args.quiet, verbose=args.verbose)
    print(f"summary: {result.run_dir / 'summary.json'}")
    return 0


def cmd_peers(args) -> int:
    """Writes a control request into a running run's directory and prints the run's answer."""
    from pathlib import Path

    from raydistill.errors import ConfigError
    from raydistill.runtime import control

    run_dir = Path(args.run)
    if not run_dir.is_dir() and (Path("runs") / args.run).is_dir():
        run_dir = Path("runs") / args.run
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("RUN", args.run, "is not a run directory (nor a run name under runs/)")
    if not control.running(run_dir):
        raise ConfigError("RUN", args.run, "shows no running run; change a stopped run's peers with "
                          f"raydistill train --resume {run_dir} --set peers=...")
    if args.peers_command == "add":
        request = {"action": "add", "arch": args.arch, "init": args.init, "ranks": args.ranks}
    else:
        request = {"action": "remove", "peer": args.peer}
    path = control.submit(run_dir, request)
    answer = control.wait_answer(path, args.timeout)
    if answer is None and control.withdraw(path):
        print(f"raydistill: the run did not answer within {args.timeout:g}s (it answers at its next epoch "
              "boundary); the request was withdrawn", file=sys.stderr)
        return 1
    answer = answer or control.wait_answer(path, args.timeout)      # taken: the change is under way
    if answer is None:
        print(f"raydistill: the run took the request but has not answered within {2 * args.timeout:g}s; its "
              f"answer will be {path.with_suffix('.done')} or .refused", file=sys.stderr)
        return 1
    outcome, message = answer
    if outcome == "refused":
        print(f"raydistill: {message}", file=sys.stderr)
        return 1
    print(message)
    return 0


def cmd_tune(args) -> int:
    from raydistill.tune import tune

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"resources.address={args.address}")
    best = tune(args.config, args.space, samples=args.samples, output=args.output, overrides=overrides,
                scheduler=args.scheduler, resume=args.resume, max_concurrent=args.max_concurrent,
                progress=not args.quiet)
    print(f"best {best['metric']} {best['value']:.4f}: trial {best['trial']} ({best['run_dir']})")
    for key, value in best["params"].items():
        print(f"  {key} = {value}")
    experiment = best["experiment"]
    print(f"best config: {experiment}/best.json (retrain: raydistill train {experiment}/best.json); "
          f"all trials: {experiment}/trials.parquet; curves: tensorboard --logdir {experiment}/trials")
    if not best["complete"]:
        statuses = best["statuses"]
        counts = ", ".join(f"{count} {status}" for status, count in statuses.items())
        if best["errors"]:
            (trial, error), *others = best["errors"].items()
            more = f", and {len(others)} other trial(s) ({experiment}/<trial>/error.txt)" if others else ""
            print(f"raydistill: trial {trial} failed: {error} ({experiment}/{trial}/error.txt){more}; the search "
                  f"did not finish ({counts}); continue with raydistill tune --resume {experiment} (a failed trial "
                  "runs again from its last checkpoint)", file=sys.stderr)
            return 1
        if "out of time" in statuses:
            print(f"raydistill: the search's time_budget_s ran out ({counts})", file=sys.stderr)
            return 1
        print(f"interrupted ({counts}): continue with raydistill tune --resume {experiment}", file=sys.stderr)
        return 130
    return 0


def cmd_eval(args) -> int:
    from raydistill.evaluate import evaluate_run

    for name, figures in evaluate_run(args.run_dir, args.data, args.data_root).items():
        print(f"{name:<12} " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    return 0


def cmd_presets(args) -> int:
    from raydistill.config import preset_description, preset_names

    import shutil
    import textwrap

    width = max(60, min(shutil.get_terminal_size().columns, 120))
    for name in preset_names():   # never break inside a word: scikit-learn, paths and commands stay whole
        print(textwrap.fill(preset_description(name), width=width, initial_indent=f"{name:<22} ",
                            subsequent_indent=" " * 23, break_on_hyphens=False, break_long_words=False))
    return 0


def cmd_bench(args) -> int:
    from raydistill.bench.runtimes import run

    return run(args)


def cmd_results(args) -> int:
    from raydistill.results import run

    return run(args)


def cmd_cluster(args) -> int:
    from raydistill.cluster import main_check

    return max(main_check(path) for path in args.files)


def _on_sigterm(signum, frame):
    from raydistill.errors import Terminated

    raise Terminated


def main(argv=None) -> int:
    from raydistill import run_commands

    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():   # SIGTERM stops a command as Ctrl-C does
        signal.signal(signal.SIGTERM, _on_sigterm)
    handler = {"bench": cmd_bench, "train": cmd_train, "tune": cmd_tune, "eval": cmd_eval, "presets": cmd_presets,
               "cluster": cmd_cluster, "results": cmd_results, "peers": cmd_peers,
               **run_commands.HANDLERS}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt as interrupt:
        from raydistill.runtime.interrupts import terminated

        if terminated(interrupt):
            print("raydistill: stopped by SIGTERM", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(143)          # no exit handlers: Ray's would wait on a cluster that may have had SIGTERM too
        print("raydistill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # `raydistill presets | head`: the reader has gone; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:  # noqa: BLE001 — one line; the run directory keeps what was done
        from raydistill.policies.failures import TrainingError   # a training failure's line says what to do

        return report_error(err, explained=(TrainingError,))


if __name__ == "__main__":
    sys.exit(main())
