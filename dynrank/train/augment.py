"""Augmentation and batching of image data sets on the training device.

The whole data set sits on the device as uint8; each batch is gathered,
cropped, flipped and normalized there, so training never waits on the host.
Every random choice of an epoch (order, crop offsets, flips, scales, colors)
is drawn at once on the host from a generator seeded by (seed, epoch) and
moved over in one copy: an epoch is identical whether or not the run was
interrupted and resumed, and there is no host round trip per batch.
"""

import math

import torch
from torch.nn import functional as F

from .._args import check_int

__all__ = ["VisionData", "pad_crop_flip", "resized_crop", "hsv_jitter", "epoch_generator"]


def epoch_generator(seed, epoch):
    """The host generator of one epoch's draws: seeded by ``seed * 100_003 + epoch`` modulo 2**63.

    The modulus keeps every seed ``dynrank-train`` accepts (``[0, 2**63)``) within what
    ``torch.Generator.manual_seed`` takes, and leaves the smaller seeds' draws as they were.
    """
    return torch.Generator().manual_seed((seed * 100_003 + epoch) % 2 ** 63)


def pad_crop_flip(images, rows, cols, flip, pad=4):
    """Zero-pad by ``pad``, crop at per-image offsets, flip where asked.

    Args:
        images: (N, C, H, W) any dtype.
        rows, cols: (N,) int offsets in [0, 2·pad].
        flip: (N,) bool, mirror horizontally.

    Returns:
        (N, C, H, W) tensor of images' dtype.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    arange_h = torch.arange(h, device=images.device)
    arange_w = torch.arange(w, device=images.device)
    row_index = rows[:, None] + arange_h
    col_index = cols[:, None] + torch.where(flip[:, None], arange_w.flip(0), arange_w)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, row_index[:, None, :, None], col_index[:, None, None, :]]


def resized_crop(images, scale, aspect, center_x, center_y, flip, size):
    """Crop a box per image and resize it to ``size``×``size`` (bilinear), optionally mirrored.

    Args:
        images: (N, C, H, W) float.
        scale: (N,) box side as a fraction of the image side (before aspect).
        aspect: (N,) width / height of the box.
        center_x, center_y: (N,) box center in [-1, 1] coordinates (clamped to keep the box inside).
        flip: (N,) bool.
    """
    half_w = (scale * aspect.sqrt()).clamp(max=1.0)
    half_h = (scale / aspect.sqrt()).clamp(max=1.0)
    cx = center_x.clamp(-1.0 + half_w, 1.0 - half_w)
    cy = center_y.clamp(-1.0 + half_h, 1.0 - half_h)
    sign = 1.0 - 2.0 * flip.to(images.dtype)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = half_w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, (images.shape[0], images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def hsv_jitter(images, hue, saturation, value):
    """Shift hue by ``hue`` (turns), scale saturation and value; images (N, 3, H, W) in [0, 1]."""
    r, g, b = images.unbind(1)
    high, _ = images.max(1)
    low, _ = images.min(1)
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(high == r, (g - b) / safe, torch.where(high == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    s = torch.where(high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high))
    h = (h + hue[:, None, None]) % 1.0
    s = (s * saturation[:, None, None]).clamp(0.0, 1.0)
    v = (high * value[:, None, None]).clamp(0.0, 1.0)
    # HSV → RGB: each channel is v − v·s·clamp(min(k, 4 − k), 0, 1) with k = (n + 6h) mod 6.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


class VisionData:
    """Device-resident image classification data with the paper's augmentation.

    Args:
        train_x, test_x: uint8 (N, 3, H, W), test_x not empty.  train_y, test_y: int64 (N,).
        mean, std: per-channel normalization, 3 values each.
        batch_size: training batch, ≥ 1 (the last partial batch is dropped).
        recipe: ``"cifar"`` (pad-4 crop + flip) or ``"tiny-imagenet"`` (aspect
            [0.8, 1.25], crop of 224/[256, 384] of the side resized to 64,
            flip, HSV jitter hue ±36°, saturation/value ×[0.6, 1.4]; validation:
            central 224/256 crop resized to 64).
        device, channels_last, seed: placement and layout of batches, base seed.
        eval_batch_size: validation batch, ≥ 1 (default 2 × batch_size).
        classes: class names (informational).  num_classes: classifier size
            (default: largest label + 1).

    Raises:
        TypeError: ``batch_size`` or ``eval_batch_size`` is not an int.
        ValueError: an unknown ``recipe``, ``batch_size`` below 1 or above the number of training
            images, ``eval_batch_size`` below 1, an empty test split, images and labels of different
            lengths, or ``mean``/``std`` not of 3 values.
    """

    kind = "vision"

    def __init__(self, train_x, train_y, test_x, test_y, mean, std, batch_size, recipe="cifar",
                 device="cpu", channels_last=False, seed=0, eval_batch_size=None, classes=None, num_classes=None):
        if recipe not in ("cifar", "tiny-imagenet"):
            raise ValueError(f"recipe must be 'cifar' or 'tiny-imagenet', got {recipe!r}")
        batch_size = check_int(batch_size, "batch_size", "a positive int", 1)
        if eval_batch_size is not None:
            eval_batch_size = check_int(eval_batch_size, "eval_batch_size", "a positive int or None", 1)
        if len(train_x) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(train_x)} training images")
        if len(test_x) == 0:
            raise ValueError("test_x must hold at least one image, got an empty test split")
        for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
            if len(images) != len(labels):
                raise ValueError(f"{split}_y must hold one label per image of {split}_x ({len(images)}), "
                                 f"got {len(labels)}")
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        for name, values in (("mean", mean), ("std", std)):
            if values.shape != (3,):
                raise ValueError(f"{name} must hold 3 values (one per channel), got {values.tolist()}")
        self.device = torch.device(device)
        self.train_x = train_x.to(self.device)
        self.train_y = train_y.to(self.device)
        self.test_x = test_x.to(self.device)
        self.test_y = test_y.to(self.device)
        self.mean = mean.to(self.device).view(1, 3, 1, 1) * 255.0
        self.std = std.to(self.device).view(1, 3, 1, 1) * 255.0
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.recipe = recipe
        self.channels_last = channels_last
        self.seed = seed
        self.classes = list(classes or [])
        if num_classes is None:
            num_classes = int(max(train_y.max().item(), test_y.max().item()) + 1)
        self.num_classes = num_classes
        self.size = train_x.shape[-1]
        self.steps = len(train_x) // batch_size

    def __len__(self):
        return self.steps

    def _finish(self, images):
        if images.dtype == torch.uint8:
            images = images.float()
        images = (images - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _epoch_draws(self, epoch):
        generator = epoch_generator(self.seed, epoch)
        n = self.steps * self.batch_size
        draws = {"order": torch.randperm(len(self.train_x), generator=generator)[:n],
                 "flip": torch.rand(n, generator=generator) < 0.5}
        if self.recipe == "cifar":
            draws["rows"] = torch.randint(0, 9, (n,), generator=generator)
            draws["cols"] = torch.randint(0, 9, (n,), generator=generator)
        else:
            # Shorter side resized to s ∈ [256, 384] then a 224 crop: the crop
            # covers 224/s of the side; aspect ratio log-uniform in [0.8, 1.25].
            draws["scale"] = 224.0 / (256.0 + 128.0 * torch.rand(n, generator=generator))
            draws["aspect"] = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(1.25))
            draws["cx"] = torch.rand(n, generator=generator) * 2 - 1
            draws["cy"] = torch.rand(n, generator=generator) * 2 - 1
            draws["hue"] = (torch.rand(n, generator=generator) * 2 - 1) * 0.1
            draws["sat"] = 0.6 + 0.8 * torch.rand(n, generator=generator)
            draws["val"] = 0.6 + 0.8 * torch.rand(n, generator=generator)
        return {k: v.to(self.device, non_blocking=True) for k, v in draws.items()}

    def train_batches(self, epoch, start=0):
        """Yield augmented ``(images, labels)`` for batches ``start..steps-1`` of ``epoch``."""
        draws = self._epoch_draws(epoch)
        for step in range(start, self.steps):
            part = slice(step * self.batch_size, (step + 1) * self.batch_size)
            d = {k: v[part] for k, v in draws.items()}
            images = self.train_x[d["order"]]
            if self.recipe == "cifar":
                images = pad_crop_flip(images, d["rows"], d["cols"], d["flip"])
            else:
                images = resized_crop(images.float() / 255.0, d["scale"], d["aspect"], d["cx"], d["cy"],
                                      d["flip"], self.size)
                images = hsv_jitter(images, d["hue"], d["sat"], d["val"]) * 255.0
            yield self._finish(images), self.train_y[d["order"]]

    def val_batches(self):
        """Yield normalized ``(images, labels)`` of the test split."""
        for first in range(0, len(self.test_x), self.eval_batch_size):
            images = self.test_x[first:first + self.eval_batch_size]
            if self.recipe == "tiny-imagenet":
                n = images.shape[0]
                ones = torch.ones(n, device=self.device)
                zeros = torch.zeros(n, device=self.device)
                images = resized_crop(images.float(), ones * (224.0 / 256.0), ones, zeros, zeros,
                                      zeros.bool(), self.size)
            yield self._finish(images), self.test_y[first:first + self.eval_batch_size]

    def describe(self):
        return (f"{len(self.train_x):,} train / {len(self.test_x):,} test images "
                f"{self.size}×{self.size}, {self.num_classes} classes, {self.steps} batches of "
                f"{self.batch_size} per epoch")
