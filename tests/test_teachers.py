"""Several teachers: each its own member of the run, one target from all of them, reported one by one.

This test covers:
- kd's target from two teachers (mean of logits, mean of probabilities, weighted probabilities), held against a hand
  computation from the two loaded teacher models on the very views the peers trained on, and the peer's KD term;
- kd and fitnet with two teachers through Ray (the collective; the object store for kd) against the in-process run,
  every state equal bit for bit;
- the teacher cache with two teachers (logits, and each teacher's own hint) against live teachers;
- a one-teacher list trains exactly as the one-teacher form ``teacher:`` (and a one-teacher fitnet keeps its adapter
  ``teacher``);
- summary.json, metrics.parquet and TensorBoard name teacher0 and teacher1, each with its own figures;
- regression: the teachers' predictions averaged or weighted (mean_probs refused); placement (teachers share CPU
  workers, each its own GPU worker and share); every teacher's checkpoint made absolute for Tune trials;
- the refusals, one line each, before Ray starts: ``teacher`` with ``teachers``, a bad checkpoint of teacher 1, a
  negative weight, ``weighted`` without weights, ``teachers`` for a method without teachers, a per-teacher hint list
  of the wrong length, a resume whose teachers do not match the checkpoint's adapters.
The teachers are two MLPs of different widths (and depths) trained for one epoch on digits.
"""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import raydistill
from raydistill.config import load_config
from raydistill.data.views import batch_indices, make_view
from raydistill.engine.coordinator import Coordinator
from raydistill.engine.data import load_run_data
from raydistill.engine.peer import Peer
from raydistill.engine.teacher import Teacher
from raydistill.errors import ConfigError
from tests.conftest import set_keys
from tests.test_bad_input import assert_one_line, run_cli, sets
from tests.test_equivalence import assert_identical, check_equivalence, peer_states
from tests.test_runtime import tensorboard_scalars

WIDTHS = {"narrow": [32], "wide": [64, 48]}


