"""What every protector produces, and the one conversion of the budget to 8-bit levels.

A neutral module: the protectors (:mod:`uge.protectors`, UGE among them), :mod:`uge.published` and the
benchmark runner share it without importing one another.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import rho_levels  # noqa: F401  (the one conversion of the budget; re-exported)
from .data.dataset import ImageDataset

if TYPE_CHECKING:
    from .config import AuthorizedSpec, Recipe


@dataclass
class Protection:
    """What a protection run produces; :func:`uge.published.publish` writes it to disk.

    Every protector fills these fields once, when it builds the result (:func:`uge.protectors.base.result_of`):
    what it is (``method``, ``title``, ``params``), its budget (``rho``; None: not norm-bounded), the seed the
    run was given, and, for a protector that chooses authorized networks (UGE, keyed), their specs, θ0 and the
    published recipe.
    """

    protected: ImageDataset  # the quantized (8-bit) protected images, same order and labels
    method: str  # the protector's registry name (uge.protectors)
    params: dict  # the protector's parameters, as plain values (written once, in the manifest)
    rho: float | None  # L∞ budget on the [0, 1] scale; None: not norm-bounded
    seed: int = 0  # the run's seed; every other seed derives from it (uge.seeds)
    seed_secret: bool = False  # the seed came from the sealing key: the manifest must not hold it
    title: str = ""  # the method in words (the paper behind it), for people reading the manifest
    authorized: list[AuthorizedSpec] = field(default_factory=list)  # the authorized networks it chose
    theta0: list[dict[str, torch.Tensor]] = field(default_factory=list)  # θ0 of every authorized network
    recipe: Recipe | None = None  # the published recipe of the authorized networks
    feature_space: str = "none"  # which feature space L_fd used (logged and published)
    history: list[dict] = field(default_factory=list)  # mean losses per generator epoch (or per round)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage

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
