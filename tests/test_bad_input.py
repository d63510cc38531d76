"""Bad input, through the command line as a user meets it: one line on stderr naming the field, the value and what is
allowed; exit 2; no run directory written. Also where the error is raised with Ray running: in the driver against the
cluster's resources, and inside a worker actor (it crosses Ray pickled, and reaches the user as the same one line)."""
import os
import subprocess
import sys

import pytest

from raydistill.cli import main
from tests.conftest import one_line


def run_cli(args, tmp_path, capfd, output="run"):
    """`raydistill train ARGS --output DIR --quiet` in this process; (exit code, stderr lines, DIR). capfd, not capsys:
    a line that Ray's C++ core writes to the stderr descriptor counts too."""
    out = tmp_path / output
    code = main(["train", *args, "--output", str(out), "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    return code, err, out


def assert_one_line(code, err, out, prefix: str, allowed: str):
    """Exit 2; exactly one stderr line, `raydistill: error: FIELD=VALUE: ...` holding the allowed words; no DIR."""
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"raydistill: error: {prefix}: "), err[0]
    assert allowed in err[0], err[0]
    assert not out.exists()


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("overrides, prefix, allowed", [
    (["method.name=dmll"], "method.name='dmll'", "one of: dkel, dml, fitnet"),
    (["model.arch=resnet21"], "model.arch='resnet21'", "one of: resnet20"),
    (["peers=[{arch: mlp}, {arch: notanet}]"], "peers.1.arch='notanet'", "or any torchvision classification model"),
    (["data.name=mnist"], "data.name='mnist'", "one of: cifar10, cifar100, diabetes, digits"),
    (["method.temperature=0"], "method.temperature=0.0", "must be a number > 0"),
    (["method.temperature=-1"], "method.temperature=-1.0", "must be a number > 0"),
    (["method.alpha=-0.1"], "method.alpha=-0.1", "must be a number >= 0"),
    (["method.ce_weight=complement", "method.alpha=1.5"], "method.alpha=1.5",
     "must be in [0, 1] when method.ce_weight is complement"),
    (["peers=1"], "peers=1", "method dml needs at least 2 peers"),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], "data.root='/nonexistent/cifar'",
     "no CIFAR-10 python batches there (expected data_batch_*/test_batch"),
    (["train.batch_size=0"], "train.batch_size=0", "must be >= 1"),
    (["resources.strategy=RANDOM"], "resources.strategy='RANDOM'", "one of: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
    (["method.kelvin=3"], "method.kelvin=3", "unknown key; allowed: alpha, "),
    (["model.options={depth: 3}"], "model.options.depth=3", "mlp takes: hidden"),
    (["method.name=kd"], "teacher.checkpoint=None", "method kd needs a teacher: {arch, checkpoint}"),
    (["data.name=diabetes"], "task='classification'", "must be regression: data set diabetes is a regression task"),
    (["method.name=kd", "teacher={arch: mlp, checkpoint: /nonexistent.pt}"], "teacher.checkpoint='/nonexistent.pt'",
     "does not exist"),
    # numbers that are not numbers a run can train with (YAML's .nan / .inf, a YAML 1.2 exponent read as a number)
    (["train.lr=.nan"], "train.lr=nan", "must be a finite number > 0"),
    (["train.lr=.inf"], "train.lr=inf", "must be a finite number > 0"),
    (["train.lr=-1e-3"], "train.lr=-0.001", "must be a finite number > 0"),
    (["train.weight_decay=-5e-4"], "train.weight_decay=-0.0005", "must be a finite number >= 0"),
    (["train.momentum=-0.5"], "train.momentum=-0.5", "must be in [0, 1)"),
    (["train.momentum=1"], "train.momentum=1.0", "must be in [0, 1)"),
    (["train.milestones=[abc]"], "train.milestones=['abc']", "must be a list of epochs (integers >= 0)"),
    (["name=../../x"], "name='../../x'", "letters, digits, '.', '_' and '-' only"),
    (["peers=[{lr: -1}, {}]"], "peers.0.lr=-1.0", "must be a finite number > 0"),
    (["resources.cpus_per_coordinator=0"], "resources.cpus_per_coordinator=0.0", "must be a number > 0"),
    # the data set's size is known once it is loaded: still before Ray starts
    (["train.batch_size=5000"], "train.batch_size=5000", "at most the 1,294 training samples of data set digits"),
    # a root for a data set that reads no files would be silently ignored
    (["data.root=data/digits"], "data.root='data/digits'", "none for data set digits: it reads no files"),
    # codistillation: only what a stale copy can compute, and rollback points on exchanges of weights
    (["resources.transport=codistill", "method.codistill_every=0"], "method.codistill_every=0",
     "an integer >= 1 (steps between two exchanges of weights)"),
    (["method.codistill_every=5"], "method.codistill_every=5", "read only with resources.transport=codistill"),
    (["resources.transport=codistill", "method.name=pcl", "method.ensemble=learned_head"],
     "method.ensemble='learned_head'", "not with resources.transport=codistill: it needs the peers' features"),
    (["resources.transport=codistill", "train.checkpoint_every_steps=5", "method.codistill_every=2"],
     "train.checkpoint_every_steps=5", "a multiple of method.codistill_every (2) with resources.transport=codistill"),
    (["resources.transport=codistill", "method.name=independent"], "resources.transport='codistill'",
     "not for method independent: codistillation exchanges the weights of peers that learn from each other"),
    (["data.name=diabetes", "task=regression", "data.root=/data"], "data.root='/data'",
     "none for data set diabetes: it reads no files (its data are embedded in scikit-learn); remove data.root"),
    # peers of several ranks (engine/grid.py)
    (["resources.ranks_per_peer=0"], "resources.ranks_per_peer=0", "an integer >= 1 (the peer's data-parallel ranks)"),
    (["resources.ranks_per_peer=1.5"], "resources.ranks_per_peer=1.5", "must be an integer"),
    (["peers=[{ranks: 2}, {ranks: true}]"], "peers.1.ranks=True", "must be an integer"),
    (["resources.ranks_per_peer=2", "resources.gpus_per_peer=0.5"], "resources.ranks_per_peer=2",
     "1 with resources.gpus_per_peer=0.5: the ranks of a peer are one device each"),
    (["resources.gpus_per_peer=2"], "resources.gpus_per_peer=2.0",
     "a peer over several GPUs is resources.ranks_per_peer=2 ranks of one GPU each"),
    (["resources.ranks_per_peer=2", "train.batch_size=63"], "train.batch_size=63",
     "a multiple of peers.0.ranks=2: each rank of a peer works on an equal share of the step's batch"),
    (["resources.ranks_per_peer=2", "train.sync_bn=true"], "train.sync_bn=True",
     "false on CPUs: torch's SyncBatchNorm runs on GPUs only"),
    (["train.sync_bn=true"], "train.sync_bn=True", "only for peers of several ranks"),
    (["resources.ranks_per_peer=2", "method.name=pcl", "method.ensemble=learned_head"],
     "method.ensemble='learned_head'", "not on peers of several ranks: the learned head trains on the whole batch"),
    (["resources.ranks_per_peer=2", "resources.transport=object_store"], "resources.transport='object_store'",
     "collective with peers of several ranks"),
])
def test_bad_config_values_give_one_line(overrides, prefix, allowed, tmp_path, capfd):
    assert_one_line(*run_cli(sets(*overrides), tmp_path, capfd), prefix, allowed)


