"""Training-time augmentations, applied per batch on the batch's device after the recipe's crop and flip.

Every one takes float images (B, C, H, W) in [0, 1] and labels (B,) or soft targets (B, K) and returns the
same shapes, images still in [0, 1]; mixup and cutmix return soft targets (rows sum to 1). Randomness
comes from torch's global RNG, which :func:`uge.training.train` seeds, so a training run repeats exactly.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..models.registry import MEAN
from .registry import BatchAugment, Param, register_countermeasure, soft_targets


def _beta(alpha: float) -> float:
    """One draw of Beta(α, α) from torch's global RNG (mixup/cutmix mixing weight)."""
    a = torch.tensor([alpha], dtype=torch.float64)
    return torch.distributions.Beta(a, a).sample().item()


def _box_masks(b: int, h: int, w: int, bh: torch.Tensor, bw: torch.Tensor, device) -> torch.Tensor:
    """Boolean masks (B, 1, H, W) of boxes of size (bh, bw) (per sample) at uniform random centres, clipped
    at the borders (as in Cutout and CutMix)."""
    cy = torch.randint(0, h, (b,), device=device)
    cx = torch.randint(0, w, (b,), device=device)
    y0, x0 = cy - bh // 2, cx - bw // 2
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_r = (rows >= y0[:, None]) & (rows < (y0 + bh)[:, None])
    in_c = (cols >= x0[:, None]) & (cols < (x0 + bw)[:, None])
    return (in_r[:, :, None] & in_c[:, None, :])[:, None]


@register_countermeasure
class Cutout(BatchAugment):
    """Cutout (DeVries & Taylor 2017): one square of ``size`` pixels per image, at a uniform random centre
    and clipped at the borders, is set to 0.5 gray — the value the models' normalization maps to 0, as in
    the original, which cut out after normalization."""

    name = "cutout"
    summary = "blank one random square per training image."
    params: ClassVar[dict[str, Param]] = {
        "size": Param(int, 16, 1, 1024, help="side of the square in pixels")}

    def augment(self, x, y, num_classes):
        b, _, h, w = x.shape
        size = torch.full((b,), self.size, device=x.device)
        mask = _box_masks(b, h, w, size, size, x.device)
        return x.masked_fill(mask, MEAN), y


@register_countermeasure
class Mixup(BatchAugment):
    """Mixup (Zhang et al. 2018): x = λ·x + (1−λ)·x[perm], targets mixed alike, λ ~ Beta(α, α) per batch."""

    name = "mixup"
    summary = "blend pairs of training images and their labels."
    params: ClassVar[dict[str, Param]] = {
        "alpha": Param(float, 1.0, 0, 100, low_open=True, help="Beta(alpha, alpha) mixing weight")}

    def augment(self, x, y, num_classes):
        lam = _beta(self.alpha)
        perm = torch.randperm(len(x), device=x.device)
        t = soft_targets(y, num_classes)
        return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]


@register_countermeasure
class CutMix(BatchAugment):
    """CutMix (Yun et al. 2019): paste a box of another image of the batch; the box covers a 1−λ share of
    the image, λ ~ Beta(α, α) per batch, and the targets are mixed by the box's actual (clipped) area."""

    name = "cutmix"
    summary = "paste a random box of another training image, mixing the labels by area."
    params: ClassVar[dict[str, Param]] = {
        "alpha": Param(float, 1.0, 0, 100, low_open=True, help="Beta(alpha, alpha) mixing weight")}

    def augment(self, x, y, num_classes):
        b, _, h, w = x.shape
        lam = _beta(self.alpha)
        perm = torch.randperm(b, device=x.device)
        cut = math.sqrt(1 - lam)
        bh = torch.full((b,), round(h * cut), device=x.device)
        bw = torch.full((b,), round(w * cut), device=x.device)
        mask = _box_masks(b, h, w, bh, bw, x.device)
        area = mask.flatten(1).float().mean(1)[:, None]  # per-sample share of pasted pixels
        t = soft_targets(y, num_classes)
        return torch.where(mask, x[perm], x), (1 - area) * t + area * t[perm]


