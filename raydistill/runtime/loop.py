"""The run, top to bottom: epochs of steps, evaluation, records, checkpoints, export. Runtime-agnostic.

The loop talks to a ``workers`` object (Ray actors, or the same engine objects in this process) through the step protocol
of DESIGN.md: ``submit_step`` starts forward -> targets -> learn for one step and returns a handle without waiting;
``collect`` waits for a handle's per-peer metrics. The loop keeps at most ``train.steps_in_flight`` steps outstanding.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from raydistill.data.views import num_steps
from raydistill.engine.checkpoint import save_checkpoint
from raydistill.engine.evaluation import primary_metric
from raydistill.engine.recorder import Recorder, write_json
from raydistill.engine.storage import mirror
from raydistill.methods import build_method


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a lost actor past its restarts); the message says what to do."""


class WorkerLost(RuntimeError):
    """A peer, teacher or coordinator died (its process or its node); the runtime restarts it."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


class Console:
    """A progress bar per epoch (when stderr is a terminal), a line per epoch, a final table."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = enabled and sys.stderr.isatty()

    def progress(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        if self.bar:
            filled = int(30 * step / steps)
            sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}")
            sys.stderr.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            if self.bar:
                sys.stderr.write("\r" + " " * 60 + "\r")
            print(text, flush=True)


def _mean_metrics(per_step: list[list[dict]]) -> list[dict]:
    """Per-peer means of the step metrics, weighted by samples."""
    peers = len(per_step[0])
    result = []
    for i in range(peers):
        rows = [step[i] for step in per_step]
        total = sum(r["samples"] for r in rows)
        keys = [k for k in rows[0] if k not in ("samples", "finite")]
        result.append({k: sum(r[k] * r["samples"] for r in rows) / total for k in keys})
    return result


