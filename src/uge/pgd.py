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
        subspace: a linear projection (e.g. :func:`cell_means`, :func:`dct_band`) applied to the gradient before
            its sign, to that sign (the sign of a vector in the subspace need not lie in it: a band of frequencies)
            and to ``delta`` before each step: the perturbation stays in that subspace, up to the budget's and the
            valid pixel range's clipping.
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
            # cell means of a cell-constant sign are that sign, bit for bit; a band's projection changes it
            step = grad.sign() if subspace is None else subspace(grad.sign())
            delta = (delta + sign * step_size * step).clamp_(-rho, rho)
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


def dct_band(delta: torch.Tensor, band: int) -> torch.Tensor:
    """``delta`` (B, C, H, W) with only the coefficients (v, u), v + u ≤ ``band``, of each 8×8 block of JPEG's grid
    in the orthonormal DCT basis (``band`` 0: the block means); the remainder of H, W that 8 does not tile is zeroed.
    An orthogonal projection: the low frequencies that JPEG keeps and natural images have most power in."""
    v, u = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    keep = (v + u <= band).to(delta.dtype).to(delta.device)
    kept = block_idct(block_dct(delta) * keep)
    out = torch.zeros_like(delta)
    out[..., :kept.shape[-2], :kept.shape[-1]] = kept
    return out


def dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix D (D @ signal = coefficients)."""
    k, n = torch.arange(8, dtype=torch.float64)[:, None], torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n + 1) * k * torch.pi / 16) * (2 / 8) ** 0.5
    d[0] /= 2 ** 0.5
    return d


def block_dct(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C, H//8, W//8, 8, 8): each 8×8 block of JPEG's grid in the orthonormal DCT basis,
    indexed (v, u): v down, u across (the remainder of H, W that 8 does not tile is left out)."""
    n, c, h, w = x.shape
    b = x[..., :h // 8 * 8, :w // 8 * 8].reshape(n, c, h // 8, 8, w // 8, 8).transpose(3, 4)
    d = dct_matrix().to(x.device, x.dtype)
    return d @ b @ d.T


def block_idct(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`block_dct`: (N, C, by, bx, 8, 8) → (N, C, 8·by, 8·bx)."""
    d = dct_matrix().to(y.device, y.dtype)
    n, c, by, bx = y.shape[:4]
    return (d.T @ y @ d).transpose(3, 4).reshape(n, c, by * 8, bx * 8)