@pytest.fixture(scope="session")
def teacher_runs(tmp_path_factory):
    """Two teacher runs on digits, one epoch in-process: a one-layer MLP of 32 units and a two-layer one of 64, 48."""
    root = tmp_path_factory.mktemp("two-teachers")
    runs = {}
    for seed, (name, hidden) in enumerate(WIDTHS.items()):
        config = {"name": f"teacher-{name}", "seed": seed, "data": {"name": "digits"},
                  "model": {"arch": "mlp", "options": {"hidden": hidden}}, "peers": 1,
                  "method": {"name": "independent"}, "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}}
        runs[name] = raydistill.train(config, root / name, runtime="inprocess", progress=False)
    return runs


def teachers_list(teacher_runs, **per_teacher) -> list[dict]:
    """The two teachers as a ``teachers:`` list; per_teacher: key -> [value of teacher 0, value of teacher 1]."""
    items = [{"arch": "mlp", "options": {"hidden": hidden}, "checkpoint": str(teacher_runs[name].run_dir)}
             for name, hidden in WIDTHS.items()]
    for key, values in per_teacher.items():
        for item, value in zip(items, values):
            item[key] = value
    return items


def two_teacher_config(teacher_runs, method: str, ensemble: str = "mean_logits", **overrides) -> dict:
    config = {"name": f"{method}-two", "seed": 5, "data": {"name": "digits"},
              "model": {"arch": "mlp", "options": {"hidden": [16]}}, "peers": 2,
              "teachers": teachers_list(teacher_runs, **({"weight": [3.0, 1.0]} if ensemble == "weighted" else {})),
              "method": {"name": method, "per_peer_views": True, "teacher_ensemble": ensemble},
              "train": {"epochs": 1, "batch_size": 256, "lr": 0.05}}
    return set_keys(config, overrides)


# ---- kd's target, by hand ------------------------------------------------------------------------------------------
def hand_target_probs(z0: torch.Tensor, z1: torch.Tensor, ensemble: str, temperature: float) -> torch.Tensor:
    """The soft target the peer is meant to learn, written out: softmax of the mean logits; the mean of the two
    softened distributions; or their 3:1 mixture (weights 3 and 1, normalized to 0.75 and 0.25)."""
    p0, p1 = F.softmax(z0 / temperature, dim=1), F.softmax(z1 / temperature, dim=1)
    if ensemble == "mean_logits":
        return F.softmax((z0 + z1) / 2 / temperature, dim=1)
    if ensemble == "mean_probs":
        return (p0 + p1) / 2
    return 0.75 * p0 + 0.25 * p1


@pytest.mark.parametrize("ensemble", ["mean_logits", "mean_probs", "weighted"])
def test_kd_target_of_two_teachers_is_their_ensemble_by_hand(teacher_runs, ensemble):
    """Three steps of two peers, each on its own view, under two teachers: the coordinator's target for each peer is
    the ensemble of the two loaded teachers' logits on that peer's view, and the peer's KD term is
    T^2 * KL(target || softmax(z / T)) toward it."""
    config = load_config(two_teacher_config(teacher_runs, "kd", ensemble))
    spec, arrays = load_run_data(config)
    peers = [Peer(i, config, arrays, spec) for i in range(2)]
    teachers = [Teacher(j, config, arrays, spec) for j in range(2)]
    coordinator = Coordinator(config, arrays, spec)
    loaded = [raydistill.load_model(teacher_runs[name].run_dir) for name in WIDTHS]     # as a user loads them
    temperature = config.method.temperature
    assert temperature == 4.0
    for step in range(3):
        outputs = [p.forward(0, step) for p in peers] + [t.forward(0, step) for t in teachers]
        targets = coordinator.targets(0, step, *outputs)
        idx = batch_indices(config.seed, 0, step, len(arrays["train_y"]), config.train.batch_size)
        for i, peer in enumerate(peers):
            view = make_view(torch.from_numpy(arrays["train_x"])[idx], config.seed, 0, step, i,
                             config.data.crop_pad, config.data.flip)
            with torch.no_grad():
                z0, z1 = (model(view) for model in loaded)
            expected = hand_target_probs(z0, z1, ensemble, temperature)
            target = torch.as_tensor(targets[i]["teacher_logits"])
            got = F.softmax(target / temperature, dim=1)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            for one_teacher in (z0, z1):      # neither teacher alone: the two teachers disagree here
                assert (F.softmax(one_teacher / temperature, 1) - expected).abs().max() > 1e-3
            metrics = peer.learn(0, step, targets[i]).host()
            z = outputs[i]["logits"]
            kd = temperature ** 2 * (expected * (expected.log() - F.log_softmax(z / temperature, 1))).sum(1).mean()
            assert metrics["kd"] == pytest.approx(kd.item(), rel=1e-4)
    # the views differ between the peers, so their targets do too
    assert not np.allclose(targets[0]["teacher_logits"], targets[1]["teacher_logits"])


def test_one_teacher_in_a_list_trains_exactly_as_the_one_teacher_form(teacher_runs, tmp_path):
    """``teachers: [X]`` is ``teacher: X``: the same target (the teacher's own logits, never an ensemble of one), the
    same adapter name (fitnet: ``teacher``), the same final parameters."""
    for method in ("kd", "fitnet"):
        config = two_teacher_config(teacher_runs, method, peers=1)
        config["teachers"] = config["teachers"][:1]
        listed = raydistill.train(config, tmp_path / f"{method}-listed", runtime="inprocess", progress=False)
        config["teacher"] = config.pop("teachers")[0]
        single = raydistill.train(config, tmp_path / f"{method}-single", runtime="inprocess", progress=False)
        assert_identical(peer_states(listed.run_dir, 1), peer_states(single.run_dir, 1), method)
        if method == "fitnet":
            assert {k.split(".")[0] for k in peer_states(single.run_dir, 1)["peers"][0]["adapters"]} == {"teacher"}
        assert [t["name"] for t in listed.summary["teachers"]] == ["teacher0"]


def test_regression_teachers_are_averaged_or_weighted_and_mean_probs_is_refused(teacher_runs):
    """For regression the teachers' predictions are combined as predictions: the mean, or sum_j w_j z_j with the
    weights normalized (3 and 1: 0.75 and 0.25); there are no probabilities to average."""
    from raydistill.methods import build_method

    config = two_teacher_config(teacher_runs, "kd", "weighted", task="regression", data={"name": "diabetes"})
    unweighted = ["teachers.0.weight=null", "teachers.1.weight=null"]
    z = np.random.default_rng(0).normal(size=(2, 2, 8, 1)).astype(np.float32)    # [teacher, view, batch, output]
    for overrides, expected in (([], 0.75 * z[0] + 0.25 * z[1]),
                                (unweighted + ["method.teacher_ensemble=mean_logits"], (z[0] + z[1]) / 2)):
        method = build_method(load_config(config, overrides))
        targets = method.targets(method.hyper(0), [{}, {}], [{"logits": z[0]}, {"logits": z[1]}], None)
        for i, target in enumerate(targets):                  # peer i on its own view i
            np.testing.assert_allclose(target["teacher_logits"], expected[i], rtol=1e-6)
    with pytest.raises(ConfigError, match="method.teacher_ensemble='mean_probs': mean_logits or weighted for task "
                                          "regression"):
        load_config(config, unweighted + ["method.teacher_ensemble=mean_probs"])


def test_on_cpus_teachers_share_workers_and_on_gpus_each_has_its_own(teacher_runs):
    """Members are peers then teachers in contiguous runs of a worker each; on GPUs every teacher is its own worker
    with its own share (gpus_per_teacher), and a cluster too small says how many peers and teachers it needs."""
    from raydistill.runtime.placement import check_capacity, layout

    config = two_teacher_config(teacher_runs, "kd", **{"resources.peers_per_worker": 2})
    cpu = layout(load_config(config))
    assert [(m.peers, m.teachers) for m in cpu.members] == [((0, 1), ()), ((), (0, 1))]
    gpu = load_config(config, ["resources.peers_per_worker=null", "resources.gpus_per_peer=0.5",
                               "resources.gpus_per_teacher=0.25"])
    placed = layout(gpu)
    assert [(m.peers, m.teachers) for m in placed.members] == [((0, 1), ()), ((), (0,)), ((), (1,))]
    assert placed.bundles == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.25}, {"CPU": 1.0, "GPU": 0.25}]
    with pytest.raises(ConfigError, match=r"needs 1.5 GPUs \(4 peers and teachers\)"):
        check_capacity(gpu, {"CPU": 8.0, "GPU": 1.0})


