"""What every protector produces, and the one conversion of the budget to 8-bit levels.

A neutral module: the protectors (:mod:`uge.protectors`, UGE among them), :mod:`uge.published` and the
benchmark runner share it without importing one another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .data.dataset import ImageDataset

if TYPE_CHECKING:
    from .config import AuthorizedSpec, ProtectConfig
    from .training import Recipe


def rho_levels(rho: float) -> int:
    """The budget ρ on the [0, 1] scale as whole 8-bit levels: floor(255ρ) (ρ = 0.04 → 10 levels).

    The small tolerance keeps a ρ typed as ``k / 255`` at k levels despite floating-point rounding.
    """
    return math.floor(255 * rho + 1e-9)


@dataclass
class Protection:
    """What a protection run produces; :func:`uge.published.publish` writes it to disk.

    UGE runs carry their :class:`ProtectConfig`; baseline protectors (:mod:`uge.protectors`) leave
    ``config`` None, name themselves in ``method`` and record their parameters in ``params``. A protector
    that chooses authorized networks (UGE, keyed) gives their specs, θ0 and the published recipe.
    """

    protected: ImageDataset  # the quantized (8-bit) protected images, same order and labels
    config: ProtectConfig | None  # None for baseline protectors
    theta0: list[dict[str, torch.Tensor]] = field(default_factory=list)  # θ0 of every authorized network
    feature_space: str = "none"  # which feature space L_fd used (logged and published)
    history: list[dict] = field(default_factory=list)  # mean losses per generator epoch (or per round)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage
    method: str = "uge"  # the protector's registry name (uge.protectors)
    params: dict = field(default_factory=dict)  # the protector's parameters, as plain values
    rho: float | None = None  # L∞ budget on the [0, 1] scale (default: config.rho); None: not norm-bounded
    authorized: list[AuthorizedSpec] = field(default_factory=list)  # default: config.authorized
    recipe: Recipe | None = None  # the published recipe of the authorized networks (default: config.recipe)
    title: str = ""  # the method in words (the paper behind it), for people reading the manifest

    def __post_init__(self):
        if self.config is not None:
            self.rho = self.config.rho if self.rho is None else self.rho
            self.authorized = self.authorized or list(self.config.authorized)
            self.recipe = self.recipe or self.config.recipe

    @property
    def norm_bounded(self) -> bool:
        """Whether the images are within an L∞ ball of the originals (CUDA's filters are not)."""
        return self.rho is not None


def quantize(x_u: torch.Tensor, x_uint8: torch.Tensor, rho: float) -> torch.Tensor:
    """Round protected images in [0, 1] to uint8 while keeping ‖q − x‖∞ ≤ ρ on the 8-bit scale.

    Plain rounding could step one level past the budget (e.g. 255ρ = 10.2 allows 10 levels, not 11),
    so the rounded value is clamped to ±floor(255ρ) levels around the clean pixel.
    """
    steps = rho_levels(rho)
    q = torch.round(x_u * 255).to(torch.int16)
    x = x_uint8.to(torch.int16)
    return torch.clamp(torch.minimum(torch.maximum(q, x - steps), x + steps), 0, 255).to(torch.uint8)