# ---------------------------------------------------------------------------------------- UEraser


def _plasma(b: int, h: int, w: int, roughness: torch.Tensor, device, dtype) -> torch.Tensor:
    """Fractal ("plasma") noise (B, 1, H, W) min-max scaled to [0, 1] per image.

    A stand-in for the diamond-square plasma of kornia that UEraser uses: octaves of Gaussian noise on
    grids of 2, 4, 8, ... cells, upsampled bilinearly, the amplitude of each finer octave multiplied by
    ``roughness`` (per image; larger = more fine detail).
    """
    levels = max(1, math.ceil(math.log2(max(h, w))))
    field = torch.zeros(b, 1, 2, 2, device=device, dtype=dtype)
    amp = torch.ones(b, 1, 1, 1, device=device, dtype=dtype)
    for _ in range(levels):
        field = field + amp * torch.randn(field.shape, device=device, dtype=dtype)
        field = F.interpolate(field, scale_factor=2, mode="bilinear", align_corners=True)
        amp = amp * roughness.view(-1, 1, 1, 1)
    field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=True)
    lo = field.amin((2, 3), keepdim=True)
    hi = field.amax((2, 3), keepdim=True)
    return (field - lo) / (hi - lo).clamp_min(1e-8)


def _uniform(b: int, lo: float, hi: float, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, device=device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of RGB images; the image itself for one channel."""
    if x.shape[1] == 1:
        return x
    return (x * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance-style blend: b + factor·(a − b), clamped to [0, 1]; factor (B,)."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per image and channel on 8-bit levels (rank-based, vectorized)."""
    b, c, h, w = x.shape
    v = (x * 255).round().reshape(b * c, h * w).contiguous()
    s, _ = v.sort(1)
    n = h * w
    below = torch.searchsorted(s, v, right=True).to(x.dtype)  # pixels <= each value
    low = torch.searchsorted(s, s[:, :1].contiguous(), right=True).to(x.dtype)  # pixels at the darkest level
    out = ((below - low) / (n - low).clamp_min(1)).clamp(0, 1)
    flat = (low >= n).expand_as(out)  # a constant channel stays as it is
    return torch.where(flat, v / 255, out).reshape(b, c, h, w)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3×3, centre weight 5 of 13) with replicate borders; sharpness blends against it."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5
    k = (k / k.sum()).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


# TrivialAugment-Wide (Müller & Hutter 2021) operations; geometric ones are one affine warp.
_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
        "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")