def test_tune_trials_get_every_teachers_checkpoint_as_an_absolute_path(tmp_path, monkeypatch):
    from raydistill.tune import absolute_paths

    monkeypatch.chdir(tmp_path)
    base = absolute_paths({"teachers": [{"arch": "mlp", "checkpoint": "runs/a"}, {"arch": "mlp",
                                                                                 "checkpoint": "/abs/b"}]})
    assert [t["checkpoint"] for t in base["teachers"]] == [str(tmp_path / "runs/a"), "/abs/b"]


# ---- fitnet: an adapter per teacher, the hint term a mean over teachers ---------------------------------------------
def test_fitnet_student_owns_one_adapter_per_teacher_and_the_hint_is_their_mean(teacher_runs):
    """Per-teacher hint layers (the wide teacher's second layer: 48 features; the narrow one's first: 32); the student
    owns adapters teacher0 (16 -> 32) and teacher1 (16 -> 48), both in its optimizer; its hint term is
    (1/2) sum_j MSE(adapter_j(f_s), f_t_j)."""
    config = load_config(two_teacher_config(teacher_runs, "fitnet", peers=1,
                                            **{"method.features": {"teacher": ["layer1", "layer2"]}}))
    spec, arrays = load_run_data(config)
    peer = Peer(0, config, arrays, spec)
    teachers = [Teacher(j, config, arrays, spec) for j in range(2)]
    assert [t.hint.path for t in teachers] == ["net.layer1", "net.layer2"]
    assert list(peer.adapters) == ["teacher0", "teacher1"]
    assert [peer.adapters[n].out_features for n in ("teacher0", "teacher1")] == [32, 48]
    optimized = {id(p) for group in peer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in peer.adapters.parameters())
    coordinator = Coordinator(config, arrays, spec)
    outputs = [peer.forward(0, 0)] + [t.forward(0, 0) for t in teachers]
    assert [o["hint"].shape[-1] for o in outputs[1:]] == [32, 48]
    target = coordinator.targets(0, 0, *outputs)[0]
    student_hint = peer.hint.value.detach()
    with torch.no_grad():
        by_hand = sum(((peer.adapters[f"teacher{j}"](student_hint) - torch.as_tensor(outputs[1 + j]["hint"][0])) ** 2)
                      .mean() for j in range(2)) / 2
    metrics = peer.learn(0, 0, target).host()
    assert metrics["hint"] == pytest.approx(by_hand.item(), rel=1e-5)


