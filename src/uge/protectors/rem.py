"""Robust error-minimizing noise (REM): Fu et al., "Robust Unlearnable Examples: Protecting Data Privacy
Against Adversarial Learning", ICLR 2022."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_protector
from .em import ErrorMinimizing
from .pgd import adversarial


class AdversarialTask:
    """Adversarial training (Madry et al.) as a task of :func:`uge.training.train`: cross-entropy on
    x + δ_a, with δ_a an L∞ PGD attack of radius ``rho``."""

    name = "adversarial"

    def __init__(self, rho: float, steps: int, step_size: float):
        self.rho, self.steps, self.step_size = rho, steps, step_size

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.rho > 0:
            x = x + adversarial(model, x, y, self.rho, self.steps, self.step_size)
        return F.cross_entropy(model(x), y)


@register_protector
@dataclass
class RobustErrorMinimizing(ErrorMinimizing):
    """Error-minimizing noise that survives adversarial training: min over δ_u of min over θ of
    max over δ_a (‖δ_a‖∞ ≤ ρ_a) of the loss on x + δ_u + δ_a (Fu et al., Eq. 4, "min-min-max").

    The EM alternation with two changes: the source network trains adversarially with radius ``adv_rho``,
    and each noise step descends the loss at the *worst-case* point x + δ_u + δ_a, with δ_a found by an
    inner PGD and then held fixed (its gradient is taken at that point, as the min-max argument allows).
    Paper (CIFAR-10, ResNet-18): ρ_u = 8/255, ρ_a up to ρ_u (4/255 in the main comparisons), noise PGD with
    step 0.8/255, 10-step adversarial PGD. Left out: the paper's expectation over transformations
    (several random augmentations per noise step); ``adv_rho=0`` gives plain EM. Defaults are smaller than
    the paper's (10 noise steps per round, a fixed number of rounds) so tiny sets run on a CPU.
    """

    name = "rem"
    title = "Robust error-minimizing noise (Fu et al., ICLR 2022)"
    pgd_steps: int = 10
    stop_acc: float | None = None  # REM runs a fixed number of rounds
    adv_rho: float = 4 / 255  # ρ_a of the adversarial training and of the inner maximization
    adv_steps: int = 10
    adv_step_size: float | None = None  # None: ρ_a / 4

    def limits(self):
        return [*super().limits(), ("adv_rho", 0 <= self.adv_rho < 1, "in [0, 1) on the [0, 1] pixel scale"),
                ("adv_steps", self.adv_steps >= 1, ">= 1"),
                ("adv_step_size", self.adv_step_size is None or self.adv_step_size > 0, "> 0 or None")]

    @property
    def _adv(self) -> tuple[float, int, float]:
        return self.adv_rho, self.adv_steps, self.adv_step_size or self.adv_rho / 4

    def task(self):
        return AdversarialTask(*self._adv)

    def noise_loss(self, model: nn.Module, x_u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.adv_rho > 0:
            x_u = x_u + adversarial(model, x_u, y, *self._adv)  # δ_a is a constant (detached) here
        return F.cross_entropy(model(x_u), y)
