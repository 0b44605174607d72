"""Adaptive countermeasures: a hacker who knows the method (not the key) estimates the perturbation from the
published set's own statistics and removes it before training.

- ``pca``: the directions of pixel (``patch=1``: colour) or patch space in which the published set has more
  variance than clean images from elsewhere (the generalized eigenvectors of the two covariances), projected
  out of every training and test image. It finds a key hidden in one colour direction (keyed protection) or
  in a block pattern.
- ``spectral``: the same comparison in the Fourier basis of the whole image (per channel): the frequencies with
  excess power are shrunk to the clean images' power. It finds a pattern tiled over the image, even one shifted
  per image (a cyclic shift changes only the phases).
- ``classdct``: the ``blockdct`` comparison per class, against labelled clean images of the same classes, each
  coefficient whose class power differs (either way) rescaled to the clean class's power.
- ``classmean``: every image minus its class's mean deviation from the global mean (a class-wise pattern is
  what the class means of a protected set differ by).
- ``classref``: every image minus its class's excess mean over the same class's clean images from elsewhere,
  averaged over cells: ``classmean`` without removing the classes' own mean content.
- ``knownbasis``: no statistics at all: the hacker has read this code, so knows the JPEG bases the default
  protection (``grating``) makes its class codes of, and projects their patterns out of every 8×8 block.
- ``knownband``: the same for the ``smooth`` code: zero the coarse Fourier modes it is made of.
- ``lowband``: the same for a noise confined to a band of low block-DCT frequencies (``tap``'s ``band``).
- ``orthogonal``: the orthogonal projection attack (Sandoval-Segura et al., "What Can We Learn from Unlearnable
  Datasets?", NeurIPS 2023): fit a bias-free linear classifier on the flattened published images, project the
  span of its weight rows (QR-orthonormalized) out of every training image, train on the rest. Linearly
  separable perturbations (class-wise shortcuts, many unlearnable examples) live in that span.

Clean images from elsewhere are the ``reference`` of :func:`uge.countermeasures.transform_data`; the evaluation
gives the test split (its pixels only).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.fft
import torch

from ..data.dataset import ImageDataset
from ..errors import ConfigError
from .registry import InputTransform, Param, register_countermeasure


def _blocks(images: np.ndarray, p: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Non-overlapping p×p blocks of the image area that p tiles: (N·bh·bw, p·p·C) float64, and (bh, bw)."""
    n, h, w, c = images.shape
    bh, bw = h // p, w // p
    x = images[:, :bh * p, :bw * p].astype(np.float64).reshape(n, bh, p, bw, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * c), (bh, bw)


