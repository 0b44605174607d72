"""Image similarity of a protected set to its originals: PSNR and SSIM, each averaged over images.

Budgets of norm-bounded protectors are checked as an L∞ distance; CUDA's class-wise filters are not
norm-bounded, so their published sets report these two instead (as the CUDA paper does).
Both work on uint8 arrays (N, H, W, C) on the 8-bit scale (peak value L = 255).
"""
from __future__ import annotations

import numpy as np
import torch

PSNR_CAP = 100.0  # dB given to an unchanged image (its PSNR is infinite), so the mean stays finite
_K1, _K2, _L = 0.01, 0.03, 255.0  # SSIM constants (Wang et al., 2004)


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"need two image arrays (N, H, W, C) of one shape, got {a.shape} and {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of 10·log10(255² / MSE), in dB; identical images count as :data:`PSNR_CAP`."""
    _check(a, b)
    if len(a) == 0:
        return float("nan")
    return float(_psnr_per_image(a, b).mean())


def _psnr_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a.reshape(len(a), -1).astype(np.float64) - b.reshape(len(b), -1).astype(np.float64)
    mse = (diff ** 2).mean(1)
    with np.errstate(divide="ignore"):
        per_image = np.where(mse > 0, 10 * np.log10(_L ** 2 / np.maximum(mse, 1e-300)), PSNR_CAP)
    return np.minimum(per_image, PSNR_CAP)


def _gaussian_band(n: int, size: int, sigma: float = 1.5) -> torch.Tensor:
    """(n, n − size + 1) float64 matrix M with (v @ M)[j] = Σ_i g[i] v[j + i]: a valid 1-D Gaussian filter.

    The 2-D Gaussian window is separable, so filtering is Mᵀ·X·M — two matrix products, much faster on
    a CPU than a float64 convolution.
    """
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    band = torch.zeros(n, n - size + 1, dtype=torch.float64)
    for j in range(n - size + 1):
        band[j:j + size, j] = g
    return band


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, batch_size: int = 1000) -> float:
    """Mean over images of SSIM (Wang et al., 2004): Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03.

    Local statistics are taken over the *valid* region (no padding), per channel, as in the reference
    MATLAB implementation; the SSIM map is averaged over positions and channels per image. Images smaller
    than the window use the largest odd window that fits (7×7 on 8×8 digits).
    """
    _check(a, b)
    if len(a) == 0:
        return float("nan")
    return _ssim_total(a, b, window, batch_size) / len(a)


def _ssim_total(a: np.ndarray, b: np.ndarray, window: int = 11, batch_size: int = 1000, total: float = 0.0) -> float:
    """``total`` plus the SSIM of every image, added batch by batch (:func:`ssim`)."""
    h, w = a.shape[1:3]
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    rows, cols = _gaussian_band(h, size).T, _gaussian_band(w, size)
    c1, c2 = (_K1 * _L) ** 2, (_K2 * _L) ** 2
    blur = lambda t: rows @ t @ cols
    for i in range(0, len(a), batch_size):
        x = torch.from_numpy(a[i:i + batch_size]).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(b[i:i + batch_size]).permute(0, 3, 1, 2).double()
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        total += s.mean(dim=(1, 2, 3)).sum().item()
    return total


def similarity(protected: np.ndarray, original: np.ndarray) -> dict[str, float]:
    """{"psnr": dB, "ssim": in [-1, 1]} of protected images to their originals, each a mean over images."""
    return {"psnr": round(psnr(protected, original), 4), "ssim": round(ssim(protected, original), 6)}


def similarity_chunks(pairs) -> dict[str, float]:
    """:func:`similarity` of a set read in chunks: ``pairs`` yields (protected, original) chunks in order. With
    chunks of a multiple of 1,000 images (:func:`uge.data.store.chunk_rows`) the sums are added in the same
    order as the whole-set one's, so the numbers are the same."""
    per_image, total, n = [], 0.0, 0
    for a, b in pairs:
        _check(a, b)
        per_image.append(_psnr_per_image(a, b))
        total = _ssim_total(a, b, total=total)
        n += len(a)
    if not n:
        return {"psnr": round(float("nan"), 4), "ssim": round(float("nan"), 6)}
    return {"psnr": round(float(np.concatenate(per_image).mean()), 4), "ssim": round(total / n, 6)}