class Run:
    def __init__(self, config, spec, arrays: dict, workers, run_dir: Path, runtime: str, console: Console,
                 on_epoch=None):
        self.config = config
        self.on_epoch = on_epoch
        self.spec = spec
        self.workers = workers
        self.run_dir = Path(run_dir)
        self.runtime = runtime
        self.console = console
        self.method = build_method(config)
        self.steps = num_steps(len(arrays["train_y"]), config.train.batch_size)
        self.has_val = len(arrays["val_y"]) > 0
        self.metric, self.mode = primary_metric(config.task)
        self.state = {"epochs_completed": 0, "history": [], "train_s": 0.0, "samples": 0, "wall_s": 0.0,
                      "restarts": 0, "steps_redone": 0}

    # ---- the epoch loop --------------------------------------------------------------------------------------------
    def train(self, resume_state: dict | None = None, stop_after_epoch: int | None = None) -> RunResult:
        start = time.perf_counter()
        if resume_state is not None:
            self.workers.set_state(resume_state)
            self.state = resume_state["loop"]
        first = self.state["epochs_completed"]
        recorder = Recorder(self.run_dir, resume_epoch=first if resume_state is not None else None)
        epochs = self.config.train.epochs
        wall_before = self.state["wall_s"]
        # where a lost actor rolls the run back to: the last checkpoint (kept in memory too), or the start
        self.mark_rollback(first, 0, resume_state or self.workers.get_state(), [])
        epoch = first
        try:
            while epoch < epochs:
                last = epoch + 1 == epochs or (stop_after_epoch is not None and epoch + 1 >= stop_after_epoch)
                due = last or (epoch + 1) % self.config.train.checkpoint_every == 0
                try:                                   # every call to the workers of this epoch, nothing recorded yet
                    start_step, done = self.resume_point(epoch)
                    train_metrics, seconds = self.train_epoch(epoch, start_step, done)
                    evaluation = {"val": self.workers.evaluate("val") if self.has_val else None,
                                  "test": self.workers.evaluate("test")}
                    worker_state = self.workers.get_state() if due else None
                except WorkerLost as lost:
                    epoch = self.recover(lost)
                    continue
                self.state["history"].append(self.epoch_record(epoch, train_metrics, evaluation, seconds))
                self.state["epochs_completed"] = epoch + 1
                self.state["wall_s"] = wall_before + time.perf_counter() - start
                recorder.log_epoch(epoch + 1, *self.records(epoch))
                self.console.line(self.epoch_line(epoch))
                checkpoint = None
                if due:
                    checkpoint = save_checkpoint(self.run_dir, epoch + 1, {**worker_state, "loop": self.state},
                                                 self.config.train.keep_checkpoints)
                    self.mark_rollback(epoch + 1, 0, worker_state, [])
                    self.mirror()
                if self.on_epoch is not None:
                    self.on_epoch(self.epoch_report(), checkpoint)
                if last:
                    break
                epoch += 1
            summary = self.summary()
            if summary["epochs_completed"] == epochs:
                summary["deploy"] = self.export()
            recorder.write_summary(summary)
        finally:
            recorder.close()
        self.mirror()
        self.console.line(self.final_table(summary))
        return RunResult(self.run_dir, summary)

    def train_epoch(self, epoch: int, start_step: int = 0, done: list | None = None) -> tuple[list[dict], float]:
        """Steps start_step.. of an epoch; done: the step metrics already collected (after a mid-epoch rollback)."""
        tic = time.perf_counter()
        pending, done = deque(), list(done or [])
        every = self.config.train.checkpoint_every_steps
        self.position = (epoch, start_step)
        for step in range(start_step, self.steps):
            pending.append((step, self.workers.submit_step(epoch, step)))
            boundary = every is not None and (step + 1) % every == 0 and step + 1 < self.steps
            while pending and (len(pending) > self.config.train.steps_in_flight or step == self.steps - 1 or boundary):
                done_step, handle = pending.popleft()
                metrics = self.workers.collect(handle)
                self.check_finite(epoch, done_step, metrics)
                done.append(metrics)
                self.position = (epoch, done_step + 1)
                self.console.progress(epoch, self.config.train.epochs, len(done), self.steps)
            if boundary:                               # a finer rollback point, in memory
                self.mark_rollback(epoch, step + 1, self.workers.get_state(), done)
        seconds = time.perf_counter() - tic
        self.state["train_s"] += seconds
        self.state["samples"] += (self.steps - start_step) * self.config.train.batch_size
        return _mean_metrics(done), seconds

    def mirror(self) -> None:
        if self.config.train.storage:
            mirror(self.run_dir, self.config.train.storage)

    # ---- failures ----------------------------------------------------------------------------------------------
    def mark_rollback(self, epoch: int, step: int, worker_state: dict, done: list) -> None:
        self.rollback = {"epoch": epoch, "step": step, "workers": worker_state, "done": list(done),
                         "loop": copy.deepcopy(self.state)}

    def resume_point(self, epoch: int) -> tuple[int, list]:
        """Where this epoch starts: step 0, or the mid-epoch rollback point it was rolled back to."""
        if self.rollback["epoch"] == epoch and self.rollback["step"] > 0:
            return self.rollback["step"], self.rollback["done"]
        return 0, []

    def recover(self, lost: "WorkerLost") -> int:
        """An actor died: wait for Ray to restart it (on this node or a replacement), roll every peer, teacher and the
        coordinator back to the last common rollback point, and go on from there. Returns the epoch to continue."""
        restarts = self.state["restarts"] + 1
        if restarts > self.config.resources.max_restarts * max(1, self.config.num_peers + 2):
            raise TrainingError(f"too many lost actors ({restarts}); the run directory keeps the last checkpoint "
                                f"(epoch {self.rollback['epoch']}): `raydistill train --resume {self.run_dir}`")
        wait = self.config.resources.node_wait_s
        self.console.line(f"lost an actor at epoch {self.position[0] + 1} step {self.position[1]} ({lost}); "
                          f"waiting up to {wait:.0f}s for it to come back")
        try:
            self.workers.wait_ready(wait)
        except TimeoutError as err:
            raise TrainingError(f"{err}; the run directory keeps the last checkpoint (epoch "
                                f"{self.rollback['epoch']}): add capacity, then `raydistill train --resume "
                                f"{self.run_dir}`") from None
        redone = (self.position[0] - self.rollback["epoch"]) * self.steps + self.position[1] - self.rollback["step"]
        self.workers.set_state(self.rollback["workers"])
        steps_redone = self.state["steps_redone"] + max(redone, 0)
        self.state = copy.deepcopy(self.rollback["loop"])
        self.state.update(restarts=restarts, steps_redone=steps_redone)
        self.rollback["loop"].update(restarts=restarts, steps_redone=steps_redone)
        self.console.line(f"rolled back to epoch {self.rollback['epoch'] + 1} step {self.rollback['step']} "
                          f"({redone} steps to redo); restarts so far: {restarts}")
        return self.rollback["epoch"]

    def check_finite(self, epoch: int, step: int, metrics: list[dict]) -> None:
        bad = [i for i, m in enumerate(metrics) if not m["finite"]]
        if bad:
            done = self.state["epochs_completed"]
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1} step {step} on peer(s) {bad}; no update was applied for it. "
                f"The run directory keeps the last good checkpoint (epoch {done}): lower train.lr or "
                f"method.temperature, then `raydistill train --resume {self.run_dir} --set ...`")

    # ---- figures -----------------------------------------------------------------------------------------------
    def epoch_report(self) -> dict:
        """Flat figures of the last epoch (what Tune reports): per model val/test figures, the deploy candidate's
        figure under `val_<metric>` (the best model of the method's deploy kind: peer, or EMA teacher for pcl/dkel),
        hyper-parameters, epoch, samples/s."""
        rec = self.state["history"][-1]
        report = {"epoch": rec["epoch"] + 1, "samples_per_s": rec["samples_per_s"], **rec["hyper"]}
        for split in ("val", "test"):
            figures = rec[split]
            if not figures:
                continue
            for i, peer in enumerate(figures["peers"]):
                report.update({f"peer{i}_{split}_{k}": v for k, v in peer.items()})
            for i, teacher in enumerate(figures.get("ema_teachers", [])):
                report.update({f"{self.model_name('ema_teacher', i)}_{split}_{k}": v for k, v in teacher.items()})
            for i, teacher in enumerate(figures["teachers"]):
                report.update({f"teacher{i}_{split}_{k}": v for k, v in teacher.items()})
            report.update({f"ensemble_{split}_{k}": v for k, v in figures.get("ensemble", {}).items()})
            if "consistency" in figures:
                report[f"{split}_consistency"] = figures["consistency"]
            scores = [self.figures(figures, kind, i).get(self.metric) for kind, i in self.deploy_candidates()]
            report[f"{split}_{self.metric}"] = max(scores) if self.mode == "max" else min(scores)
        report["train_loss"] = sum(t["loss"] for t in rec["train"]) / len(rec["train"])
        return report

    def epoch_record(self, epoch: int, train_metrics: list[dict], evaluation: dict, seconds: float) -> dict:
        hyper = self.method.hyper(epoch)
        samples = self.steps * self.config.train.batch_size
        return {"epoch": epoch, "hyper": hyper, "train": train_metrics, "val": evaluation["val"],
                "test": evaluation["test"], "seconds": seconds, "samples_per_s": samples / seconds}

    def records(self, epoch: int) -> tuple[list[dict], dict]:
        """metrics.parquet rows and TensorBoard scalars of an epoch (numbered from 1 there, as on the console)."""
        rec = self.state["history"][-1]
        common = {"epoch": epoch + 1, **rec["hyper"], "samples_per_s": rec["samples_per_s"]}
        val, test = rec["val"] or {}, rec["test"]
        if "consistency" in test:
            common["consistency"] = (val or test).get("consistency", test["consistency"])
        rows, scalars = [], {f"hyper/{k}": v for k, v in rec["hyper"].items()}
        scalars["throughput/samples_per_s"] = rec["samples_per_s"]
        if "consistency" in common:
            scalars["consistency"] = common["consistency"]
        models = [("peer", i, p.arch, rec["train"][i]) for i, p in enumerate(self.config.peers)]
        if self.method.uses_ema_teacher:
            models += [("ema_teacher", i, p.arch, {}) for i, p in enumerate(self.config.peers)]
        models += [("teacher", i, self.config.teacher.arch, {}) for i in range(self.workers.num_teachers)]
        if self.config.num_peers > 1:
            models.append(("ensemble", 0, "ensemble", {}))
        for kind, index, arch, train in models:
            name = self.model_name(kind, index)
            row = {**common, "model": name, "kind": kind, "index": index, "arch": arch}
            row.update({f"train_{k}": v for k, v in train.items()})
            for split, figures in (("val", val), ("test", test)):
                row.update({f"{split}_{k}": v for k, v in self.figures(figures, kind, index).items()})
            rows.append(row)
            for key, value in row.items():
                if key.startswith(("train_", "val_", "test_")):
                    scalars[f"{name}/{key.replace('_', '/', 1)}"] = value
        return rows, scalars

    @staticmethod
    def model_name(kind: str, index: int) -> str:
        """The name of a model in records, summary and export: peer0, peer0_ema, teacher0, ensemble."""
        if kind == "ensemble":
            return "ensemble"
        return f"peer{index}_ema" if kind == "ema_teacher" else f"{kind}{index}"

    def deploy_candidates(self) -> list[tuple[str, int]]:
        """The models one of which is meant for deployment: the EMA teachers (pcl, dkel) or the peers."""
        return [(self.method.deploy_kind, i) for i in range(self.config.num_peers)]

    @staticmethod
    def figures(evaluation: dict, kind: str, index: int) -> dict:
        if not evaluation:
            return {}
        if kind == "ensemble":
            return evaluation.get("ensemble", {})
        return evaluation[f"{kind}s"][index]

    def selection_split(self) -> str:
        """Best epochs are chosen on the validation split, never on the test split (unless there is no validation)."""
        return "val" if self.has_val else "test"

    def model_summary(self, kind: str, index: int) -> dict:
        history = self.state["history"]
        split, metric = self.selection_split(), self.metric
        scores = [self.figures(h[split], kind, index).get(metric, math.nan) for h in history]
        pick = max if self.mode == "max" else min
        best = pick(range(len(scores)), key=lambda e: (scores[e] if not math.isnan(scores[e]) else
                                                        (-math.inf if self.mode == "max" else math.inf)))
        last_val = self.figures(history[-1]["val"], kind, index)
        last_test = self.figures(history[-1]["test"], kind, index)
        best_test = self.figures(history[best]["test"], kind, index)
        return {f"val_{metric}": last_val.get(metric), f"best_val_{metric}": scores[best] if split == "val" else None,
                "best_epoch": history[best]["epoch"] + 1, f"test_{metric}": last_test.get(metric),
                f"test_{metric}_at_best_epoch": best_test.get(metric)}

    def summary(self) -> dict:
        nodes = self.workers.nodes()
        peers = [{"index": i, "arch": p.arch, "node": nodes["peers"][i], **self.model_summary("peer", i)}
                 for i, p in enumerate(self.config.peers)]
        ema_teachers = [{"index": i, "name": self.model_name("ema_teacher", i), "arch": p.arch,
                         "node": nodes["peers"][i], **self.model_summary("ema_teacher", i)}
                        for i, p in enumerate(self.config.peers)] if self.method.uses_ema_teacher else []
        teachers = [{"index": i, "arch": self.config.teacher.arch, "node": nodes["teachers"][i],
                     **self.model_summary("teacher", i)} for i in range(self.workers.num_teachers)]
        summary = {"name": self.config.name, "method": self.config.method.name, "dataset": self.config.data.name,
                   "task": self.config.task, "runtime": self.runtime,
                   "epochs_completed": self.state["epochs_completed"], "epochs": self.config.train.epochs,
                   "peers": peers, "ema_teachers": ema_teachers, "teachers": teachers,
                   "coordinator_node": nodes["coordinator"]}
        if self.config.num_peers > 1:
            ensemble = self.model_summary("ensemble", 0)
            summary.update({f"ensemble_{k}": v for k, v in ensemble.items()})
            last = self.state["history"][-1][self.selection_split()]
            summary["consistency"] = last.get("consistency")
        summary.update(wall_s=self.state["wall_s"],
                       train_samples_per_s=self.state["samples"] / max(self.state["train_s"], 1e-9),
                       peer_samples_per_s=self.config.num_peers * self.state["samples"] / max(self.state["train_s"], 1e-9),
                       restarts=self.state["restarts"], steps_redone=self.state["steps_redone"])
        return summary

    # ---- export ------------------------------------------------------------------------------------------------
    def export(self) -> dict:
        """Writes export/ (models loadable without Ray) and returns the deploy choice: among the method's deploy
        candidates (EMA teachers for pcl/dkel, else peers), the one with the best last-epoch validation figure (the
        exported weights are the last epoch's; the test split never decides)."""
        import os
        import shutil

        import torch

        states = self.workers.export()
        split = self.selection_split()
        last = self.state["history"][-1][split]
        sign = 1 if self.mode == "max" else -1
        candidates = self.deploy_candidates()
        scores = [sign * self.figures(last, kind, i).get(self.metric, -sign * math.inf) for kind, i in candidates]
        kind, deploy_index = candidates[max(range(len(scores)), key=scores.__getitem__)]
        deploy = {"kind": kind, "index": deploy_index, "name": self.model_name(kind, deploy_index),
                  "chosen_by": f"last-epoch {split} {self.metric}"}
        tmp, final = self.run_dir / ".export.tmp", self.run_dir / "export"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        models = {}
        for name, entry in states.items():
            settings = self.config.peers[entry["index"]]
            torch.save(entry["state"], tmp / f"{name}.pt")
            models[name] = {"kind": entry["kind"], "index": entry["index"], "arch": settings.arch,
                            "options": settings.options, "file": f"{name}.pt"}
        manifest = {"spec": dataclasses.asdict(self.spec), "task": self.config.task, "models": models,
                    "deploy": deploy, "input": "float images in [0, 1], NCHW (normalization is inside the model)"}
        write_json(tmp / "manifest.json", manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return deploy

    # ---- console -----------------------------------------------------------------------------------------------
    def epoch_line(self, epoch: int) -> str:
        rec = self.state["history"][-1]
        split = self.selection_split()
        figures = rec[split]
        metric = self.metric
        peers = " ".join(f"{p[metric]:.4f}" for p in figures["peers"])
        loss = sum(t["loss"] for t in rec["train"]) / len(rec["train"])
        parts = [f"epoch {epoch + 1:>3}/{self.config.train.epochs}", f"loss {loss:.4f}", f"{split} {metric} {peers}"]
        if figures.get("ema_teachers"):
            parts.append("ema " + " ".join(f"{t[metric]:.4f}" for t in figures["ema_teachers"]))
        if figures.get("ensemble"):
            parts.append(f"ensemble {figures['ensemble'][metric]:.4f}")
        if "consistency" in figures:
            parts.append(f"consistency {figures['consistency']:.4f}")
        if figures.get("teachers"):
            parts.append("teacher " + " ".join(f"{t[metric]:.4f}" for t in figures["teachers"]))
        parts.append(f"{rec['samples_per_s']:.0f} samples/s")
        parts.append(f"{rec['seconds']:.1f}s")
        return " | ".join(parts)

    def final_table(self, summary: dict) -> str:
        metric = self.metric
        rows = [("model", "arch", f"val {metric}", f"best val {metric}", "best epoch", f"test {metric}",
                 f"test {metric} @best")]
        entries = [(f"peer{p['index']}", p) for p in summary["peers"]]
        entries += [(t["name"], t) for t in summary.get("ema_teachers", [])]
        entries += [(f"teacher{t['index']}", t) for t in summary["teachers"]]
        if f"ensemble_val_{metric}" in summary:
            entries.append(("ensemble", {k[len("ensemble_"):]: v for k, v in summary.items()
                                         if k.startswith("ensemble_")} | {"arch": "-"}))

        def fmt(value):
            return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

        for name, e in entries:
            rows.append((name, e["arch"], fmt(e[f"val_{metric}"]), fmt(e[f"best_val_{metric}"]),
                         fmt(e["best_epoch"]), fmt(e[f"test_{metric}"]), fmt(e[f"test_{metric}_at_best_epoch"])))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
        deploy = summary.get("deploy")
        tail = [f"deploy: {deploy['name']} ({deploy['chosen_by']})"] if deploy else []
        tail.append(f"{summary['epochs_completed']} epochs in {summary['wall_s']:.1f}s, "
                    f"{summary['train_samples_per_s']:.0f} samples/s; run directory: {self.run_dir}")
        return "\n".join(lines + tail)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