def _unblock(blocks: np.ndarray, images: np.ndarray, p: int, grid: tuple[int, int]) -> np.ndarray:
    """``images`` with the tiled area replaced by ``blocks`` (rounded to uint8); the remainder unchanged."""
    n, h, w, c = images.shape
    bh, bw = grid
    x = blocks.reshape(n, bh, bw, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, bh * p, bw * p, c)
    out = images.copy()
    out[:, :bh * p, :bw * p] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def _sample(x: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    return x if len(x) <= limit else x[np.random.default_rng(seed).choice(len(x), limit, replace=False)]


def _must_fit(cm: InputTransform, fitted: str, reference: ImageDataset | None, test: bool) -> bool:
    """Whether a transform fitted on the training set against clean images from elsewhere fits now: on the
    training set (a test set is transformed as fitted, after it)."""
    if test and getattr(cm, fitted, None) is not None:
        return False
    if reference is None:
        raise ConfigError(f"countermeasure {cm.name!r} needs clean images from elsewhere (the reference)")
    if test:
        raise ConfigError(f"countermeasure {cm.name!r}: transform the training set before the test set")
    return True


@register_countermeasure
class PCAExcess(InputTransform):
    """Project out the directions in which the published set's pixels (or p×p patches) vary more than clean
    images from elsewhere: generalized eigenvectors v of C_published v = λ C_clean v with λ ≥ ``ratio``, the
    ``k`` largest. The projection is fitted on the training set and applied to the test set too."""

    name = "pca"
    summary = ("project out the colour (patch=1) or patch directions where the published set varies more than "
               "clean images from elsewhere.")
    at_test = True
    params: ClassVar[dict[str, Param]] = {
        "patch": Param(int, 1, 1, 16, help="block size in pixels (1: colour directions)"),
        "k": Param(int, 3, 1, 256, help="at most this many directions"),
        "ratio": Param(float, 1.5, 1, 100, low_open=True, help="variance ratio above which a direction is excess"),
    }
    _SAMPLES = 200_000  # blocks used to estimate each covariance

    def fit(self, images: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """The orthonormal basis (D, m) of the excess directions (m may be 0)."""
        from scipy.linalg import eigh

        x, _ = _blocks(images, self.patch)
        r, _ = _blocks(reference, self.patch)
        cx, cr = np.cov(_sample(x, self._SAMPLES), rowvar=False), np.cov(_sample(r, self._SAMPLES), rowvar=False)
        cx, cr = np.atleast_2d(cx), np.atleast_2d(cr)
        lam, vec = eigh(cx, cr + 1e-6 * np.trace(cr) / len(cr) * np.eye(len(cr)))
        pick = [i for i in np.argsort(lam)[::-1][:self.k] if lam[i] >= self.ratio]
        self.found = [round(float(lam[i]), 3) for i in pick]  # diagnostics: the variance ratios removed
        if not pick:
            return np.zeros((x.shape[1], 0))
        q, _ = np.linalg.qr(vec[:, pick])
        return q

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        if _must_fit(self, "_basis", reference, test):
            self._basis, self._mean = self.fit(data.images, reference.images), None
        x, grid = _blocks(data.images, self.patch)
        if self._basis.shape[1] == 0:
            return data.images.copy()
        if self._mean is None:  # the training set's mean: its component along the basis is kept
            self._mean = x.mean(0)
        u = self._basis
        x = x - ((x - self._mean) @ u) @ u.T
        return _unblock(x, data.images, self.patch, grid)


def _excess_gain(pub: np.ndarray, ref: np.ndarray, k: int, ratio: float, zero: int) -> tuple[np.ndarray, int]:
    """Per-coefficient gains (same shape as the mean powers ``pub``, ``ref``; index (0, 0) is the mean and never
    touched): the ``k`` coefficients whose power ratio published / clean is largest and at least ``ratio`` get
    the Wiener gain P_clean / P_published (the expected natural coefficient given the published one), or 0 with
    ``zero``; every other coefficient 1. Also returns how many were picked (the diagnostics' ``found``)."""
    r = pub / np.maximum(ref, 1e-12)
    r[0, 0, :] = 0
    order = np.argsort(r, axis=None)[::-1][:k]
    pick = order[r.flat[order] >= ratio]
    gain = np.ones_like(r)
    gain.flat[pick] = 0 if zero else ref.flat[pick] / pub.flat[pick]
    return gain, len(pick)


@register_countermeasure
class SpectralExcess(InputTransform):
    """Shrink the 2-D Fourier frequencies (per channel) at which the published set's mean power exceeds clean
    images' from elsewhere by ``ratio`` or more, the ``k`` largest excesses: each such coefficient is scaled by
    P_clean / P_published (the Wiener gain: the expected natural coefficient), or set to zero (``zero=1``). The Fourier
    basis diagonalizes the covariance of stationary images, so this is the whole-image ``pca`` for patterns
    that repeat across the image: a tiled pattern, shifted per image or not, puts all its energy on the few
    frequencies of its period, where natural images have little. Fitted on the training set; applied to the
    test set as fitted."""

    name = "spectral"
    summary = ("shrink the Fourier frequencies where the published set has more power than clean images from "
               "elsewhere (removes tiled or periodic patterns).")
    at_test = True
    params: ClassVar[dict[str, Param]] = {
        "k": Param(int, 64, 1, 100_000, help="at most this many (channel, frequency) bins"),
        "ratio": Param(float, 2.0, 1, 1000, low_open=True, help="power ratio above which a bin is excess"),
        "zero": Param(int, 0, 0, 1, help="1: set the excess bins to zero instead of the Wiener shrink"),
    }

    @staticmethod
    def _power(images: np.ndarray) -> np.ndarray:
        f = np.fft.rfft2(images.astype(np.float64), axes=(1, 2))
        return (np.abs(f) ** 2).mean(0)  # (H, W//2+1, C)

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        if _must_fit(self, "_gain", reference, test):
            pub, ref = self._power(data.images), self._power(reference.images)
            self._gain, self.found = _excess_gain(pub, ref, self.k, self.ratio, self.zero)  # (0, 0): the mean colour
        h, w = data.images.shape[1:3]
        f = np.fft.rfft2(data.images.astype(np.float64), axes=(1, 2)) * self._gain
        x = np.fft.irfft2(f, s=(h, w), axes=(1, 2))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@register_countermeasure
class BlockDCTExcess(InputTransform):
    """The ``spectral`` comparison in JPEG's basis: the 8×8-block DCT coefficients (u, v, channel), on the grid
    of non-overlapping blocks from the top-left corner, at which the published set's mean power exceeds clean
    images' from elsewhere by ``ratio`` or more, the ``k`` largest excesses, shrunk by the Wiener gain or zeroed
    (``zero=1``) in every block. The attack of a hacker who knows a pattern is made of block-aligned DCT basis
    functions (the ``jpeg-patch`` protector) but not which ones. Fitted on the training set; applied to the
    test set as fitted. The block's mean (u = v = 0) is never touched."""

    name = "blockdct"
    summary = ("shrink the 8x8-block DCT coefficients where the published set has more power than clean images from "
               "elsewhere (removes block-aligned patterns).")
    at_test = True
    params: ClassVar[dict[str, Param]] = {
        "k": Param(int, 16, 1, 10_000, help="at most this many (u, v, channel) coefficients"),
        "ratio": Param(float, 1.2, 0, 1000, low_open=True,
                       help="power ratio above which a coefficient is excess (below 1: a blanket removal)"),
        "zero": Param(int, 1, 0, 1, help="1: set the excess coefficients to zero; 0: the Wiener shrink"),
    }

    @staticmethod
    def _coefficients(images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        x, grid = _blocks(images, 8)  # (N·bh·bw, 64·C), pixels (row, column, channel)
        x = x.reshape(len(x), 8, 8, -1)
        return scipy.fft.dctn(x, type=2, norm="ortho", axes=(1, 2)), grid

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        f, grid = self._coefficients(data.images)
        if _must_fit(self, "_gain", reference, test):
            pub, ref = (f ** 2).mean(0), (self._coefficients(reference.images)[0] ** 2).mean(0)  # (8, 8, C)
            self._gain, self.found = _excess_gain(pub, ref, self.k, self.ratio, self.zero)  # (0, 0): a block's mean
        x = scipy.fft.idctn(f * self._gain, type=2, norm="ortho", axes=(1, 2))
        return _unblock(x.reshape(len(x), -1), data.images, 8, grid)


@register_countermeasure
class KnownBasis(InputTransform):
    """Project the ±1 block patterns of ``grating``'s first ``bases`` JPEG bases
    (:func:`uge.protectors.noise.grating_patterns`) out of every 8×8 block of JPEG's grid, per channel: what a
    hacker who has read uge's code does to a ``grating`` set (Kerckhoffs: only the key is secret). With
    ``mix=false`` (the ladder's stage G2) each block's code is ±ρ times one of those patterns, so it lies in their
    span and goes, with that span of the image's own content. ``dct=1`` also
    projects out the DCT basis functions of those frequencies: 77 % of the energy of a code mixed from them with
    secret weights (``jpeg-patch`` with ``mix``) lies in the span of both (66 % in the sign patterns'; measured by
    ``scripts/knownbasis_check.py``)."""

    name = "knownbasis"
    summary = "project the default protection's block patterns (read off uge's code) out of every 8x8 block."
    at_test = True
    params: ClassVar[dict[str, Param]] = {
        "bases": Param(int, 10, 1, 63, help="how many of grating's bases (10 for up to 10 classes)"),
        "dct": Param(int, 0, 0, 1, help="1: also the DCT basis functions themselves (a code mixed from them)"),
    }

    def transform(self, images: np.ndarray) -> np.ndarray:
        from ..protectors.noise import grating_patterns

        span = grating_patterns(self.bases, dct=bool(self.dct)).double().reshape(-1, 64).numpy()
        q, _ = np.linalg.qr(span.T)  # (64, n): an orthonormal basis of their span
        x, grid = _blocks(images, 8)  # (N·bh·bw, 8·8·C): pixels (row, column, channel)
        x = x.reshape(len(x), 64, images.shape[-1])
        # the projector first, applied as one broadcast matmul: the first implementation (a three-operand einsum)
        # and the second (a two-operand one) were much slower; their images differ from this one's in about 0.1 %
        # of the values, by one level at rounding ties (scripts/knownbasis_check.py prints both)
        x = x - np.matmul(q @ q.T, x)
        return _unblock(x.reshape(len(x), -1), images, 8, grid)


@register_countermeasure
class KnownBand(InputTransform):
    """Zero every whole-image Fourier mode (fy, fx) with |fy|, |fx| ≤ ``fmax`` cycles per image, the mean colour
    excepted, per channel: ``knownbasis`` for uge's ``smooth`` code (stages H4–H7), whose class patterns are mixes
    of exactly those modes when its period is the image's side. A hacker who has read the code needs no statistics
    to find them, and removes the images' own coarse layout with them (what that costs is the floor)."""

    name = "knownband"
    summary = "zero the coarse Fourier modes that uge's smooth code is made of (read off uge's code)."
    at_test = True
    params: ClassVar[dict[str, Param]] = {
        "fmax": Param(int, 2, 1, 64, help="cycles per image along each axis (smooth's fmax)"),
    }

    def transform(self, images: np.ndarray) -> np.ndarray:
        h, w = images.shape[1:3]
        f = np.fft.rfft2(images.astype(np.float64), axes=(1, 2))
        fy, fx = np.abs(np.fft.fftfreq(h, 1 / h)), np.fft.rfftfreq(w, 1 / w)
        band = (fy[:, None] <= self.fmax) & (fx[None, :] <= self.fmax)
        band[0, 0] = False  # the mean colour stays
        f[:, band] = 0
        x = np.fft.irfft2(f, s=(h, w), axes=(1, 2))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@register_countermeasure
class LowBand(InputTransform):
    """Zero every 8×8-block DCT coefficient (v, u) with 1 ≤ v + u ≤ ``k`` on JPEG's grid, per channel; the block
    means stay: ``knownbasis`` for a noise confined to that band (``tap`` with ``band = k``), which a hacker who
    has read the code removes with the images' own coarse content within each block (what that costs is the
    floor). Only the block means and the finer frequencies are left."""

    name = "lowband"
    summary = "zero the low 8x8-block DCT frequencies a band-limited noise lives in (read off uge's code)."
    at_test = True
    params: ClassVar[dict[str, Param]] = {
        "k": Param(int, 4, 1, 14, help="the band: every coefficient with 1 <= v + u <= k"),
    }

    def transform(self, images: np.ndarray) -> np.ndarray:
        f, grid = BlockDCTExcess._coefficients(images)  # (blocks, 8, 8, C), indexed (row, column): v, u
        v, u = np.indices((8, 8))
        f[:, (v + u >= 1) & (v + u <= self.k)] = 0
        x = scipy.fft.idctn(f, type=2, norm="ortho", axes=(1, 2))
        return _unblock(x.reshape(len(x), -1), images, 8, grid)


def _class_pairs(cm: InputTransform, data: ImageDataset, reference: ImageDataset | None) -> list:
    """(the training images' mask, the reference's mask) of each class the training set has, for a comparison with
    labelled clean images from elsewhere; ConfigError without a reference, or where it lacks one of those classes."""
    if reference is None:
        raise ConfigError(f"countermeasure {cm.name!r} needs clean images from elsewhere (the reference)")
    pairs = []
    for c in np.unique(data.labels):
        theirs = reference.labels == c
        if not theirs.any():
            raise ConfigError(f"countermeasure {cm.name!r}: the clean images from elsewhere have no image of "
                              f"class {data.classes[c]!r}")
        pairs.append((data.labels == c, theirs))
    return pairs


@register_countermeasure
class ClassBlockDCT(BlockDCTExcess):
    """``blockdct`` per class: in each class's training images, the 8×8-block DCT coefficients (u, v, channel)
    whose power differs from the same class's clean images from elsewhere by a factor of ``ratio`` or more, up
    or down (the ``k`` largest differences per class), are rescaled to the clean class's power. The attack on a
    code that matches the whole set's power but not each class's (``jpeg-patch`` with ``matched``): a
    class-wise shortcut is a class-conditional difference, and this compares exactly that. It needs labelled
    clean images of the same classes (the reference's labels); test images are left unchanged (their labels are
    what is asked)."""

    name = "classdct"
    summary = ("rescale, per class, the 8x8-block DCT coefficients whose power differs from the same class's clean "
               "images from elsewhere (removes class-wise codes that match the whole set's power).")
    at_test = False
    params: ClassVar[dict[str, Param]] = {
        "k": Param(int, 16, 1, 10_000, help="at most this many (u, v, channel) coefficients per class"),
        "ratio": Param(float, 1.3, 1, 1000, low_open=True, help="power ratio (either way) that is rescaled"),
    }

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        if test:
            return data.images.copy()
        pairs = _class_pairs(self, data, reference)
        f, grid = self._coefficients(data.images)
        r, _ = self._coefficients(reference.images)
        per_image = grid[0] * grid[1]
        self.found = 0
        for mine, theirs in pairs:
            mine, theirs = np.repeat(mine, per_image), np.repeat(theirs, per_image)  # image masks → block masks
            pub, ref = (f[mine] ** 2).mean(0), (r[theirs] ** 2).mean(0)
            change = np.abs(np.log(np.maximum(pub, 1e-12) / np.maximum(ref, 1e-12)))
            change[0, 0, :] = 0  # a block's mean stays
            order = np.argsort(change, axis=None)[::-1][:self.k]
            pick = order[change.flat[order] >= np.log(self.ratio)]
            gain = np.ones_like(pub)
            gain.flat[pick] = np.sqrt(ref.flat[pick] / np.maximum(pub.flat[pick], 1e-12))
            f[mine] *= gain
            self.found += len(pick)
        x = scipy.fft.idctn(f, type=2, norm="ortho", axes=(1, 2))
        return _unblock(x.reshape(len(x), -1), data.images, 8, grid)


@register_countermeasure
class ClassMean(InputTransform):
    """Subtract from every training image ``strength`` × (its class's mean image − the mean image of the set):
    a class-wise additive pattern is exactly such a class-mean difference (so is some real class content)."""

    name = "classmean"
    summary = "subtract each class's mean deviation from the set's mean image (removes class-wise patterns)."
    params: ClassVar[dict[str, Param]] = {
        "strength": Param(float, 1.0, 0, 1, low_open=True, help="fraction of the class-mean deviation removed")}

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        x = data.images.astype(np.float64)
        overall = x.mean(0)
        for c in range(data.num_classes):
            idx = data.labels == c
            if idx.any():
                x[idx] -= self.strength * (x[idx].mean(0) - overall)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@register_countermeasure
class ClassReference(InputTransform):
    """Subtract from every training image ``strength`` × its class's excess mean: the class's mean published image
    minus the same class's mean clean image from elsewhere, averaged over ``cell``×``cell`` cells (from the top
    left). ``classmean`` removes what the class means differ by, the classes' own mean content with the code (on
    clean data it costs the hacker much); this removes only what they differ by from clean images of the same
    class. The reference's few images make a per-pixel difference noisy, and that noise, subtracted from a whole
    class, is itself a class-wise pattern: the cells average it down. Needs labelled clean images; test images
    are left unchanged (their labels are what is asked)."""

    name = "classref"
    summary = ("subtract each class's mean excess over the same class's clean images from elsewhere, averaged over "
               "cells (removes class-wise patterns, not the classes' own content).")
    params: ClassVar[dict[str, Param]] = {
        "cell": Param(int, 8, 1, 256, help="cell side in pixels over which the difference is averaged (1: per pixel)"),
        "strength": Param(float, 1.0, 0, 1, low_open=True, help="fraction of the excess mean removed"),
    }

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        if test:
            return data.images.copy()
        pairs = _class_pairs(self, data, reference)
        x = data.images.astype(np.float64)
        ref = reference.images.astype(np.float64)
        for mine, theirs in pairs:
            x[mine] -= self.strength * _cell_means(x[mine].mean(0) - ref[theirs].mean(0), self.cell)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _cell_means(image: np.ndarray, cell: int) -> np.ndarray:
    """(H, W, C) → the same shape, each ``cell``×``cell`` cell (the last ones may be smaller) set to its mean."""
    out = np.empty_like(image)
    for y in range(0, image.shape[0], cell):
        for x in range(0, image.shape[1], cell):
            out[y:y + cell, x:x + cell] = image[y:y + cell, x:x + cell].mean((0, 1))
    return out


@register_countermeasure
class OrthogonalProjection(InputTransform):
    """Sandoval-Segura et al. (NeurIPS 2023), Algorithm 1: a bias-free linear (softmax) classifier fitted on the
    flattened training images, the span of its K weight rows QR-orthonormalized and projected out of every
    training image (test images unchanged, as in the paper)."""

    name = "orthogonal"
    summary = "fit a linear classifier on the published images and project its weight span out (Sandoval-Segura 2023)."
    params: ClassVar[dict[str, Param]] = {
        "steps": Param(int, 300, 1, 10_000, help="full-batch optimizer steps of the linear model"),
        "lr": Param(float, 0.1, 0, 10, low_open=True, help="Adam step size"),
    }

    def linear_weights(self, data: ImageDataset) -> torch.Tensor:
        """The (K, D) weights of a bias-free softmax regression on the images in [0, 1], seeded."""
        x = torch.from_numpy(data.images.reshape(len(data), -1)).float() / 255
        y = torch.from_numpy(data.labels).long()
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(data.num_classes, x.shape[1], generator=g) * 1e-3).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.lr / x.shape[1] ** 0.5)
        for _ in range(self.steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x @ w.T, y).backward()
            opt.step()
        self.linear_acc = float(((x @ w.T).argmax(1) == y).float().mean()) * 100  # diagnostics
        return w.detach()

    def basis(self, data: ImageDataset) -> torch.Tensor:
        """The (D, K) orthonormal basis of the linear classifier's weight span (QR)."""
        return torch.linalg.qr(self.linear_weights(data).double().T)[0]

    @staticmethod
    def project_out(images: np.ndarray, q: torch.Tensor) -> np.ndarray:
        """``images`` (uint8, N×H×W×C) with the span of ``q`` removed, rounded back to uint8."""
        x = torch.from_numpy(images.reshape(len(images), -1)).double() / 255
        x = x - (x @ q) @ q.T
        return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy().reshape(images.shape)

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        return self.project_out(data.images, self.basis(data))
