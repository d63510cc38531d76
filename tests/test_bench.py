"""The bench's reference loop and its reference row, on CPU with tiny sizes (no Ray: the rows asked for run in process).

What test_cli asserts of the default bench (every runtime and transport, the ratio to in-process) is not repeated.
"""
import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F

from raydistill.bench import reference_loop, runtimes
from raydistill.cli import main
from raydistill.config import load_config
from tests.conftest import one_line, tiny_dml, write_config

REFERENCE_ROW = re.compile(r"^(reference|inprocess|ray) +(eager|inprocess|object_store|collective|collective-gloo) +"
                           r"(\d+\.\d\d) +(\d+) +(\d+\.\d\d) +(-|\d+\.\d\d\d) +.+$", re.M)


def test_reference_loop_runs_on_cpu_and_reports_its_speed():
    r = reference_loop.reference_step_ms(3, batch=8, classes=10, arch="resnet20", shape=(3, 16, 16), steps=2,
                                         warmup=1, device="cpu")
    assert math.isfinite(r["ms"]) and r["ms"] > 0
    assert r["peer_images_per_s"] == pytest.approx(3 * 8 / (r["ms"] / 1000))
    assert r["device"] == "cpu" and not r["bf16"] and not r["channels_last"]    # GPU-only settings, off on a CPU
    assert len(r["losses"]) == 3 and all(math.isfinite(loss) for loss in r["losses"])


def test_reference_loop_standalone_is_one_model_alone(capsys):
    assert reference_loop.main(["--standalone", "--arch", "resnet20", "--size", "16", "--batch", "8", "--classes",
                                "10", "--steps", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reference loop: one model alone, resnet20, batch 8, 10 classes, 16x16, on cpu"), out
    ms, rate = re.search(r"^(\d+\.\d\d) ms/step, (\d+) peer-images/s$", out, re.M).groups()
    assert int(rate) == pytest.approx(8 / (float(ms) / 1000), rel=0.01, abs=1)


def test_dml_losses_are_ce_plus_the_mean_kl_to_the_other_peers_detached():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 5, generator=gen, requires_grad=True) for _ in range(3)]
    labels = torch.tensor([0, 3, 1, 4])
    for temperature, alpha in ((1.0, 1.0), (2.0, 0.5)):
        losses = reference_loop.dml_losses(logits, labels, temperature, alpha)
        p = [torch.softmax(z.detach().double() / temperature, dim=1) for z in logits]
        for i, z in enumerate(logits):
            ce = -torch.log_softmax(z.detach().double(), dim=1)[torch.arange(4), labels].mean()
            kl = [(p[j] * (p[j].log() - p[i].log())).sum(dim=1).mean() for j in range(3) if j != i]
            expected = ce + alpha * temperature ** 2 * sum(kl) / 2
            assert float(losses[i].detach()) == pytest.approx(float(expected), rel=1e-5)
    (grad_other,) = torch.autograd.grad(losses[0], logits[1], allow_unused=True)
    assert grad_other is None                                          # another peer's output is a fixed target
    alone = reference_loop.dml_losses(logits[:1], labels)[0].detach()
    assert float(alone) == pytest.approx(float(F.cross_entropy(logits[0].detach(), labels)))


def test_crop_flip_is_a_padded_crop_at_the_drawn_offset_then_a_flip():
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = reference_loop.crop_flip(x, 2, True, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)                             # the same draws, in the same order
    top, left, mirrored = (torch.randint(0, high, (6, 1), generator=gen) for high in (5, 5, 2))
    for i in range(6):
        crop = F.pad(x[i], (2, 2, 2, 2))[:, top[i]:top[i] + 5, left[i]:left[i] + 7]
        assert torch.equal(out[i], crop.flip(-1) if mirrored[i] else crop)
    assert out.is_contiguous() and torch.equal(reference_loop.crop_flip(x, 0, False), x)


def test_bench_with_the_reference_prints_it_first_and_speed_ups_over_it(capsys):
    assert main(["bench", "--reference", "--only", "inprocess,reference", "--steps", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("machine: ") and "3 peers, mlp, batch 64" in lines[0], out
    assert re.match(r"^runtime +transport +ms/step +peer-images/s +speed-up +exchange ms +workers$", lines[1]), out
    rows = REFERENCE_ROW.findall(out)
    assert [row[:2] for row in rows] == [("reference", "eager"), ("inprocess", "inprocess")], out
    (_, _, ref_ms, _, ref_ratio, exchange), (_, _, ms, _, ratio, _) = rows
    assert float(ref_ratio) == 1.0 and exchange == "-"
    assert float(ratio) == pytest.approx(float(ref_ms) / float(ms), rel=0.05, abs=0.01)    # a speed-up, not a time
    assert "speed-up: the reference's ms/step / the row's" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no CUDA device")
def test_bench_gpu_without_cuda_refuses_in_one_line(capsys):
    assert runtimes.main(["--gpu", "--steps", "3"]) == 2               # python -m raydistill.bench, as the script runs
    line = one_line(capsys.readouterr().err)
    assert line.startswith("raydistill: error: --gpu=True: needs a CUDA device"), line


@pytest.mark.parametrize("args, field", [(["--only", "reference,gpu"], "--only='reference,gpu'"),
                                         (["--steps", "0"], "--steps=0"),
                                         (["--reference", "--set", "method.name=independent"],
                                          "method.name='independent'")])
def test_bench_bad_input_is_one_line_naming_the_flag_or_field(args, field, capsys):
    assert main(["bench", *args]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"raydistill: error: {field}: ")


def test_gpu_setup_is_a_valid_config_and_a_cpu_config_gets_its_peers_onto_one_gpu(tmp_path):
    config = load_config(runtimes.DEFAULT_GPU)
    assert (config.model.arch, config.num_peers, config.train.batch_size, config.train.bf16) == ("resnet32", 3, 128,
                                                                                                 True)
    assert config.num_peers * config.resources.gpus_per_peer == pytest.approx(1.0)
    assert (config.data.crop_pad, config.data.flip, config.data.options["num_classes"]) == (4, True, 100)
    path = write_config(tmp_path / "tiny.yaml", tiny_dml())
    args = argparse.Namespace(config=path, gpu=True, overrides=["train.batch_size=32"])
    config = runtimes.bench_config(args)
    assert config.resources.gpus_per_peer == pytest.approx(1 / 3) and config.train.batch_size == 32


def test_a_row_that_fails_is_printed_as_failed_and_the_others_still_run(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("out of memory\nmore lines")

    monkeypatch.setattr(runtimes, "measure", broken)
    assert main(["bench", "--reference", "--only", "reference,inprocess", "--steps", "2", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert [row[:2] for row in REFERENCE_ROW.findall(out)] == [("reference", "eager")], out
    assert re.search(r"^inprocess +inprocess +failed: RuntimeError: out of memory$", out, re.M), out