# ---- through Ray: the same function ---------------------------------------------------------------------------------
EQUIVALENCE = {       # case -> (method, teacher_ensemble, overrides, transports)
    "kd-weighted": ("kd", "weighted", {"resources.peers_per_worker": 2}, ("collective", "object_store")),
    "fitnet-mean_probs-per-teacher-hints": ("fitnet", "mean_probs", {
        "peers": 1, "method.kd_weight": 0.5, "method.features": {"teacher": ["layer1", "layer2"]},
        "resources.peers_per_worker": 2}, ("collective",)),
}


@pytest.mark.parametrize("case", sorted(EQUIVALENCE))
def test_two_teachers_run_the_same_on_ray_as_in_process(ray_session, teacher_runs, tmp_path, case):
    """kd: 2 peers + 2 teachers in 2 workers (the peers in one, the teachers in the other), and through the object
    store; fitnet: 1 peer + 2 teachers (peer0 with teacher0, teacher1 alone). Every state equal, and both teachers
    evaluated with the same figures."""
    method, ensemble, overrides, transports = EQUIVALENCE[case]
    summaries = check_equivalence(two_teacher_config(teacher_runs, method, ensemble, **overrides), tmp_path,
                                  transports)

    def without_nodes(models):
        return [{k: v for k, v in m.items() if k != "node"} for m in models]

    for runtime, summary in summaries.items():
        assert [t["name"] for t in summary["teachers"]] == ["teacher0", "teacher1"], runtime
        assert without_nodes(summary["teachers"]) == without_nodes(summaries["inprocess"]["teachers"]), runtime


# ---- the cache -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_two_cached_teachers_train_exactly_as_two_live_teachers(teacher_runs, tmp_path, method):
    """One folder per teacher (teacher0/, teacher1/), each file keyed by its own teacher's weights; the run streamed
    from them ends with the parameters of the live run (fitnet: each teacher's own hint layer is cached too)."""
    extra = {"method.features": {"teacher": ["layer1", "layer2"]}} if method == "fitnet" else {}
    config = two_teacher_config(teacher_runs, method, **extra)
    live = raydistill.train(config, tmp_path / "live", runtime="inprocess", progress=False)
    for teacher in config["teachers"]:
        teacher["cache"] = str(tmp_path / "cache")
    cached = raydistill.train(config, tmp_path / "cached", runtime="inprocess", progress=False)
    files = [tmp_path / "cache" / f"teacher{j}" / "epoch_0000.parquet" for j in range(2)]
    assert all(f.is_file() for f in files)
    from raydistill.engine.teacher_cache import read_epoch, read_key

    keys = [read_key(f) for f in files]
    assert keys[0]["weights"] != keys[1]["weights"]
    if method == "fitnet":
        assert [read_epoch(f)["hint"].shape[-1] for f in files] == [32, 48]
    assert_identical(peer_states(cached.run_dir, 2), peer_states(live.run_dir, 2), "cached")


# ---- what a run reports ----------------------------------------------------------------------------------------------
def test_summary_metrics_and_tensorboard_name_each_teacher_with_its_own_figures(teacher_runs, tmp_path):
    """teacher0 and teacher1 in summary.json, metrics.parquet and TensorBoard, each with the test accuracy its own
    run measured for it (the two differ: they are different networks)."""
    config = two_teacher_config(teacher_runs, "kd")
    result = raydistill.train(config, tmp_path / "run", runtime="inprocess", progress=False)
    own = [teacher_runs[name].summary["peers"][0]["test_acc"] for name in WIDTHS]
    assert own[0] != own[1]
    teachers = result.summary["teachers"]
    assert [(t["name"], t["index"], t["arch"]) for t in teachers] == [("teacher0", 0, "mlp"), ("teacher1", 1, "mlp")]
    assert [t["test_acc"] for t in teachers] == pytest.approx(own, abs=1e-12)
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet")
    rows = metrics[metrics.kind == "teacher"].sort_values("index")
    assert rows.model.tolist() == ["teacher0", "teacher1"]
    assert rows.test_acc.tolist() == pytest.approx(own, abs=1e-12)
    scalars = tensorboard_scalars(result.run_dir)
    assert [scalars[f"teacher{j}/test/acc"] for j in range(2)] == [[(1, pytest.approx(acc, abs=1e-6))] for acc in own]


