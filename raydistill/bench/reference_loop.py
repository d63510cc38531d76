"""The yardstick of `raydistill bench`: a plain PyTorch loop, every peer in one process, eager, no Ray.

    python -m raydistill.bench.reference_loop               # 3 ResNet-32 peers, DML, batch 128, 100 classes
    python -m raydistill.bench.reference_loop --standalone  # one model alone, cross-entropy only

What a step does: a batch of uint8 images drawn from synthetic data that lives on the device, a random crop (zero
padding) and a horizontal flip on the device, every peer's forward (bfloat16 autocast and channels_last on a GPU),
each peer's DML loss, CE(z_i, y) + alpha * T^2 * mean_{j != i} KL(softmax(z_j / T) || softmax(z_i / T)) with the
other peers' outputs detached, one backward, and an SGD step per peer (momentum, Nesterov, weight decay).
It shares nothing with the training engine but the model builder: its own data, augmentation, loss and optimizer.
On a CPU bf16 and channels_last are ignored. Times: `warmup` steps, then `repeats` runs of `steps` steps, each read
after torch.cuda.synchronize() on a GPU; the median is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def dml_losses(logits: list, labels: torch.Tensor, temperature: float = 1.0, alpha: float = 1.0) -> list:
    """Each peer's loss: CE(z_i, y) + alpha * T^2 * mean_{j != i} KL(p_j || p_i), p = softmax(z / T), p_j detached.

    One peer alone: its cross-entropy."""
    ce = [F.cross_entropy(z, labels) for z in logits]
    if len(logits) == 1:
        return ce
    log_p = [F.log_softmax(z / temperature, dim=1) for z in logits]
    fixed = [lp.detach() for lp in log_p]
    losses = []
    for i, own in enumerate(log_p):
        kl = [F.kl_div(own, fixed[j], reduction="batchmean", log_target=True) for j in range(len(logits)) if j != i]
        losses.append(ce[i] + alpha * temperature ** 2 * sum(kl) / len(kl))
    return losses


def crop_flip(x: torch.Tensor, pad: int, flip: bool, generator=None) -> torch.Tensor:
    """Random crop back to H x W from the batch padded by `pad` zeros, then a horizontal flip of half the samples:
    one gather on x's device, random numbers drawn there. x: uint8 [N, C, H, W]; returns a contiguous uint8 one."""
    if pad == 0 and not flip:
        return x
    n, _, height, width = x.shape
    device = x.device
    top = torch.randint(0, 2 * pad + 1, (n, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), device=device, generator=generator)
    rows = top + torch.arange(height, device=device)                                 # [N, H] rows of the padded image
    cols = torch.arange(width, device=device).expand(n, width)
    if flip:
        mirrored = torch.randint(0, 2, (n, 1), device=device, generator=generator).bool()
        cols = torch.where(mirrored, width - 1 - cols, cols)
    cols = cols + left                                                                 # [N, W]
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    samples = torch.arange(n, device=device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _per_peer(value, peers: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * peers
    if len(values) != peers:
        raise ValueError(f"{name}: one per peer ({peers}), got {len(values)}")
    return values


def reference_step_ms(peers: int = 3, batch: int = 128, classes: int = 100, arch="resnet32", *, options=None,
                      shape=(3, 32, 32), steps: int = 100, warmup: int = 10, repeats: int = 1, device=None,
                      bf16: bool = True, channels_last: bool = True, crop_pad: int = 4, flip: bool = True,
                      lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True,
                      temperature: float = 1.0, alpha: float = 1.0, num_images: int | None = None,
                      threads: int | None = None, seed: int = 0) -> dict:
    """ms per step of `peers` models trained together (DML) on synthetic data, median of `repeats`.

    arch and options: one for every peer, or a list with one per peer (built by raydistill.models.build_model).
    device: None picks CUDA where there is one. threads: torch's intra-op threads during the run (None: as set).
    Returns ms, peer_images_per_s, images_per_s (batch / step time) and what ran: device, bf16, channels_last, ...
    """
    from raydistill.data.sources import DataSpec
    from raydistill.models import build_model

    for name, value in (("peers", peers), ("batch", batch), ("classes", classes), ("steps", steps),
                        ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: an integer >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    bf16, channels_last = bf16 and cuda, channels_last and cuda
    shape = tuple(int(s) for s in shape)
    images = len(shape) == 3
    crop_pad, flip = (crop_pad, flip) if images else (0, False)
    archs = _per_peer(arch, peers, "arch")
    option_sets = _per_peer(options or {}, peers, "options")
    spec = DataSpec("classification", shape, classes, (0.5,) * shape[0], (0.25,) * shape[0])
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        with torch.random.fork_rng(devices=[]):        # model init from torch's global generator, put back after
            torch.manual_seed(seed)
            models = [build_model(a, spec, **dict(o)).to(device) for a, o in zip(archs, option_sets)]
        if channels_last:
            models = [m.to(memory_format=torch.channels_last) for m in models]
        optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay) for m in models]
        count = num_images or batch * 16
        if images:
            data = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, device=device, generator=generator)
        else:
            data = torch.randn((count, *shape), device=device, generator=generator)
        labels = torch.randint(0, classes, (count,), device=device, generator=generator)

        def step():
            index = torch.randint(0, count, (batch,), device=device, generator=generator)
            x, y = data[index], labels[index]
            if images:
                x = crop_flip(x, crop_pad, flip, generator).float().div_(255)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                logits = [m(x) for m in models]
            losses = dml_losses([z.float() for z in logits], y, temperature, alpha)
            sum(losses).backward()              # the targets are detached: each loss reaches its own peer only
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return losses

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        for m in models:
            m.train()
        for _ in range(warmup):
            losses = step()
        samples = []
        for _ in range(repeats):
            sync()
            tic = time.perf_counter()
            for _ in range(steps):
                losses = step()
            sync()
            samples.append((time.perf_counter() - tic) / steps)
        final = [float(loss.detach()) for loss in losses]
    finally:
        torch.set_num_threads(saved_threads)
    ms = statistics.median(samples) * 1000
    return {"ms": ms, "peer_images_per_s": peers * batch / (ms / 1000), "images_per_s": batch / (ms / 1000),
            "peers": peers, "batch": batch, "arch": archs[0] if len(set(archs)) == 1 else archs,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "bf16": bf16,
            "channels_last": channels_last, "steps": steps, "repeats": repeats, "losses": final}


