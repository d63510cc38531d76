"""Seeded sample order and augmented views as batch tensor ops (no DataLoader), the same numbers on CPU and GPU.

Every peer draws the same sample indices from (seed, epoch), and its own augmentation from
(seed, epoch, step, view index), so any process can rebuild exactly the batch and the view a peer saw. Random numbers
are drawn on the CPU and then moved to the data's device, so a GPU run augments like a CPU run.

An epoch replayed after a health rollback (``train.health``) draws both from its replay number as well:
(seed, epoch) becomes (seed, epoch, replay) for replay >= 1 only, so a run without rollbacks keeps its numbers.
"""
from functools import lru_cache

import torch
import torch.nn.functional as F

from raydistill.errors import ConfigError
from raydistill.seeding import generator


def replay_parts(replay: int) -> tuple:
    """What a replay adds to a seed's parts: nothing for a first attempt (replay 0), so its numbers never change."""
    return ("replay", replay) if replay else ()


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int, replay: int = 0) -> torch.Tensor:
    return torch.randperm(n, generator=generator(seed, "epoch", epoch, *replay_parts(replay)))


def epoch_indices(seed: int, epoch: int, n: int, replay: int = 0) -> torch.Tensor:
    """The sample order of an epoch (of its ``replay``-th replay): a permutation of range(n), the same in every
    process."""
    return _permutation(seed, epoch, n, replay).clone()


def num_steps(n: int, batch_size: int) -> int:
    """Steps per epoch with the last partial batch dropped; one step of all n samples when batch_size > n."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an integer >= 1")
    if n < 1:
        return 0
    return max(1, n // batch_size)


def _step_slice(step: int, n: int, batch_size: int) -> slice:
    """Where one step's indices lie in the epoch's permutation (min(batch_size, n) of them)."""
    steps = num_steps(n, batch_size)
    if not 0 <= step < steps:
        raise ConfigError("step", step, f"a step of the epoch, 0..{steps - 1}")
    size = min(batch_size, n)
    return slice(step * size, (step + 1) * size)


def batch_indices(seed: int, epoch: int, step: int, n: int, batch_size: int, replay: int = 0) -> torch.Tensor:
    """Sample indices of one step: the step-th slice of the epoch's permutation."""
    return _permutation(seed, epoch, n, replay)[_step_slice(step, n, batch_size)].clone()


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor (indices, random draws) moved to a step's device without waiting for the device: on a GPU a copy
    from pageable memory blocks the host until the device's queue drains, so it goes through pinned memory instead,
    asynchronously (the caching host allocator keeps the source alive until the copy is done). On a CPU: itself."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor if tensor.device == device else tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@lru_cache(maxsize=4)
def _device_permutation(seed: int, epoch: int, n: int, replay: int, device: str) -> torch.Tensor:
    return to_device(_permutation(seed, epoch, n, replay), device)


def device_batch_indices(seed: int, epoch: int, step: int, n: int, batch_size: int, device, replay: int = 0):
    """``batch_indices`` on a device: a slice of the epoch's permutation, moved there once per epoch and device, so
    that a step copies nothing from the host."""
    return _device_permutation(seed, epoch, n, replay, str(torch.device(device)))[_step_slice(step, n, batch_size)]


def to_float(x) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float input -> float32 unchanged."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


PAD_MODES = ("zeros", "reflect")


def reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map coordinates of a reflection-padded axis (shifted so that 0 is the first original pixel) to source pixels.

    Reflection without repeating the edge, as ``F.pad(mode="reflect")`` and numpy's ``"reflect"``: -1 -> 1, size ->
    size - 2. Valid for coordinates in [-(size - 1), 2 * (size - 1)], that is for a pad below ``size``.
    """
    index = index.abs()                                    # left/top edge: -k -> k
    return torch.where(index >= size, 2 * (size - 1) - index, index)  # right/bottom edge: size - 1 + k -> size - 1 - k


def make_view(x_uint8, seed: int, epoch: int, step: int, view_index: int, crop_pad: int, flip: bool,
              pad_mode: str = "zeros", replay: int = 0) -> torch.Tensor:
    """One augmented view of a batch [N, C, H, W]: pad by crop_pad, random crop back to H x W, then horizontal flip
    with p=0.5, each per sample; returns float32 in [0, 1] on the batch's device.

    pad_mode: ``zeros`` (torchvision's ``RandomCrop(32, padding=4)``, the default of most CIFAR codes) or ``reflect``
    (``F.pad(mode="reflect")``: "random crops from image padded by 4 pixels on each side, filling missing pixels with
    reflections of original image", Zagoruyko & Komodakis 2016, the recipe DML (Zhang et al. 2018) follows).
    The crop offsets and flip bits are drawn on the CPU from generator(seed, "view", epoch, step, view_index) (and the
    replay number of a replayed epoch), always in the same order whatever the pad mode, and the crop and flip are one gather, so no loop runs over samples and a
    GPU view is bit-identical to the CPU one. Reflection pads nothing: it maps the crop's coordinates back into the
    image (``reflect_index``), so uint8 images stay uint8 until the end.
    Float (tabular) input is returned unchanged as float32.
    """
    x = torch.as_tensor(x_uint8)
    if x.is_floating_point():
        return x.float()
    if isinstance(crop_pad, bool) or not isinstance(crop_pad, int) or crop_pad < 0:
        raise ConfigError("augment.crop_pad", crop_pad, "an integer >= 0")
    if pad_mode not in PAD_MODES:
        raise ConfigError("data.pad_mode", pad_mode, f"one of: {', '.join(PAD_MODES)}")
    if crop_pad == 0 and not flip:
        return to_float(x)
    n, _, height, width = x.shape
    if pad_mode == "reflect" and crop_pad >= min(height, width):
        raise ConfigError("data.crop_pad", crop_pad,
                          f"below the image side ({min(height, width)}) for pad_mode reflect")
    gen = generator(seed, "view", epoch, step, view_index, *replay_parts(replay))
    top = torch.randint(0, 2 * crop_pad + 1, (n,), generator=gen)
    left = torch.randint(0, 2 * crop_pad + 1, (n,), generator=gen)
    flipped = torch.randint(0, 2, (n,), generator=gen).bool() & flip
    rows = top[:, None] + torch.arange(height)  # [N, H] rows of the padded image
    cols = torch.arange(width).expand(n, width)
    cols = torch.where(flipped[:, None], width - 1 - cols, cols) + left[:, None]  # [N, W], flip reads columns backwards
    if pad_mode == "reflect":
        rows, cols = reflect_index(rows - crop_pad, height), reflect_index(cols - crop_pad, width)
        source = x
    else:
        source = F.pad(x, (crop_pad, crop_pad, crop_pad, crop_pad)) if crop_pad else x
    device = x.device
    rows, cols = to_device(rows, device), to_device(cols, device)
    samples = torch.arange(n, device=device)[:, None, None]
    # [N, H, W, C] after indexing dims 0, 2, 3 with the channel slice in between
    view = source[samples, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return to_float(view.contiguous())