def test_eval_refuses_a_data_root_for_an_embedded_data_set(tmp_path, capfd):
    """`raydistill eval RUN --data-root DIR` on a digits run: refused, not silently evaluated on the embedded data."""
    from raydistill.config import dump_config, load_config
    from tests.conftest import tiny_dml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_config(load_config(tiny_dml()), run_dir / "config.yaml")
    assert main(["eval", str(run_dir), "--data-root", str(tmp_path / "digits")]) == 2
    assert capfd.readouterr().err.splitlines() == [
        f"raydistill: error: data.root='{tmp_path / 'digits'}': none for data set digits: it reads no files (its "
        "data are embedded in scikit-learn); remove data.root"]


def test_yaml_1_2_numbers_are_numbers_in_overrides_and_in_config_files(tmp_path):
    """PyYAML reads `1e-3` as a string (YAML 1.1); a config reads it as the number a user means (YAML 1.2)."""
    from raydistill.config import load_config

    config = load_config(None, ["train.lr=1e-3", "train.weight_decay=5e-4", "resources.node_wait_s=1e6"])
    assert (config.train.lr, config.train.weight_decay, config.resources.node_wait_s) == (0.001, 0.0005, 1e6)
    assert [p.lr for p in config.peers] == [0.001] * 3
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 1e-3, weight_decay: 5e-4}\nresources: {node_wait_s: 1e6}\n")
    config = load_config(str(path))
    assert (config.train.lr, config.train.weight_decay, config.resources.node_wait_s) == (0.001, 0.0005, 1e6)


