"""Robust error-minimizing noise (REM): Fu et al., "Robust Unlearnable Examples: Protecting Data Privacy
Against Adversarial Learning", ICLR 2022."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..params import param
from ..training import AdversarialTask, SupervisedTask
from .base import register_protector
from .em import ErrorMinimizing


@register_protector
@dataclass
class RobustErrorMinimizing(ErrorMinimizing):
    """Error-minimizing noise that survives adversarial training: min over δ_u of min over θ of
    max over δ_a (‖δ_a‖∞ ≤ ρ_a) of the loss on x + δ_u + δ_a (Fu et al., Eq. 4, "min-min-max").

    The EM alternation with two changes: the source network trains adversarially with radius ``adv_rho``
    (:class:`uge.training.AdversarialTask`), and each noise step descends the loss at the *worst-case*
    point x + δ_u + δ_a, with δ_a found by the same PGD attack and then held fixed (its gradient is taken
    at that point, as the min-max argument allows). Paper (CIFAR-10, ResNet-18): ρ_u = 8/255, ρ_a up to ρ_u
    (4/255 in the main comparisons), noise steps of 0.8/255, 10-step adversarial PGD. Left out: the paper's
    expectation over transformations (several random augmentations per noise step). ``adv_rho=0`` gives
    plain EM. Defaults are smaller than the paper's (10 noise steps per round, a fixed number of rounds,
    no accuracy stop) so that tiny sets run on a CPU.
    """

    name = "rem"
    title = "Robust error-minimizing noise (Fu et al., ICLR 2022)"
    pgd_steps: int = 10  # (EM's ranges hold for the fields whose defaults change here)
    stop_acc: float | None = None  # REM runs a fixed number of rounds
    # ρ_a of the adversarial training and of the inner maximization
    adv_rho: float = param(4 / 255, low=0, high=1, high_open=True, note="on the [0, 1] pixel scale")
    adv_steps: int = param(10, low=1)
    adv_step_size: float | None = param(None, low=0, low_open=True)  # None: 2.5 ρ_a / adv_steps (Madry et al.)

    def attack(self) -> AdversarialTask | None:
        """Adversarial training with radius ρ_a; its ``perturb`` is also the inner maximization."""
        if self.adv_rho == 0:
            return None
        return AdversarialTask(eps=self.adv_rho, steps=self.adv_steps, step=self.adv_step_size)

    def task(self):
        return self.attack() or SupervisedTask()

    def noise_loss(self, model: nn.Module, x_u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attack = self.attack()
        if attack is not None:
            x_u = x_u + (attack.perturb(model, x_u.detach(), y) - x_u.detach())  # δ_a: a constant here
        return F.cross_entropy(model(x_u), y)
