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


def drawn_rows(rows, count: int, batch_size) -> tuple[int, slice]:
    """(how many samples the random numbers are drawn for, which of them apply to the ``count`` samples given): the
    whole batch of ``batch_size`` and its ``rows`` when a view is made of rows of a batch, else the samples given."""
    if rows is None:
        return count, slice(None)
    if batch_size is None or not 0 <= rows.start <= rows.stop <= batch_size or rows.step not in (None, 1):
        raise ConfigError("rows", rows, f"a slice start:stop of the batch's 0..{batch_size} rows, with batch_size")
    if rows.stop - rows.start != count:
        raise ConfigError("rows", rows, f"as many rows as the {count} samples given")
    return batch_size, rows


def make_view(x_uint8, seed: int, epoch: int, step: int, view_index: int, crop_pad: int, flip: bool,
              pad_mode: str = "zeros", replay: int = 0, rows: slice | None = None,
              batch_size: int | None = None) -> torch.Tensor:
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

    rows: ``x`` holds only these rows of a batch of ``batch_size`` samples (a peer that trains on a slice of the
    step's batch): the random numbers are drawn for the whole batch, as without rows, and those of the rows used, so
    the view of the rows is, bit for bit, those rows of the whole batch's view.
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
    drawn, picked = drawn_rows(rows, n, batch_size)
    gen = generator(seed, "view", epoch, step, view_index, *replay_parts(replay))
    top = torch.randint(0, 2 * crop_pad + 1, (drawn,), generator=gen)[picked]
    left = torch.randint(0, 2 * crop_pad + 1, (drawn,), generator=gen)[picked]
    flipped = torch.randint(0, 2, (drawn,), generator=gen)[picked].bool() & flip
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


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet-style views of S x S uint8 batches: RandomResizedCrop + flip for training, resize + center crop to evaluate

RRC_SCALE = (0.08, 1.0)          # torchvision's RandomResizedCrop: the crop's share of the image's area
RRC_RATIO = (3 / 4, 4 / 3)       # and its aspect ratio (width / height), drawn log-uniform
RRC_ATTEMPTS = 10                # draws before the fallback to the central crop, as torchvision
EVAL_CROP_FRACTION = 0.875       # torchvision's Resize(256) + CenterCrop(224)


def resized_crop_boxes(n: int, height: int, width: int, gen: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO):
    """(top, left, crop height, crop width) of n crops drawn as torchvision's ``RandomResizedCrop.get_params`` draws
    one: up to ten (area, log-ratio) draws, the first that fits the image wins, else the central crop with the ratio
    clamped. All ten draws are made for every sample (always the same count of numbers), then top and left."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, RRC_ATTEMPTS, generator=gen, dtype=torch.float64))
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) *
                       torch.rand(n, RRC_ATTEMPTS, generator=gen, dtype=torch.float64))
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)          # the first draw that fits
    found = fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w.gather(1, first)[:, 0], float(fallback_w)).long()
    h = torch.where(found, h.gather(1, first)[:, 0], float(fallback_h)).long()
    top = torch.floor(torch.rand(n, generator=gen, dtype=torch.float64) * (height - h + 1)).long()
    left = torch.floor(torch.rand(n, generator=gen, dtype=torch.float64) * (width - w + 1)).long()
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def resize_weights(start, length, out_size: int, in_size: int, device=None) -> torch.Tensor:
    """[n, out_size, in_size] float32 matrices that resize the window [start, start + length) of an axis of in_size
    pixels to out_size pixels, as ``F.interpolate(mode="bilinear", antialias=True)`` does on the cropped window (a
    triangle filter widened by the downscale factor, its weights renormalised inside the window): one matrix product
    per axis resizes a whole batch of differently sized crops."""
    start = torch.as_tensor(start, dtype=torch.float64, device=device).reshape(-1, 1, 1)
    length = torch.as_tensor(length, dtype=torch.float64, device=device).reshape(-1, 1, 1)
    scale = length / out_size
    support = torch.clamp(scale, min=1.0)             # the filter's half-width in input pixels (1 when upscaling)
    center = scale * (torch.arange(out_size, dtype=torch.float64, device=device).reshape(1, -1, 1) + 0.5)
    source = torch.arange(in_size, dtype=torch.float64, device=device).reshape(1, 1, -1) - start
    weights = torch.clamp(1.0 - torch.abs((source + 0.5 - center) / support), min=0.0)
    weights = weights * ((source >= 0) & (source < length))
    return (weights / weights.sum(dim=2, keepdim=True)).float()


def _resample_matmul(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows [n|1, H', H] @ x [n, C, H, W] @ cols [n|1, W', W]^T, rounded to uint8 levels as the CPU's uint8 kernel
    rounds: one batched op for crops of every size, the GPU's form."""
    image = torch.matmul(torch.matmul(rows.unsqueeze(1), x.float()), cols.transpose(1, 2).unsqueeze(1))
    return image.round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop_view(x_uint8, seed: int, epoch: int, step: int, view_index: int, size: int, flip: bool = True,
                             scale=RRC_SCALE, ratio=RRC_RATIO, replay: int = 0, rows: slice | None = None,
                             batch_size: int | None = None) -> torch.Tensor:
    """One augmented view of a batch of uint8 images [N, C, H, W]: torchvision's ``RandomResizedCrop(size)``
    (bilinear, antialiased) then ``RandomHorizontalFlip()``, per sample; float32 [N, C, size, size] in [0, 1] on the
    batch's device, at uint8 levels (as a PIL or uint8-tensor pipeline gives them).

    The crop boxes and flip bits are drawn on the CPU from generator(seed, "view", epoch, step, view_index) (and the
    replay number of a replayed epoch), so every device cuts the same crops. On the CPU each crop is resized by
    torch's vectorised uint8 kernel (the one torchvision's ``resized_crop`` runs on uint8 tensors: the same pixels);
    on a GPU the batch is resized by two batched matrix products (``resize_weights``) in float: pixels within one level
    (1/255) of the CPU's. rows: ``x`` holds only these rows of a batch of ``batch_size`` (as ``make_view``).
    """
    x = torch.as_tensor(x_uint8)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError("data.options.crop_size", size, "an integer >= 1")
    n, channels, height, width = x.shape
    drawn, picked = drawn_rows(rows, n, batch_size)
    gen = generator(seed, "view", epoch, step, view_index, *replay_parts(replay))
    top, left, h, w = (part[picked] for part in resized_crop_boxes(drawn, height, width, gen, scale, ratio))
    flipped = torch.randint(0, 2, (drawn,), generator=gen)[picked].bool() & flip
    device = x.device
    if device.type == "cpu":
        view = torch.empty((n, channels, size, size), dtype=torch.uint8)
        for i, (t, l, hh, ww) in enumerate(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist())):
            crop = x[i:i + 1, :, t:t + hh, l:l + ww]
            view[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        view = torch.where(flipped[:, None, None, None], view.flip(3), view)
        return to_float(view)
    rows = resize_weights(to_device(top, device), to_device(h, device), size, height, device)
    cols = resize_weights(to_device(left, device), to_device(w, device), size, width, device)
    cols = torch.where(to_device(flipped, device)[:, None, None], cols.flip(1), cols)   # a flip reads columns backwards
    return to_float(_resample_matmul(x, rows, cols))


def center_crop_view(x_uint8, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> torch.Tensor:
    """The evaluation view of square uint8 images [N, C, S, S]: resized (bilinear, antialiased) to round(size /
    crop_fraction) pixels a side, then the central size x size crop, as torchvision's ``Resize`` + ``CenterCrop``;
    float32 [N, C, size, size] in [0, 1], at uint8 levels."""
    x = torch.as_tensor(x_uint8)
    resized = int(round(size / crop_fraction))
    first = int(round((resized - size) / 2.0))
    if x.device.type == "cpu":
        image = F.interpolate(x, size=(resized, resized), mode="bilinear", antialias=True, align_corners=False)
        return to_float(image[:, :, first:first + size, first:first + size])
    rows, cols = (resize_weights(0, side, resized, side, x.device)[:, first:first + size] for side in x.shape[2:])
    return to_float(_resample_matmul(x, rows, cols))


# ---------------------------------------------------------------------------------------------------------------------
# a set's own views, by its recipe

CROP_PAD = "crop_pad"                       # {kind, crop_pad, flip, pad_mode}: CIFAR-style sets, every in-memory set
RANDOM_RESIZED_CROP = "random_resized_crop"  # {kind, size, flip, scale, ratio}: ImageNet-style prepared sets


def train_view(recipe: dict, x, seed: int, epoch: int, step: int, view_index: int, replay: int = 0,
               rows: slice | None = None, batch_size: int | None = None) -> torch.Tensor:
    """A peer's augmented view of a step's batch (or of its ``rows``) as a set's recipe makes it: crop-with-padding +
    flip (``make_view``) or RandomResizedCrop + flip (``random_resized_crop_view``)."""
    if recipe["kind"] == CROP_PAD:
        return make_view(x, seed, epoch, step, view_index, recipe["crop_pad"], recipe["flip"],
                         recipe.get("pad_mode", "zeros"), replay=replay, rows=rows, batch_size=batch_size)
    return random_resized_crop_view(x, seed, epoch, step, view_index, recipe["size"], flip=recipe["flip"],
                                    scale=tuple(recipe["scale"]), ratio=tuple(recipe["ratio"]), replay=replay,
                                    rows=rows, batch_size=batch_size)


def eval_view(recipe: dict, x) -> torch.Tensor:
    """The evaluation view of a batch: the samples as stored, as floats (crop-and-pad sets, tabular sets), or resized
    and center-cropped (``center_crop_view``, ImageNet-style sets)."""
    if recipe["kind"] == CROP_PAD:
        return to_float(x)
    return center_crop_view(x, recipe["size"])
