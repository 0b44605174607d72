"""Projected gradient descent in an L∞ ball: the one PGD loop of the package.

The protectors EM, TAP, REM and UGE's δ parametrization *minimize* a loss over the perturbation (error-
minimizing / targeted / robust error-minimizing noise); adversarial training (:class:`uge.training.
AdversarialTask`, also REM's inner maximization and the ``adv`` countermeasure) *maximizes* one. Both take
signed gradient steps, projecting back onto the ball and the valid pixel range after every step (Madry et al.).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, delta: torch.Tensor, rho: float,
        steps: int, step_size: float, *, minimize: bool) -> torch.Tensor:
    """Run ``steps`` signed-gradient steps on ``delta`` and return it (detached).

    Args:
        loss_fn: maps perturbed images ``x + delta`` (B, C, H, W) in [0, 1] to a scalar loss.
        x: clean images in [0, 1] (no gradient).
        delta: the starting perturbation, |delta| ≤ rho.
        minimize: descend (EM, TAP, REM's outer noise) or ascend (adversarial examples).
    Returns:
        delta with |delta| ≤ rho and x + delta in [0, 1].
    """
    sign = -1.0 if minimize else 1.0
    x = x.detach()
    delta = delta.detach().clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x + delta), delta)
        with torch.no_grad():
            delta = (delta + sign * step_size * grad.sign()).clamp_(-rho, rho)
            delta = (x + delta).clamp_(0, 1) - x  # stay a valid image
    return delta.detach()


def uniform_start(shape, rho: float, seed: int, device) -> torch.Tensor:
    """A random start in the ball, drawn on the CPU from ``seed`` so every device starts the same."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(shape, generator=g) * 2 - 1) * rho).to(device)

