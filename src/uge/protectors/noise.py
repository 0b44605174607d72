"""Uniform random noise: the control of every unlearnable-example comparison."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..params import budget, param
from ..pgd import uniform_start
from ..result import Protection
from .base import Protector, noise_result, register_protector


@register_protector
@dataclass
class RandomNoise(Protector):
    """Sample-wise noise drawn uniformly from [−ρ, ρ] per pixel, then rounded to 8 bits within the budget.

    Random noise of the unlearnable-example budget (ρ = 8/255) barely changes what networks learn
    (Huang et al., ICLR 2021, Table 1), which is what makes it the control.
    """

    name = "random"
    title = "Uniform random noise in the L-infinity ball (control)"
    rho: float = budget(8 / 255)

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        n, (h, w), c = len(data), data.image_size, data.channels
        return noise_result(self, data, uniform_start((n, c, h, w), self.rho, seed, torch.device("cpu")), seed)


@register_protector
@dataclass
class TiledPatch(Protector):
    """Class-wise synthetic noise that survives random crops and flips: one random ±ρ patch of ``size``×``size``
    pixels per class, tiled over the whole image (the synthetic shortcuts of Yu et al., KDD 2022).

    A pattern over the whole image is shifted by the recipe's random crop and mirrored by its flip, so a
    network cannot key on fixed pixel positions; a small periodic tile looks the same after any shift by
    its period and is found by convolutions anywhere. The selectivity bench's positive control: it must
    lower every network, the authorized one included. ``block`` > 1 makes the patch of block×block cells of
    one sign (coarse): a pattern of single pixels is averaged away by LeNet's pooling, 8-px cells are not.
    """

    name = "patch"
    title = "Class-wise tiled ±ρ patches (synthetic shortcut; positive control)"
    rho: float = budget(8 / 255)
    size: int = param(8, low=1, high=64, note="pixels")
    block: int = param(1, low=1, note="(a divisor of size)")  # cell size in pixels
    luminance: bool = False  # one sign for every channel of a cell: the pattern survives grayscale conversion
    shift: bool = False  # each image's tiling cyclically shifted by its own random offset (from the seed)

    def cross_checks(self):
        return [] if self.size % self.block == 0 else [f"block must be a divisor of size={self.size}, got {self.block}"]

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        (h, w), c = data.image_size, data.channels
        g = torch.Generator().manual_seed(seed)
        cells = self.size // self.block
        signs = torch.randint(0, 2, (data.num_classes, 1 if self.luminance else c, cells, cells), generator=g) * 2 - 1
        patches = (signs * self.rho).expand(-1, c, -1, -1)
        patches = patches.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)
        reps = (1, 1, -(-h // self.size) + self.shift, -(-w // self.size) + self.shift)
        tiles = patches.repeat(*reps)  # one period more when shifted: every offset still covers the image
        labels = torch.from_numpy(data.labels).long()
        if not self.shift:
            return noise_result(self, data, tiles[:, :, :h, :w][labels], seed)
        # Per image, a cyclic shift of its class's tiling by (dy, dx) in [0, size)²: the class's pattern is no
        # longer one fixed image, so the class means and a linear classifier do not hold it (a key holder unseals).
        offsets = torch.randint(0, self.size, (len(data), 2), generator=g)
        delta = torch.stack([tiles[y, :, dy:dy + h, dx:dx + w]
                             for y, (dy, dx) in zip(labels.tolist(), offsets.tolist())])
        return noise_result(self, data, delta, seed)