@register_countermeasure
class UEraser(BatchAugment):
    """UEraser-style strong augmentation (Qin et al., "Learning the Unlearnable: Adversarial Augmentations
    Suppress Unlearnable Example Attacks", 2023), all on the batch's device, independently per image:

    1. plasma brightness: x + intensity·(2P − 1), intensity ~ U(0, 1), P fractal noise in [0, 1];
    2. plasma contrast: x · 2P;
    3. random channel shuffle with probability 0.5 (RGB only);
    4. TrivialAugment-Wide: one operation per image drawn uniformly from identity, shear x/y (≤ 0.99),
       translate x/y (≤ the image size), rotate (≤ 135°), brightness/color/contrast/sharpness (factor
       1 ± ≤ 0.99), posterize (2..8 bits), solarize, autocontrast, equalize; magnitude uniform.

    ``strength`` scales every magnitude (1 = UEraser's). The plasma is a fractal-noise stand-in for kornia's
    diamond-square, so this follows UEraser's recipe but is not bit-identical to it; UEraser-Max (the
    maximum loss over several augmented copies) is not included.
    """

    name = "ueraser"
    summary = "strong random photometric and geometric augmentation in the UEraser style."
    params: ClassVar[dict[str, Param]] = {
        "strength": Param(float, 1.0, 0, 1, low_open=True, help="scales every magnitude; 1 = UEraser's")}

    def augment(self, x, y, num_classes):
        b, c, h, w = x.shape
        dev, s = x.device, self.strength
        # 1-2: plasma brightness and contrast (kornia's roughness range 0.1..0.7)
        p = _plasma(b, h, w, _uniform(b, 0.1, 0.7, dev), dev, x.dtype)
        x = (x + (s * _uniform(b, 0, 1, dev)).view(-1, 1, 1, 1) * (2 * p - 1)).clamp(0, 1)
        p = _plasma(b, h, w, _uniform(b, 0.1, 0.7, dev), dev, x.dtype)
        x = (x * (1 + s * (2 * p - 1))).clamp(0, 1)  # strength 1: x · 2P
        # 3: channel shuffle
        if c > 1:
            perm = torch.rand(b, c, device=dev).argsort(1)
            shuffled = x.gather(1, perm[:, :, None, None].expand(-1, -1, h, w))
            x = torch.where((torch.rand(b, device=dev) < 0.5).view(-1, 1, 1, 1), shuffled, x)
        # 4: TrivialAugment-Wide, one op and one magnitude per image
        return self._trivial_augment(x), y

    def _trivial_augment(self, x: torch.Tensor) -> torch.Tensor:
        b = len(x)
        dev, s = x.device, self.strength
        op = torch.randint(0, len(_OPS), (b,), device=dev)
        m = s * torch.rand(b, device=dev)  # magnitude in [0, strength]
        sign = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0).to(x.dtype)
        is_op = {name: (op == i) for i, name in enumerate(_OPS)}
        # geometric: one affine warp per image (identity for the others), zero fill as torchvision's
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        shear = 0.99 * m * sign
        theta[:, 0, 1] = torch.where(is_op["shear_x"], shear, 0.0)
        theta[:, 1, 0] = torch.where(is_op["shear_y"], shear, 0.0)
        shift = 2 * m * sign  # normalized coordinates span 2: a shift of up to the image size
        theta[:, 0, 2] = torch.where(is_op["translate_x"], shift, 0.0)
        theta[:, 1, 2] = torch.where(is_op["translate_y"], shift, 0.0)
        angle = torch.where(is_op["rotate"], math.radians(135) * m * sign, 0.0)
        rot = is_op["rotate"]
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta[:, 0, 0] = torch.where(rot, cos, theta[:, 0, 0])
        theta[:, 0, 1] = torch.where(rot, -sin, theta[:, 0, 1])
        theta[:, 1, 0] = torch.where(rot, sin, theta[:, 1, 0])
        theta[:, 1, 1] = torch.where(rot, cos, theta[:, 1, 1])
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        geometric = (op >= 1) & (op <= 5)
        out = torch.where(geometric.view(-1, 1, 1, 1), warped, x)
        # photometric: each computed for the whole batch, kept where drawn
        factor = 1 + 0.99 * m * sign
        bits = (8 - torch.floor(6 * m)).clamp(2, 8)  # 2..8 bits
        step = (2 ** (8 - bits)).view(-1, 1, 1, 1)
        mean_gray = _gray(x).mean((1, 2, 3)).view(-1, 1, 1, 1)
        photometric = {
            "brightness": lambda: _blend(x, torch.zeros_like(x), factor),
            "color": lambda: _blend(x, _gray(x).expand_as(x), factor),
            "contrast": lambda: _blend(x, mean_gray.expand_as(x), factor),
            "sharpness": lambda: _blend(x, _smooth(x), factor),
            "posterize": lambda: torch.floor(torch.round(x * 255) / step) * step / 255,
            "solarize": lambda: torch.where(x >= (1 - m).view(-1, 1, 1, 1), 1 - x, x),
            "autocontrast": lambda: _autocontrast(x),
            "equalize": lambda: _equalize(x),
        }
        for name, fn in photometric.items():  # no `.any()` skip: it would sync the GPU once per op
            out = torch.where(is_op[name].view(-1, 1, 1, 1), fn(), out)
        return out.clamp(0, 1)