def test_unknown_preset_or_missing_file(tmp_path, capfd):
    code, err, out = run_cli(["no-such-preset"], tmp_path, capfd)
    assert_one_line(code, err, out, "config='no-such-preset'", "is neither a file nor a preset; presets: ")
    assert "dml-digits" in err[0]


def test_teacher_checkpoint_of_another_architecture(tmp_path, capfd):
    import torch

    from raydistill.data import load_dataset
    from raydistill.models import build_model

    spec = load_dataset("digits").spec
    torch.save(build_model("mlp", spec).state_dict(), tmp_path / "mlp.pt")
    code, err, out = run_cli(sets("method.name=kd", "peers=1", f"teacher={{arch: cnn_small, checkpoint: "
                                  f"{tmp_path / 'mlp.pt'}}}"), tmp_path, capfd)
    assert_one_line(code, err, out, f"teacher.checkpoint='{tmp_path / 'mlp.pt'}'",
                    "does not fit teacher.arch=cnn_small")


@pytest.mark.parametrize("place", ["under a file", "in a read-only folder"])
def test_an_output_that_cannot_be_written_is_refused_before_ray_starts(place, tmp_path, capfd):
    if place == "under a file":
        (tmp_path / "a-file").write_text("")
        output = "a-file/run"
    else:
        (tmp_path / "locked").mkdir(mode=0o555)
        if os.access(tmp_path / "locked", os.W_OK):
            pytest.skip("this user (root) writes into a read-only folder anyway")
        output = "locked/run"
    code, err, out = run_cli([], tmp_path, capfd, output=output)
    assert_one_line(code, err, out, f"--output='{tmp_path / output}'",
                    f"cannot be written ({tmp_path / output.split('/')[0]} is not a writable folder)")


def test_existing_output_is_not_overwritten(tmp_path, capfd):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    code, err, out = run_cli([], tmp_path, capfd)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"raydistill: error: --output='{out}': already holds files")
    assert (out / "keep.txt").read_text() == "mine"


# ---- with Ray running ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, prefix, hint", [
    (["resources.gpus_per_peer=1"], "resources.gpus_per_peer=1.0",
     "the run needs 3 GPUs (3 peers and teachers); the cluster has 0; to train on CPUs: "
     "--set resources.gpus_per_peer=0"),
    (["method.name=kd", "peers=1", "resources.gpus_per_teacher=0.5"], "resources.gpus_per_teacher=0.5",
     "the run needs 0.5 GPUs (2 peers and teachers); the cluster has 0; to train on CPUs: "
     "--set resources.gpus_per_teacher=0"),
])
def test_more_gpus_than_the_cluster_has_ends_with_the_cpu_hint(overrides, prefix, hint, ray_session, tmp_path, capfd):
    if "method.name=kd" in overrides:
        teacher = f"teacher={{arch: mlp, options: {{hidden: [32]}}, checkpoint: {teacher_weights(tmp_path)}}}"
        overrides = overrides + [teacher]
    code, err, out = run_cli(sets(*overrides), tmp_path, capfd)
    assert_one_line(code, err, out, prefix, hint)
    assert err[0].endswith(hint)


