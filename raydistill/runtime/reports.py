"""What a run reports, as functions of its history: epoch records, metrics rows and TensorBoard scalars, the Tune
report, the summary, the console's epoch line and final table, and the exported models. Runtime-agnostic, no Ray.

The models of a run, in one list (``models()``): peers, their EMA teachers (pcl, dkel), frozen teachers, and the
peers' ensemble, each named once (``model_name``): peer0, peer0_ema, teacher0, ensemble. Best epochs and the
deployable model are chosen on the validation split; with no validation split (``data.val_fraction: 0``) nothing is
chosen by a held-out figure: no best epoch is reported, and the deployable model is the candidate with the lowest
last-epoch training loss, which the summary says.

Each peer's knowledge absorption rate of an epoch is its validation metric's gain over its own previous epoch divided
by the epoch's distillation weight, alpha_e times the method's ramp w(e) where it has one (pcl, dkel): the factor
every distillation term of the loss shares (term-specific factors such as dkel's beta or fitnet's hint weight are not
in it). The gain is signed so that an improvement is positive (a loss-like metric's fall). None at the first epoch,
without a validation split, and where the weight is 0.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.engine.evaluation import primary_metric
from raydistill.engine.manifest import write_export
from raydistill.names import ENSEMBLE, ema_name, model_name, peer_id, peer_name, teacher_name



@dataclass
class LoopState:
    """The loop's state: what a checkpoint's loop.json holds. Its size does not grow with the epochs: instead of every
    epoch's record it keeps the last record and, per model, its last and best epochs' figures (``Reports.observe``);
    every epoch's figures are in metrics.parquet and TensorBoard."""
    epochs_completed: int = 0
    last: dict | None = None                           # the last epoch's record (epoch_record)
    models: dict = field(default_factory=dict)         # model name -> {"last": entry, "best": entry} (model_entry)
    streak: int = 0                                    # unhealthy epochs in a row at the end (train.health)
    train_s: float = 0.0
    samples: int = 0
    wall_s: float = 0.0
    restarts: int = 0
    steps_redone: int = 0
    rollbacks: list = field(default_factory=list)     # the health watch's rollbacks: {epoch, rule, reason, back_to}
    peers: list = field(default_factory=list)         # the peers' names, in checkpoint order (peer_<i>.pt)
    changes: list = field(default_factory=list)       # elastic peers: {epoch, action: add|remove, peer, arch, init}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, observe=None) -> "LoopState":
        """A checkpoint's loop state; one written before the compact state (its ``history``: every epoch's record)
        is folded into it record by record with ``observe(state, record)`` (the loop's)."""
        state = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        if data.get("history") and observe is not None and state.last is None:
            for record in data["history"]:
                observe(state, record)
        return state


@dataclass(frozen=True)
class Model:
    kind: str           # peer | ema_teacher | teacher | ensemble
    index: int          # its place among the run's current peers (or teachers)
    arch: str
    ident: int | None = None    # a peer's stable number (peer<ident>); None: its index

    @property
    def name(self) -> str:
        return model_name(self.kind, self.index if self.ident is None else self.ident)


def figures(evaluation: dict | None, kind: str, index: int | None) -> dict:
    """One model's figures in an evaluation (Coordinator.evaluate's result); {} for a peer not in it (None)."""
    if not evaluation or index is None:
        return {}
    if kind == ENSEMBLE:
        return evaluation.get(ENSEMBLE, {})
    return evaluation[f"{kind}s"][index]


def record_peers(record: dict) -> list[str]:
    """The names of the peers that trained in an epoch record, in place order (records before names: peer<place>)."""
    return record.get("peers") or [peer_name(i) for i in range(len(record["train"]))]


