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
        steps: int, step_size: float, *, minimize: bool,
        subspace: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``steps`` signed-gradient steps on ``delta`` and return it (detached).

    Args:
        loss_fn: maps perturbed images ``x + delta`` (B, C, H, W) in [0, 1] to a scalar loss.
        x: clean images in [0, 1] (no gradient).
        delta: the starting perturbation, |delta| ≤ rho.
        minimize: descend (EM, TAP, REM's outer noise) or ascend (adversarial examples).
        subspace: a linear projection (e.g. :func:`cell_means`) applied to the gradient before its sign and to
            ``delta`` before each step: the perturbation stays in that subspace, up to the valid pixel range's
            clipping.
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
            if subspace is not None:  # the steepest signed step within the subspace, and back into it
                grad, delta = subspace(grad), subspace(delta)
            delta = (delta + sign * step_size * grad.sign()).clamp_(-rho, rho)
            delta = (x + delta).clamp_(0, 1) - x  # stay a valid image
    return delta.detach()


def uniform_start(shape, rho: float, seed: int, device) -> torch.Tensor:
    """A random start in the ball, drawn on the CPU from ``seed`` so every device starts the same."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(shape, generator=g) * 2 - 1) * rho).to(device)


def cell_means(delta: torch.Tensor, cell: int = 1, luminance: bool = False) -> torch.Tensor:
    """``delta`` (B, C, H, W) made constant over every ``cell``×``cell`` square of the image's grid (its mean
    there; partial cells at the edges average what they hold) and, with ``luminance``, equal in every channel
    (their mean). Both are averages, so a perturbation within ±ρ stays within ±ρ."""
    if cell > 1:
        h, w = delta.shape[-2:]
        pooled = torch.nn.functional.avg_pool2d(delta, cell, ceil_mode=True)
        delta = pooled.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[..., :h, :w]
    if luminance:
        delta = delta.mean(1, keepdim=True).expand_as(delta)
    return delta.contiguous()