# ---- refusals --------------------------------------------------------------------------------------------------------
def test_bad_teachers_are_refused_in_one_line_before_ray_starts(teacher_runs, tmp_path, capfd, monkeypatch):
    from raydistill.runtime import driver

    def ray_would_start(*args, **kwargs):
        raise AssertionError("the driver went on to start Ray with a bad teacher")

    monkeypatch.setattr(driver, "connect", ray_would_start)       # a tripwire: the refusals come before it
    narrow, wide = (str(teacher_runs[name].run_dir) for name in WIDTHS)
    two = f"teachers=[{{arch: mlp, options: {{hidden: [32]}}, checkpoint: {narrow}}}, " \
          f"{{arch: mlp, options: {{hidden: [64, 48]}}, checkpoint: {wide}}}]"
    kd = ["method.name=kd", "peers=1", two]
    cases = [
        (kd + [f"teacher={{arch: mlp, checkpoint: {narrow}}}"], "teachers=['mlp', 'mlp']",
         "give either teacher (one teacher) or teachers (a list of teachers), not both"),
        # teacher 1's checkpoint holds the narrow network: refused by loading it, in the driver
        (kd + [f"teachers.1.checkpoint={narrow}"], f"teachers.1.checkpoint='{narrow}'",
         "does not fit teachers.1.arch=mlp"),
        (kd + ["teachers.1.checkpoint=/nonexistent/teacher.pt"], "teachers.1.checkpoint='/nonexistent/teacher.pt'",
         "does not exist"),
        (kd + ["method.teacher_ensemble=weighted", "teachers.0.weight=1", "teachers.1.weight=-0.5"],
         "teachers.1.weight=-0.5", "must be a number >= 0"),
        (kd + ["method.teacher_ensemble=weighted", "teachers.0.weight=1"], "method.teacher_ensemble='weighted'",
         "needs a weight on every teacher (teachers.1.weight not given)"),
        (kd + ["teachers.0.weight=2"], "teachers.0.weight=2.0",
         "read only by method.teacher_ensemble=weighted (this run has mean_logits)"),
        (["method.name=dml", "peers=2", two], "teachers=['mlp', 'mlp']",
         "none for method dml: only fitnet, kd train from a teacher"),
        (["method.name=fitnet", "peers=1", two, "method.features={teacher: [layer1]}"],
         "method.features.teacher=['layer1']", "one module path for every teacher, or a list of 2"),
        (["method.name=fitnet", "peers=1", two, "method.features={teacher: [layer1, layer9]}"],
         "method.features.teacher.1='layer9'", "layer"),
    ]
    for number, (overrides, prefix, allowed) in enumerate(cases):
        assert_one_line(*run_cli(sets(*overrides), tmp_path, capfd, output=f"run{number}"), prefix, allowed)


def test_a_resume_with_other_teachers_than_the_checkpoints_adapters_is_refused(teacher_runs, tmp_path):
    """A fitnet run with two teachers holds an adapter per teacher: resuming it with one teacher, or with a teacher
    whose hint has another shape, is refused naming the teachers before anything trains."""
    config = two_teacher_config(teacher_runs, "fitnet", peers=1, **{"train.epochs": 2})
    run_dir = tmp_path / "run"
    raydistill.train(config, run_dir, runtime="inprocess", stop_after_epoch=1, progress=False)
    one = config["teachers"][:1]
    with pytest.raises(ConfigError, match=r"^teachers=\['mlp'\]: the checkpoint .* holds adapters toward 2 teacher"):
        raydistill.train(resume=run_dir, overrides={"teachers": one}, runtime="inprocess", progress=False)
    with pytest.raises(ConfigError, match=r"^teachers\.1\.arch='mlp': does not match the checkpoint"):
        raydistill.train(resume=run_dir, overrides={"method.features": {"teacher": [None, "layer2"]}},
                         runtime="inprocess", progress=False)