class Reports:
    def __init__(self, config, method, spec, has_val: bool):
        self.config = config
        self.method = method
        self.spec = spec
        self.has_val = has_val
        self.metric, self.mode = primary_metric(config.task)

    # ---- the models and the choices made among them ------------------------------------------------------------
    def models(self) -> list[Model]:
        models = [Model("peer", i, p.arch, p.id) for i, p in enumerate(self.config.peers)]
        if self.method.uses_ema_teacher:
            models += [Model("ema_teacher", i, p.arch, p.id) for i, p in enumerate(self.config.peers)]
        models += [Model("teacher", j, t.arch) for j, t in enumerate(self.config.teacher_list)]
        if self.config.num_peers > 1:
            models.append(Model(ENSEMBLE, 0, ENSEMBLE))
        return models

    def deploy_candidates(self) -> list[tuple[str, int]]:
        """The models one of which is meant for deployment: the EMA teachers (pcl, dkel) or the peers."""
        return [(self.method.deploy_kind, i) for i in range(self.config.num_peers)]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def observe(self, state: LoopState, record: dict) -> None:
        """An epoch's record joins the loop state: the last record, and each model's last and best epochs (by
        validation; the earliest of equal scores; with no valid score yet, its last epoch; none without a
        validation split)."""
        state.last = record
        for model in self.models():
            entry = {"epoch": record["epoch"], "val": figures(record["val"], model.kind, model.index),
                     "test": figures(record["test"], model.kind, model.index)}
            kept = state.models.setdefault(model.name, {"last": None, "best": None})
            kept["last"] = entry
            if not self.has_val:
                continue
            score = entry["val"].get(self.metric, math.nan)
            best = kept["best"]
            best_score = math.nan if best is None else best["val"].get(self.metric, math.nan)
            if best is None or (not math.isnan(score) and (math.isnan(best_score) or self.better(score, best_score))):
                kept["best"] = entry
            elif math.isnan(best_score):               # no valid score yet: the latest epoch stands in
                kept["best"] = entry

    def deploy(self, last: dict) -> dict:
        """Among the deploy candidates, the best last-epoch validation figure (the exported weights are the last
        epoch's; last: the last epoch's record); with no validation split, the lowest last-epoch training loss of
        the candidates' peers."""
        candidates = self.deploy_candidates()
        if self.has_val:
            scores = [figures(last["val"], kind, i).get(self.metric, math.nan) for kind, i in candidates]
            chosen_by = f"last-epoch val {self.metric}"
            sign = 1 if self.mode == "max" else -1
        else:
            scores = [last["train"][i]["task"] for _, i in candidates]
            chosen_by = "last-epoch training loss (no validation split: the test split never chooses)"
            sign = -1
        pick = max(range(len(scores)), key=lambda c: sign * scores[c] if not math.isnan(scores[c]) else -math.inf)
        kind, index = candidates[pick]
        return {"kind": kind, "index": index, "name": model_name(kind, self.config.peers[index].id),
                "chosen_by": chosen_by}

    # ---- per epoch ---------------------------------------------------------------------------------------------
    def epoch_record(self, epoch: int, train: list[dict], evaluation: dict, seconds: float, samples: int,
                     previous: dict | None = None, replay: int = 0, rollbacks: int = 0) -> dict:
        """previous: the record of the epoch before (None at the first); replay: the epoch's replay number after
        health rollbacks; rollbacks: the health rollbacks of the run so far."""
        hyper = self.method.hyper(epoch)
        return {"epoch": epoch, "peers": self.config.peer_names, "hyper": hyper, "train": train,
                "val": evaluation["val"],
                "test": evaluation["test"], "seconds": seconds, "samples_per_s": samples / max(seconds, 1e-9),
                "absorption": self.absorption(previous, evaluation["val"], hyper),
                "replay": replay, "rollbacks": rollbacks}

    @staticmethod
    def distill_weight(hyper: dict) -> float:
        """The distillation weight absorption is measured against: alpha_e times the ramp w(e) where there is one."""
        return hyper["alpha"] * hyper.get("ramp", 1.0)

    def absorption(self, previous: dict | None, val: dict | None, hyper: dict) -> list:
        """Each peer's validation metric gain over its previous epoch per unit of distillation weight (or None)."""
        weight = self.distill_weight(hyper)
        if previous is None or not previous["val"] or not val or weight == 0:
            return [None] * self.config.num_peers
        sign = 1.0 if self.mode == "max" else -1.0
        before = dict(zip(record_peers(previous), previous["val"]["peers"]))     # by name: a peer added has none
        return [sign * (now[self.metric] - before[name][self.metric]) / weight if name in before else None
                for name, now in zip(self.config.peer_names, val["peers"])]

    def rows_and_scalars(self, record: dict) -> tuple[list[dict], dict]:
        """metrics.parquet rows and TensorBoard scalars of an epoch (numbered from 1 there, as on the console)."""
        common = {"epoch": record["epoch"] + 1, **record["hyper"], "samples_per_s": record["samples_per_s"]}
        val, test = record["val"] or {}, record["test"]
        if "consistency" in test:
            common["consistency"] = (val or test).get("consistency", test["consistency"])
        if self.config.train.health is not None:      # which attempt of the epoch this is, and the rollbacks so far
            common.update(replay=record.get("replay", 0), rollbacks=record.get("rollbacks", 0))
        rows, scalars = [], {f"hyper/{k}": v for k, v in record["hyper"].items()}
        scalars["throughput/samples_per_s"] = record["samples_per_s"]
        if "consistency" in common:
            scalars["consistency"] = common["consistency"]
        if "rollbacks" in common:
            scalars.update({"health/replay": common["replay"], "health/rollbacks": common["rollbacks"]})
        absorption = record.get("absorption") or [None] * self.config.num_peers
        for model in self.models():
            row = {**common, "model": model.name, "kind": model.kind, "index": model.index, "arch": model.arch}
            if model.kind == "peer":
                row.update({f"train_{k}": v for k, v in record["train"][model.index].items()})
                row["absorption"] = absorption[model.index]
                scalars[f"{model.name}/absorption"] = absorption[model.index]
            for split, evaluation in (("val", val), ("test", test)):
                row.update({f"{split}_{k}": v for k, v in figures(evaluation, model.kind, model.index).items()})
            rows.append(row)
            for key, value in row.items():
                if key.startswith(("train_", "val_", "test_")):
                    scalars[f"{model.name}/{key.replace('_', '/', 1)}"] = value
        return rows, scalars

    def epoch_report(self, record: dict) -> dict:
        """Flat figures of an epoch (what Tune reports): per model val/test figures, the deploy candidates' best
        figure under `val_<metric>`, hyper-parameters, epoch, samples/s."""
        report = {"epoch": record["epoch"] + 1, "samples_per_s": record["samples_per_s"], **record["hyper"]}
        for split in ("val", "test"):
            evaluation = record[split]
            if not evaluation:
                continue
            for model in self.models():
                if model.kind != "ensemble":
                    report.update({f"{model.name}_{split}_{k}": v
                                   for k, v in figures(evaluation, model.kind, model.index).items()})
            report.update({f"ensemble_{split}_{k}": v for k, v in evaluation.get("ensemble", {}).items()})
            if "consistency" in evaluation:
                report[f"{split}_consistency"] = evaluation["consistency"]
            scores = [figures(evaluation, kind, i).get(self.metric) for kind, i in self.deploy_candidates()]
            report[f"{split}_{self.metric}"] = max(scores) if self.mode == "max" else min(scores)
        report["train_loss"] = sum(t["loss"] for t in record["train"]) / len(record["train"])
        return report

    # ---- the summary -------------------------------------------------------------------------------------------
    def model_summary(self, state: LoopState, name: str) -> dict:
        """A model's figures at its last epoch (for a peer removed from the run, the epoch it left after) and at its
        best epoch by validation."""
        kept = state.models.get(name) or {"last": None, "best": None}
        last, best = kept["last"] or {"val": {}, "test": {}}, kept["best"]
        metric = self.metric
        return {f"val_{metric}": (last["val"] or {}).get(metric),
                f"best_val_{metric}": None if best is None else best["val"].get(metric),
                "best_epoch": None if best is None else best["epoch"] + 1,
                f"test_{metric}": (last["test"] or {}).get(metric),
                f"test_{metric}_at_best_epoch": None if best is None else best["test"].get(metric)}

    def summary(self, state: LoopState, runtime: str, transport: str, nodes: dict) -> dict:
        current = [(i, name, p.arch, nodes["peers"][i], None)
                   for i, (name, p) in enumerate(zip(self.config.peer_names, self.config.peers))]
        removed = [(None, c["peer"], c["arch"], None, c["epoch"]) for c in state.changes if c["action"] == "remove"]
        peers = [{"index": i, "name": name, "arch": arch, "node": node,
                  **({"removed_at_epoch": gone} if gone is not None else {}),
                  **self.model_summary(state, name)} for i, name, arch, node, gone in current + removed]
        ema_teachers = [{"index": i, "name": ema_name(peer_id(name)), "arch": arch, "node": node,
                         **({"removed_at_epoch": gone} if gone is not None else {}),
                         **self.model_summary(state, ema_name(peer_id(name)))}
                        for i, name, arch, node, gone in current + removed] if self.method.uses_ema_teacher else []
        teachers = [{"index": j, "name": teacher_name(j), "arch": t.arch, "node": nodes["teachers"][j],
                     **self.model_summary(state, teacher_name(j))} for j, t in enumerate(self.config.teacher_list)]
        summary = {"name": self.config.name, "method": self.config.method.name, "dataset": self.config.data.name,
                   "task": self.config.task, "runtime": runtime, "transport": transport,
                   "epochs_completed": state.epochs_completed, "epochs": self.config.train.epochs,
                   "selection": "val" if self.has_val else None,
                   "peers": peers, "ema_teachers": ema_teachers, "teachers": teachers,
                   "worker_nodes": nodes.get("workers", [])}
        if self.config.num_peers > 1:
            summary.update({f"ensemble_{k}": v for k, v in self.model_summary(state, ENSEMBLE).items()})
            last = (state.last["val"] or state.last["test"]) if state.last is not None else {}
            summary["consistency"] = last.get("consistency")
        train_s = max(state.train_s, 1e-9)
        summary.update(wall_s=state.wall_s, train_samples_per_s=state.samples / train_s,
                       peer_samples_per_s=self.config.num_peers * state.samples / train_s,
                       restarts=state.restarts, steps_redone=state.steps_redone,
                       rollbacks={"count": len(state.rollbacks), "events": list(state.rollbacks)})
        if state.changes:
            summary["peer_changes"] = list(state.changes)
        return summary

    # ---- export ------------------------------------------------------------------------------------------------
    def write_export(self, run_dir: Path, states: dict, deploy: dict) -> None:
        """Writes export/ (models loadable without Ray: state dicts and a manifest), atomically."""
        write_export(run_dir, dataclasses.asdict(self.spec), self.config.task, states,
                     lambda index: self.config.peers[index], deploy)

    # ---- console -----------------------------------------------------------------------------------------------
    def epoch_line(self, record: dict) -> str:
        split = "val" if self.has_val else "test"
        evaluation = record[split]
        metric = self.metric
        peers = " ".join(f"{p[metric]:.4f}" for p in evaluation["peers"])
        loss = sum(t["loss"] for t in record["train"]) / len(record["train"])
        parts = [f"epoch {record['epoch'] + 1:>3}/{self.config.train.epochs}", f"loss {loss:.4f}",
                 f"{split} {metric} {peers}"]
        if evaluation.get("ema_teachers"):
            parts.append("ema " + " ".join(f"{t[metric]:.4f}" for t in evaluation["ema_teachers"]))
        if evaluation.get("ensemble"):
            parts.append(f"ensemble {evaluation['ensemble'][metric]:.4f}")
        if "consistency" in evaluation:
            parts.append(f"consistency {evaluation['consistency']:.4f}")
        if evaluation.get("teachers"):
            parts.append("teacher " + " ".join(f"{t[metric]:.4f}" for t in evaluation["teachers"]))
        parts.append(f"{record['samples_per_s']:.0f} samples/s")
        parts.append(f"{record['seconds']:.1f}s")
        if record.get("replay"):
            parts.append(f"replay {record['replay']}")
        return " | ".join(parts)

    def final_table(self, summary: dict, run_dir: Path) -> str:
        metric = self.metric
        rows = [("model", "arch", f"val {metric}", f"best val {metric}", "best epoch", f"test {metric}",
                 f"test {metric} @best")]
        entries = [(p.get("name", peer_name(p["index"])), p) for p in summary["peers"]]
        entries += [(t["name"], t) for t in summary.get("ema_teachers", [])]
        entries += [(teacher_name(t["index"]), t) for t in summary["teachers"]]
        if f"ensemble_val_{metric}" in summary:
            entries.append(("ensemble", {k[len("ensemble_"):]: v for k, v in summary.items()
                                         if k.startswith("ensemble_")} | {"arch": "-"}))

        def fmt(value):
            return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

        for name, e in entries:
            if e.get("removed_at_epoch") is not None:
                name = f"{name} (removed at epoch {e['removed_at_epoch']})"
            rows.append((name, e["arch"], fmt(e[f"val_{metric}"]), fmt(e[f"best_val_{metric}"]),
                         fmt(e["best_epoch"]), fmt(e[f"test_{metric}"]), fmt(e[f"test_{metric}_at_best_epoch"])))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
        deploy = summary.get("deploy")
        tail = [f"deploy: {deploy['name']} ({deploy['chosen_by']})"] if deploy else []
        if not self.has_val:
            tail.append("no validation split (data.val_fraction: 0): no best epoch is chosen")
        tail.append(f"{summary['epochs_completed']} epochs in {summary['wall_s']:.1f}s, "
                    f"{summary['train_samples_per_s']:.0f} samples/s; run directory: {run_dir}")
        return "\n".join(lines + tail)