def test_a_cifar_preset_on_a_cpu_only_cluster_says_how_to_train_on_cpus(ray_session, tmp_path, capfd):
    from tests.test_data import _fake_cifar10

    _fake_cifar10(tmp_path / "cifar", batch_sizes=(200,), n_test=10)
    code, err, out = run_cli(["dml-cifar10", *sets(f"data.root={tmp_path / 'cifar'}")], tmp_path, capfd)
    assert_one_line(code, err, out, "resources.gpus_per_peer=0.33", "the cluster has 0")
    assert err[0].endswith("; to train on CPUs: --set resources.gpus_per_peer=0")


def teacher_weights(folder, data: str = "digits") -> str:
    """An MLP teacher's weights (hidden [32]) for a data set, saved as teacher.pt in folder."""
    import torch

    from raydistill.data import load_dataset
    from raydistill.models import build_model

    torch.save(build_model("mlp", load_dataset(data).spec, hidden=[32]).state_dict(), folder / "teacher.pt")
    return str(folder / "teacher.pt")


def refuse(value):
    from raydistill.errors import ConfigError

    raise ConfigError("train.lr", value, "must be a finite number > 0")


def test_a_config_error_crosses_ray_as_itself(ray_session):
    """Pickled in the worker, rebuilt in the driver (ConfigError.__reduce__), and dug out of what Ray raises in its
    place: a RayTaskError that is also a ConfigError, whose own text is the remote traceback."""
    import ray

    from raydistill.errors import ConfigError, user_error

    with pytest.raises(ray.exceptions.RayTaskError, match="must be a finite number > 0") as raised:
        ray.get(ray.remote(refuse).remote(-1.0), timeout=120)
    assert isinstance(raised.value, ConfigError) and len(str(raised.value).splitlines()) > 1   # ray::refuse(), File..
    error = user_error(raised.value)
    assert type(error) is ConfigError
    assert str(error) == "train.lr=-1.0: must be a finite number > 0"
    assert (error.field, error.value, error.allowed) == ("train.lr", -1.0, "must be a finite number > 0")


def test_a_config_error_raised_inside_a_worker_actor_reaches_the_user_as_one_line(ray_session, tmp_path, capfd):
    """The hint layer is looked up where the model is built: in the worker actor (the driver builds no peer). The
    ConfigError crosses Ray inside a RayTaskError and must reach the user as the same one line, the run's actors
    and placement group gone, no run directory."""
    import ray

    code, err, out = run_cli(sets("peers=2", "resources.peers_per_worker=2", "model.options={hidden: [16]}",
                                  "method.feature_weight=1", "method.features={student: nosuch}", "name=in-actor"),
                             tmp_path, capfd)
    assert_one_line(code, err, out, "method.features.student='nosuch'",
                    "a module path of the model, such as: net, net.flatten, net.layer1")
    assert [a for a in ray.util.list_named_actors(all_namespaces=True) if "/in-actor/" in a["name"]] == []
    groups = ray.util.placement_group_table().values()
    assert not [g for g in groups if g["name"].startswith("raydistill-in-actor-") and g["state"] != "REMOVED"]


