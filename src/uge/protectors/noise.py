"""Uniform random noise: the control of every unlearnable-example comparison."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..protect import Protection
from .base import Protector, check_rho, noise_result, register_protector
from .pgd import uniform_start


@register_protector
@dataclass
class RandomNoise(Protector):
    """Sample-wise noise drawn uniformly from [−ρ, ρ] per pixel, then rounded to 8 bits within the budget.

    Random noise of the unlearnable-example budget (ρ = 8/255) barely changes what networks learn
    (Huang et al., ICLR 2021, Table 1), which is what makes it the control.
    """

    name = "random"
    title = "Uniform random noise in the L-infinity ball (control)"
    rho: float = 8 / 255

    def limits(self):
        return [check_rho(self.rho)]

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        n, (h, w), c = len(data), data.image_size, data.channels
        return noise_result(self, data, uniform_start((n, c, h, w), self.rho, seed, torch.device("cpu")))
