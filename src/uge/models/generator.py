"""The perturbation generator of the paper's supplement (Table 4, Fig. 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class _ResBlock(nn.Module):
    """Conv 3x3, BN, LeakyReLU, Dropout, Conv 3x3, BN, plus the identity (Table 4, "Res Block")."""

    def __init__(self, ch: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout(dropout), nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """ResNet-style image-to-image network G with x_u = clamp(G(x), x - ρ, x + ρ) ∩ [0, 1] (Eq. 3).

    Layout (Table 4): Conv 7x7 → 2 × Conv 3x3 stride 2 → ``n_res`` residual blocks at 1/4 resolution →
    2 × transposed Conv 3x3 (×2 each) → Conv to C channels. Every conv is followed by BN + LeakyReLU.

    The paper clamps the generator's image output to the ρ-ball. A raw image output would sit outside the
    ball almost everywhere at the start, where the clamp has zero gradient, so G predicts a residual:
    G(x) = x + ρ·tanh(h(x)). The Eq. 3 clamp is still applied, so the budget holds by construction.

    Args:
        channels: image channels (1 or 3).
        rho: L∞ budget on the [0, 1] scale (paper: 0.04 ≈ 10/255).
        width: channels of the first conv ("ngf"); the residual stage has 4 × width.
        n_res: number of residual blocks (paper: 6).
        dropout: dropout rate inside the residual blocks.
        center: subtract the batch mean of the residual before the clamp, so that no pattern shared by every
            image of a batch survives (issue 10, against the collapse to one universal pattern; not the paper).
    """

    def __init__(self, channels: int = 3, rho: float = 0.04, width: int = 64, n_res: int = 6, dropout: float = 0.5,
                 center: bool = False):
        super().__init__()
        self.rho, self.center = float(rho), bool(center)
        w = width
        self.encode = nn.Sequential(_conv_block(channels, w, 7), _conv_block(w, 2 * w, 3, 2),
                                    _conv_block(2 * w, 4 * w, 3, 2))
        self.res = nn.Sequential(*[_ResBlock(4 * w, dropout) for _ in range(n_res)])
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(2 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(2 * w, w, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, channels, 7, 1, 3))

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """The raw residual h(x) in (-∞, ∞), resized back to x's size for sizes not divisible by 4."""
        h = self.decode(self.res(self.encode(x * 2 - 1)))
        if h.shape[-2:] != x.shape[-2:]:
            h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Protected images x_u in [0, 1] with ‖x_u − x‖∞ ≤ ρ, for images x in [0, 1] of shape (B, C, H, W)."""
        h = torch.tanh(torch.nan_to_num(self.perturbation(x)))  # an overflow must not let NaN escape the ball
        if self.center and len(h) > 1:
            h = h - h.mean(0, keepdim=True)
        g = x + self.rho * h
        return project(g, x, self.rho)


def project(x_u: torch.Tensor, x: torch.Tensor, rho: float) -> torch.Tensor:
    """Clamp x_u to the L∞ ball of radius ρ around x (Eq. 3), then to [0, 1]."""
    return torch.clamp(torch.minimum(torch.maximum(x_u, x - rho), x + rho), 0.0, 1.0)