def test_an_address_where_no_ray_listens_is_one_line_from_the_console_script(tmp_path):
    """The installed entry point, as a user runs it, in a process with no Ray yet: a wrong --address is refused at
    once (Ray alone retries for minutes, printing its C++ warnings)."""
    import socket

    with socket.socket() as probe:                 # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "train", "--address", address,
                           "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"raydistill: error: resources.address='{address}': no Ray cluster listens "
                                        "there (Connection refused); give the HOST:PORT of a running cluster's GCS, "
                                        "auto, or ray://HOST:10001"]
    assert proc.stdout == f"connecting to Ray at {address}…\n"
    assert not (tmp_path / "x").exists()


def test_an_architecture_that_cannot_take_the_data_is_refused_before_ray_starts(tmp_path, capfd):
    """vgg11's five poolings shrink the 8x8 digits below 1x1: found by a forward and backward pass on two samples in
    the driver, before Ray starts and before anything is written."""
    code, err, out = run_cli(sets("model.arch=vgg11", "model.options={}"), tmp_path, capfd)
    assert_one_line(code, err, out, "model.arch='vgg11'", "cannot train on this data set's inputs [1, 8, 8]")
    assert "Output size is too small" in err[0]


def test_a_resume_refuses_a_damaged_or_hand_edited_config_and_a_stop_before_what_is_done(tmp_path, capfd):
    run_dir = tmp_path / "run"
    assert main(["train", "--output", str(run_dir), "--runtime", "inprocess", "--quiet", "--stop-after-epoch", "2",
                 *sets("train.epochs=4", "model.options.hidden=[16]")]) == 0
    capfd.readouterr()
    config_yaml = run_dir / "config.yaml"
    written = config_yaml.read_text()
    assert written.startswith("# written by raydistill (sha256 ")
    # --stop-after-epoch at or below the epochs done: one line, nothing trained
    assert main(["train", "--resume", str(run_dir), "--stop-after-epoch", "2", "--quiet"]) == 2
    assert one_line(capfd.readouterr().err) == ("raydistill: error: --stop-after-epoch=2: the run already completed 2 "
                                                "epochs; give a later epoch")
    # a config.yaml that lost its train: section would resume silently with the defaults (200 epochs of lr 0.1)
    lines = written.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("train:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
    config_yaml.write_text("".join(lines[:start] + lines[end:]))
    assert main(["train", "--resume", str(run_dir), "--runtime", "inprocess", "--quiet"]) == 2
    line = one_line(capfd.readouterr().err)
    assert line == (f"raydistill: error: --resume='{run_dir}': {config_yaml} is not the config the run wrote "
                    "(damaged, or edited by hand); change a run's settings with --resume RUN --set key=value, or put "
                    "the file back"), line
    # the way the line names: the file put back, a value changed with --set (the digest follows the file)
    config_yaml.write_text(written)
    assert main(["train", "--resume", str(run_dir), "--runtime", "inprocess", "--quiet", "--stop-after-epoch", "3",
                 *sets("train.lr=0.05")]) == 0
    assert main(["train", "--resume", str(run_dir), "--runtime", "inprocess", "--quiet"]) == 0
    import yaml

    assert yaml.safe_load(config_yaml.read_text())["train"]["lr"] == 0.05


def test_an_error_raised_in_a_ray_actor_reaches_the_console_as_its_cause_in_one_line(ray_session, capfd):
    """Not bad input: a training failure raised inside an actor (here a real one). Ray's RayTaskError text is the
    remote traceback; the line names the cause and the call it was raised in, then how to see the traceback."""
    import ray

    from raydistill.errors import report_error

    @ray.remote(num_cpus=0)
    class Broken:
        def run_steps(self):
            raise RuntimeError("Given input size: (256x1x1). Calculated output size: (256x0x0).\nmore detail")

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(Broken.remote().run_steps.remote())
    assert report_error(caught.value) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["raydistill: RuntimeError: Given input size: (256x1x1). Calculated output size: (256x0x0). "
                   "(raised in ray::Broken.run_steps())", "raydistill: set RAYDISTILL_TRACEBACK=1 for the traceback"]