def describe(result: dict) -> str:
    """How the reference ran, in a few words: 1 process, eager, and bf16 / channels_last where they were on."""
    return ", ".join(["1 process", "eager", *(f for f in ("bf16", "channels_last") if result[f])])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydistill.bench.reference_loop",
                                description=__doc__.splitlines()[0])
    p.add_argument("--standalone", action="store_true", help="one model alone (cross-entropy only)")
    p.add_argument("--peers", type=int, default=3, help="peers trained together (default 3)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--classes", type=int, default=100, help="classes (default 100)")
    p.add_argument("--arch", default="resnet32", help="a raydistill.models architecture (default resnet32)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32: CIFAR-shaped 3 x 32 x 32)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per repeat (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is shown (default 3)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda where there is one)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 forwards on a GPU")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="contiguous (NCHW) tensors on a GPU")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    peers = 1 if args.standalone else args.peers
    for flag, value in (("--peers", peers), ("--batch", args.batch), ("--classes", args.classes),
                        ("--size", args.size), ("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            parser().exit(2, f"reference_loop: error: {flag}={value}: an integer >= 1\n")
    if args.warmup < 0:
        parser().exit(2, f"reference_loop: error: --warmup={args.warmup}: an integer >= 0\n")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser().exit(2, f"reference_loop: error: --device={args.device}: needs a CUDA device, torch sees none\n")
    r = reference_step_ms(peers, args.batch, args.classes, args.arch, shape=(3, args.size, args.size),
                          steps=args.steps, warmup=args.warmup, repeats=args.repeats, device=args.device,
                          bf16=args.bf16, channels_last=args.channels_last)
    what = "one model alone" if args.standalone else f"{peers} peers (DML)"
    print(f"reference loop: {what}, {args.arch}, batch {args.batch}, {args.classes} classes, "
          f"{args.size}x{args.size}, on {r['device']} ({describe(r)}); {args.steps} steps x {args.repeats} (median)")
    print(f"{r['ms']:.2f} ms/step, {r['peer_images_per_s']:.0f} peer-images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
