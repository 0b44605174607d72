"""Uniform random noise: the control of every unlearnable-example comparison."""
from __future__ import annotations

import dataclasses
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..params import budget, param
from ..pgd import block_dct, block_idct
from ..result import Protection, quantize
from .base import Protector, chunked_result, noise_chunk, register_protector


@register_protector
@dataclass
class RandomNoise(Protector):
    """Sample-wise noise drawn uniformly from [−ρ, ρ] per pixel, then rounded to 8 bits within the budget.

    Random noise of the unlearnable-example budget (ρ = 8/255) barely changes what networks learn
    (Huang et al., ICLR 2021, Table 1), which is what makes it the control.
    """

    name = "random"
    title = "Uniform random noise in the L-infinity ball (control)"
    streams: ClassVar[bool] = True
    rho: float = budget(8 / 255)

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        (h, w), c = data.image_size, data.channels
        g = torch.Generator().manual_seed(seed)  # uge.pgd.uniform_start's draws, chunk after chunk

        def delta_of(start: int, k: int) -> torch.Tensor:
            return (torch.rand((k, c, h, w), generator=g) * 2 - 1) * self.rho
        return chunked_result(self, data, noise_chunk(self.rho, delta_of), seed, work_dir)


@register_protector
@dataclass
class TiledPatch(Protector):
    """Class-wise synthetic noise that survives random crops and flips: one random ±ρ patch of ``size``×``size``
    pixels per class, tiled over the whole image (the synthetic shortcuts of Yu et al., KDD 2022).

    A pattern over the whole image is shifted by the recipe's random crop and mirrored by its flip, so a
    network cannot key on fixed pixel positions; a small periodic tile looks the same after any shift by
    its period and is found by convolutions anywhere. The selectivity bench's positive control: it must
    lower every network, the authorized one included. ``block`` > 1 makes the patch of block×block cells of
    one sign (coarse): a pattern of single pixels is averaged away by LeNet's pooling, 8-px cells are not.
    """

    name = "patch"
    title = "Class-wise tiled ±ρ patches (synthetic shortcut; positive control)"
    streams: ClassVar[bool] = True
    rho: float = budget(8 / 255)
    size: int = param(8, low=1, high=64, note="pixels")
    block: int = param(1, low=1, note="(a divisor of size)")  # cell size in pixels
    luminance: bool = False  # one sign for every channel of a cell: the pattern survives grayscale conversion
    shift: bool = False  # each image's tiling cyclically shifted by its own random offset (from the seed)
    signs: bool = False  # each image's pattern times its own random ±1: the class means hold nothing

    def cross_checks(self):
        return [] if self.size % self.block == 0 else [f"block must be a divisor of size={self.size}, got {self.block}"]

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        c = data.channels
        g = torch.Generator().manual_seed(seed)
        cells = self.size // self.block
        signs = torch.randint(0, 2, (data.num_classes, 1 if self.luminance else c, cells, cells), generator=g) * 2 - 1
        patches = (signs * self.rho).expand(-1, c, -1, -1)
        patches = patches.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)
        place = _placer(patches, data, self.size, 1, self.shift, g)
        if self.signs:  # drawn after the offsets, so a set without signs is the one it always was
            sign = torch.randint(0, 2, (len(data), 1, 1, 1), generator=g) * 2 - 1
            place = _signed(place, sign)
        return chunked_result(self, data, noise_chunk(self.rho, place), seed, work_dir)


def _signed(place, sign: torch.Tensor):
    """``place`` with image i's δ times ``sign[i]`` (±1)."""
    return lambda start, k: place(start, k) * sign[start:start + k]


@register_protector
@dataclass
class SmoothCode(Protector):
    """Class-wise smooth code of low spatial frequencies, cyclically shifted per image (issue 20's ladder, stage H4).

    Each class's pattern is a random mix (Gaussian weights from the seed) of every Fourier mode of a ``size``-px
    period with at most ``fmax`` cycles along each axis, one pattern for all channels (grayscale keeps it), scaled
    so that its extreme is ±ρ. It has no edges, so none of the power at high frequencies where natural images have
    little, where the Fourier comparison (``spectral``) found stage H3's square cells; its power lies where natural
    images have most, in the coarse content that JPEG's block means (and so the blanket ``blockdct`` removal)
    keep. Each image carries its class's pattern shifted cyclically by its own random offset (any pixel), so the
    class means and a linear classifier see only the pattern's mean, which is zero. ``matched`` shrinks each
    image's own content per Fourier frequency so that the set's power equals the clean set's (stage H6: the
    Fourier comparison then finds nothing; ``knownband`` still removes the code).
    """

    name = "smooth"
    title = "Class-wise smooth low-frequency ±ρ code, shifted per image"
    streams: ClassVar[bool] = True
    rho: float = budget(8 / 255)
    size: int = param(32, low=2, high=256, note="pixels (the period)")
    fmax: int = param(2, low=1, high=16, note="cycles per period")
    luminance: bool = True  # one pattern for every channel: grayscale conversion keeps it
    # a > 0: each pattern p becomes tanh(a·p) / tanh(a), flatter extremes and more power within ρ (stage H5)
    sharpness: float = param(0.0, low=0, high=50)
    # shrink every image's content per Fourier frequency so that the set's power equals the clean set's (stage H6)
    matched: bool = False

    def cross_checks(self):
        return [] if 2 * self.fmax < self.size else [f"fmax must be below size/2 = {self.size / 2:g}, got {self.fmax}"]

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        if self.matched and data.image_size != (self.size, self.size):
            raise ConfigError(f"protector 'smooth': matched needs size equal to the images' side (the code's modes "
                              f"are then the images' own Fourier frequencies), got size {self.size} for images of "
                              f"{data.image_size[0]}x{data.image_size[1]}")
        g = torch.Generator().manual_seed(seed)
        c = 1 if self.luminance else data.channels
        patterns = smooth_patterns(data.num_classes * c, self.size, self.fmax, g).view(-1, c, self.size, self.size)
        if self.sharpness > 0:
            patterns = torch.tanh(self.sharpness * patterns) / math.tanh(self.sharpness)
        patches = (patterns * self.rho).expand(-1, data.channels, -1, -1)
        place = _placer(patches, data, self.size, 1, True, g)
        content = _fourier_matcher(data, patches, place, self.rho) if self.matched else None
        return chunked_result(self, data, noise_chunk(self.rho, place, content), seed, work_dir)


def smooth_patterns(n: int, size: int, fmax: int, g: torch.Generator) -> torch.Tensor:
    """(n, size, size): random mixes of the Fourier modes (fy, fx) of period ``size`` with |fy|, |fx| ≤ ``fmax``
    (one of each ± pair, the mean excluded), complex Gaussian weights drawn from ``g``, each scaled to max |·| = 1."""
    modes = [(fy, fx) for fx in range(fmax + 1) for fy in range(-fmax, fmax + 1) if fx > 0 or fy > 0]
    f = torch.tensor(modes, dtype=torch.float64)  # (M, 2)
    yx = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).double()  # (2, S, S)
    phase = 2 * torch.pi * torch.einsum("md,dyx->myx", f, yx) / size
    w = torch.randn((n, len(modes), 2), generator=g, dtype=torch.float64)
    p = torch.einsum("nm,myx->nyx", w[..., 0], phase.cos()) - torch.einsum("nm,myx->nyx", w[..., 1], phase.sin())
    return (p / p.abs().amax((1, 2), keepdim=True)).float()


def _placer(patches: torch.Tensor, data: ImageDataset, size: int, step: int, shift: bool, g: torch.Generator):
    """``place(start, k)``: the δ of images start … start + k − 1, each its class's ``size``-px patch tiled over
    the image, cyclically shifted per image by an offset (dy, dx) drawn from ``g`` (for every image, now) among
    the multiples of ``step`` below ``size`` when ``shift``."""
    (h, w) = data.image_size
    reps = (1, 1, -(-h // size) + shift, -(-w // size) + shift)
    tiles = patches.repeat(*reps)  # one period more when shifted: every offset still covers the image
    labels = torch.from_numpy(data.labels).long()
    if not shift:
        return lambda start, k: tiles[:, :, :h, :w][labels[start:start + k]]
    # Per image, a cyclic shift of its class's tiling by (dy, dx): the class's pattern is no longer one fixed
    # image, so the class means and a linear classifier do not hold it (a key holder unseals).
    offsets = torch.randint(0, size // step, (len(data), 2), generator=g) * step

    def place(start: int, k: int) -> torch.Tensor:
        return torch.stack([tiles[y, :, dy:dy + h, dx:dx + w] for y, (dy, dx)
                            in zip(labels[start:start + k].tolist(), offsets[start:start + k].tolist())])
    return place


JPEG_FREQS = tuple(f"{u},{v}" for v in range(8) for u in range(8))


@register_protector
@dataclass
class JpegBlockPatch(Protector):
    """Class-wise tiled patterns made of JPEG's own 8×8 DCT basis, aligned with JPEG's blocks (issue 20's
    ladder): a pattern that JPEG compression keeps.

    Each 8×8 block of a class's ``size``-px tile is ±ρ times the sign of one DCT basis function
    cos((2x+1)uπ/16)·cos((2y+1)vπ/16), its (u, v) drawn from ``freqs`` and its sign at random, one sign for all
    channels (grayscale keeps it). JPEG quantizes each block's DCT coefficients; at quality 10 the steps of the
    low frequencies are 50–120, and a ±10-level sign pattern of the (4, 0) or (0, 4) basis puts about 80 on its
    coefficient, so it survives where the same 2-px stripes one pixel off the grid, or 2-px cells, lose about half
    (``scripts/perturbation_survival.py``). The per-image cyclic shifts are multiples of 8, which keeps the
    blocks aligned in the published images (a random crop during training shifts them afterwards, as for any
    pattern). A hacker who knows this compresses on a shifted grid: the battery's ``jpeg`` has an ``offset``.
    """

    name = "jpeg-patch"
    title = "Class-wise tiled ±ρ patterns of JPEG's 8×8 DCT basis, block-aligned"
    streams: ClassVar[bool] = True
    rho: float = budget(8 / 255)
    size: int = param(32, low=8, high=64, note="pixels (a multiple of 8)")
    freqs: list = param(default_factory=lambda: ["4,0", "0,4"], choices=JPEG_FREQS, many=True)  # DCT (u, v): u across, v down
    shift: bool = True  # each image's tiling cyclically shifted by its own random multiple of 8 pixels
    mix: bool = False  # each block the sign of a random combination of every basis in freqs (not one of them)
    distinct: bool = False  # no basis in two blocks (of any class): a random permutation of freqs, not draws
    signs: bool = False  # each image's pattern times its own random ±1: the class means hold nothing
    block_signs: bool = False  # every 8x8 block of every image times its own random ±1: no periodic spectrum
    flips: bool = False  # each image's pattern flipped up-down and left-right at random (the grid stays aligned)
    share: float = param(1.0, low=0, high=1, low_open=True)  # the code's amplitude, a fraction of rho
    matched: bool = False  # shrink every image's content so the set's block-DCT power equals the clean set's
    match_to: float = param(1.0, low=0.5, high=1)  # with matched: the power at the code's coefficients, × clean's

    def cross_checks(self):
        bad = [] if self.size % 8 == 0 else [f"size must be a multiple of 8, got {self.size}"]
        if self.matched and self.size != 8:
            bad.append(f"matched needs size = 8 (one block per class: every block carries the same code), got {self.size}")
        if self.match_to != 1 and not self.matched:
            bad.append(f"match_to={self.match_to} needs matched = true (it sets the matched power)")
        if self.mix and self.distinct != type(self).defaults()["distinct"]:  # never silently ignored
            bad.append(f"distinct={str(self.distinct).lower()} does nothing with mix = true (each class's pattern "
                       "is its own mix of every basis in freqs)")
        return bad

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        need = data.num_classes * (self.size // 8) ** 2
        if self.distinct and not self.mix and len(self.freqs) < need:
            raise ConfigError(f"protector 'jpeg-patch': distinct needs a basis per block, {need} for "
                              f"{data.num_classes} classes at size {self.size}; freqs has {len(self.freqs)}")
        g = torch.Generator().manual_seed(seed)
        k, blocks, n = data.num_classes, self.size // 8, len(data)
        uv = [tuple(map(int, f.split(","))) for f in self.freqs]
        if self.mix:  # a class's block: the sign of Σ_f c_f·basis_f, c ~ N(0, 1): energy on every listed frequency
            basis = torch.stack([_dct(u, v) for u, v in uv])  # (F, 8, 8)
            coef = torch.randn((k, blocks, blocks, len(uv)), generator=g)
            cells = _sign(torch.einsum("kyxf,fij->kyxij", coef, basis))
        else:
            basis = torch.stack([_sign(_dct(u, v)) for u, v in uv])
            which = torch.randperm(len(uv), generator=g)[:k * blocks ** 2].view(k, blocks, blocks) if self.distinct \
                else torch.randint(0, len(uv), (k, blocks, blocks), generator=g)
            sign = torch.randint(0, 2, (k, blocks, blocks), generator=g) * 2 - 1
            cells = basis[which] * sign[..., None, None]  # (K, by, bx, 8, 8)
        tiles = cells.permute(0, 1, 3, 2, 4).reshape(k, 1, self.size, self.size)
        patches = (tiles * self.rho * self.share).expand(-1, data.channels, -1, -1)
        place = _placer(patches, data, self.size, 8, self.shift, g)
        # every image's draws first, in this order (small: a few numbers per image), then δ chunk by chunk
        sign = torch.randint(0, 2, (n, 1, 1, 1), generator=g) * 2 - 1 if self.signs else None
        h, w = data.image_size
        blocks_sign = torch.randint(0, 2, (n, 1, -(-h // 8), -(-w // 8)), generator=g) * 2 - 1 \
            if self.block_signs else None
        flip = torch.randint(0, 2, (n, 2), generator=g).bool() if self.flips else None

        def delta_of(start: int, k: int) -> torch.Tensor:
            delta, part = place(start, k), slice(start, start + k)
            if sign is not None:
                delta = delta * sign[part]
            if blocks_sign is not None:  # a sign per 8x8 block spreads the tiling's comb of frequencies into bands
                delta = delta * blocks_sign[part].repeat_interleave(8, 2).repeat_interleave(8, 3)[:, :, :h, :w]
            if flip is not None:
                delta = torch.where(flip[part, 0, None, None, None], delta.flip(2), delta)
                delta = torch.where(flip[part, 1, None, None, None], delta.flip(3), delta)
            return delta
        content = power_matcher(data, _code_moment(data, patches), delta_of, self.rho, self.match_to) \
            if self.matched else None
        return chunked_result(self, data, noise_chunk(self.rho, delta_of, content), seed, work_dir)


# stage G2's bases: ten that JPEG at quality 10 keeps (chosen at stage D, results/ladder-grating-cpu/README.md)
G2_FREQS = ("1,0", "0,1", "3,0", "0,3", "4,0", "0,4", "1,1", "1,3", "3,1", "5,0")


@register_protector
@dataclass
class Grating(JpegBlockPatch):
    """The default protection, ``jpeg-patch`` with the settings of its variant in ``results/battery-cpu``, published
    sealed. Neither its worst case over that battery nor any other protection's measured meets issue 20's goal
    (the numbers: the README's table, and ``uge.standing``, which ``uge protect`` prints).

    Every 8×8 block of a class's images carries the class's own ±ρ pattern: the sign of a mix of ten JPEG basis
    functions (``freqs``, ones that JPEG at quality 10 keeps) with weights drawn from the run's seed (``mix``;
    sealed, the seed is the key's, so a hacker who has read this code knows the bases but not the patterns:
    ``knownbasis:dct=1`` removes 77 % of the code's energy, and what it costs clean data is the floor). Every
    block of every image has its own random sign (``block_signs``: neither the class means nor the spectrum show a
    periodic pattern), and each image's content is shrunk so that the set's block-DCT power equals the clean
    set's (``matched``: the excess-power attacks find nothing). It is not selective: every network, the owner's
    too, learns little from it, so key holders unseal the originals (``uge unseal``); ``uge protect`` seals it
    with a new key when ``--seal`` is not given. ``mix=false`` is the ladder's stage G2 (one basis per class, from
    a list a hacker can read here: ``knownbasis`` removes it); with more classes than ``freqs`` it takes the next
    lowest AC frequencies (at most 63 classes), where a mix needs none.
    """

    name = "grating"
    title = "Power-matched JPEG-basis grating, a secret mix per class and a sign per block (sealed; the default)"
    sealed: ClassVar[bool] = True
    rho: float = budget(0.04)
    size: int = param(8, low=8, high=8, note="pixels: one 8×8 block per class")
    freqs: list = param(default_factory=lambda: list(G2_FREQS), choices=JPEG_FREQS, many=True)
    shift: bool = False
    mix: bool = True
    distinct: bool = True
    signs: bool = True
    block_signs: bool = True
    matched: bool = True

    def protect(self, data: ImageDataset, **kw) -> Protection:
        if self.mix or data.num_classes <= len(self.freqs):
            return super().protect(data, **kw)
        wider = dataclasses.replace(self, freqs=grating_freqs(data.num_classes, self.freqs))
        return super(Grating, wider).protect(data, **kw)


def grating_freqs(n: int, freqs=G2_FREQS) -> list[str]:
    """The first ``n`` JPEG bases ``grating`` uses: ``freqs``, then the unused AC frequencies, lowest u + v first
    (ConfigError beyond the 63 AC bases)."""
    more = sorted(set(JPEG_FREQS) - set(freqs) - {"0,0"}, key=lambda f: (sum(map(int, f.split(","))), f[::-1]))
    if len(freqs) + len(more) < n:
        raise ConfigError(f"protector 'grating' codes at most {len(freqs) + len(more)} classes (a JPEG basis each), "
                          f"the set has {n}; choose another --method (--method list)")
    return [*freqs, *more][:max(n, len(freqs))]


def grating_patterns(n: int, dct: bool = False) -> torch.Tensor:
    """(n, 8, 8): the ±1 block patterns of the default ``grating``'s first ``n`` bases (what a hacker who has read
    this code knows; which class has which, and each block's sign, are drawn from the run's seed); with ``dct``,
    (2n, 8, 8): the DCT basis functions themselves too."""
    bases = [_dct(*map(int, f.split(","))) for f in grating_freqs(n)[:n]]
    return torch.stack([_sign(b) for b in bases] + (bases if dct else []))


def set_chunks(data: ImageDataset, published=None):
    """The set chunk by chunk as uint8 (k, C, H, W) tensors: the clean images, or with ``published`` = (delta_of,
    content, rho) as a matcher's pass publishes them (x + δ + the content's change, rounded within the budget)."""
    for start, chunk in data.chunks():
        x = torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2)))
        if published is not None:
            delta_of, content, rho = published
            x = quantize(x.float() / 255 + delta_of(start, len(x)) + content(start, x.float() / 255), x, rho)
        yield x


def _code_moment(data: ImageDataset, patches: torch.Tensor) -> torch.Tensor:
    """(8, 8, C, C): the second moment per block-DCT coefficient (v, u) of a code that gives each block of a class's
    images the class's 8×8 block ``patches`` (K, C, 8, 8) times a random sign, weighted by the classes' shares."""
    labels = torch.from_numpy(data.labels).long()
    share = torch.bincount(labels, minlength=data.num_classes).double() / len(labels)
    code = block_dct(patches.double() * 255)[:, :, 0, 0]  # (K, C, 8, 8) coefficients of each class's block
    return torch.einsum("k,kcvu,kdvu->vucd", share, code, code)


def delta_moment(delta: torch.Tensor) -> torch.Tensor:
    """(8, 8, C, C): the second moment per block-DCT coefficient (v, u) of a sample-wise ``delta`` (N, C, H, W) on
    the [0, 1] scale, in 8-bit units², over every block of JPEG's grid."""
    return _block_moment((d, d) for d in (part.detach().cpu().double() * 255 for part in delta.split(512)))


def content_cross(data: ImageDataset, delta: torch.Tensor) -> torch.Tensor:
    """(8, 8, C, C): E[y δᵀ] per block-DCT coefficient (v, u), y the clean images' coefficients over the channels
    and δ a sample-wise ``delta``'s (N, C, H, W, [0, 1] scale), in 8-bit units²: how much an optimized noise
    follows the content it was fitted to (:func:`power_matcher`'s ``cross``)."""
    def pairs():
        start = 0
        for x in set_chunks(data):
            yield x.double(), delta[start:start + len(x)].detach().cpu().double() * 255
            start += len(x)
    return _block_moment(pairs())


def _block_moment(chunks) -> torch.Tensor:
    """(8, 8, C, C): the mean over every block of JPEG's grid of a bᵀ per DCT coefficient (v, u), a and b a block's
    coefficient vectors over the channels, for (a, b) pairs of float64 (k, C, H, W) chunks of images."""
    m, blocks = 0, 0
    for a, b in chunks:
        y = block_dct(a)
        m = m + torch.einsum("ncyxvu,ndyxvu->vucd", y, y if b is a else block_dct(b))
        blocks += y.shape[0] * y.shape[2] * y.shape[3]
    return m / blocks


def power_matcher(data: ImageDataset, s: torch.Tensor, delta_of, rho: float, match_to: float = 1.0,
                   rounds: int = 3, cross: torch.Tensor | None = None):
    """``content(start, x)``: the change to images ``x`` (float (k, C, H, W) on the [0, 1] scale) that shrinks
    their content in JPEG's block-DCT basis so that the published set's second moment there, content plus the
    code ``delta_of``, equals the clean set's, per AC coefficient (v, u) as a C×C matrix over the channels. ``s``:
    the code's own moment (8, 8, C, C) in 8-bit units² (:func:`_code_moment`, :func:`delta_moment`).

    The excess-power attacks (``blockdct``, ``spectral``, ``pca``) compare exactly these moments with clean
    images from elsewhere. With M_vu the clean second moment and S_vu the code's (a random sign per block leaves
    a class code no cross term with the content), every block's coefficient vector y becomes T·y with
    T = (M − S)^½ M^−½, so T M Tᵀ = M − S and adding the code gives M back in expectation. A noise fitted to each
    image has a cross term X = E[y δᵀ] (``cross``, :func:`content_cross`): the published moment is then
    T M Tᵀ + T X + Xᵀ Tᵀ + S = (T + B) M (T + B)ᵀ − Xᵀ M⁻¹ X + S with B = Xᵀ M⁻¹, so
    T = (M − S + Xᵀ M⁻¹ X)^½ M^−½ − B. The budget's clipping
    and 8-bit rounding add power of their own: each of ``rounds`` passes over the set measures the published
    moment A and adds A − M to S. Where the code has more power than the content (M − S not positive), the
    content's direction is removed entirely and the excess that is left stays visible. ``match_to`` < 1 aims the
    coefficients that carry the code at that fraction of the clean power (a deficit, not a match: an attack that
    removes what has more power than clean images from elsewhere then passes them over)."""
    c = data.channels
    eye = torch.eye(c, dtype=torch.float64)
    t = None  # T − I per coefficient (8, 8, C, C): set by the passes below, before content is first called

    def content(start: int, x: torch.Tensor) -> torch.Tensor:
        y = block_dct(x.double() * 255)
        change = block_idct(torch.einsum("vucd,ndyxvu->ncyxvu", t, y)) / 255
        out = torch.zeros_like(x)
        out[..., :change.shape[-2], :change.shape[-1]] = change.float()
        return out

    def moment(published: bool) -> torch.Tensor:
        chunks = (x.double() for x in set_chunks(data, (delta_of, content, rho) if published else None))
        return _block_moment((x, x) for x in chunks)

    m = moment(False)
    target = m.clone()
    coded = s.diagonal(dim1=-2, dim2=-1).sum(-1) > 1e-3 * m.diagonal(dim1=-2, dim2=-1).sum(-1)
    target[coded] *= match_to
    w, q = torch.linalg.eigh(m)
    inv_root = q @ torch.diag_embed(w.clamp_min(1e-9).rsqrt()) @ q.transpose(-1, -2)
    b = None if cross is None else cross.transpose(-1, -2) @ inv_root @ inv_root  # Xᵀ M⁻¹
    for r in range(rounds + 1):
        if r:
            s = s + moment(True) - target
        w, q = torch.linalg.eigh(target - s if b is None else target - s + b @ cross)
        root = q @ torch.diag_embed(w.clamp_min(0).sqrt()) @ q.transpose(-1, -2)
        t = root @ inv_root - (eye if b is None else eye + b)
        t[0, 0] = 0  # the block's mean stays
    return content


def _fourier_matcher(data: ImageDataset, patches: torch.Tensor, delta_of, rho: float, rounds: int = 3):
    """``content(start, x)``: the change to images ``x`` (float (k, C, H, W) on the [0, 1] scale) that shrinks their
    content in the Fourier basis of the whole image so that the published set's mean power per (channel, frequency),
    content plus the code ``delta_of`` (each class's pattern ``patches`` of the images' size, cyclically shifted per
    image), equals the clean set's: the comparison that ``spectral`` makes, answered in advance.

    A cyclic shift changes only the phases, so the code's power per frequency is its class patterns' (S, class
    weighted), and an independent random shift leaves no cross term with the content. Each coefficient X becomes
    t·X with t = ((M − S) / M)^½, M the clean power; where the code has more power than the content (M ≤ S), t = 0
    and the excess stays visible. The budget's clipping and 8-bit rounding add power of their own: each of
    ``rounds`` passes measures the published power A and adds A − M to S (as :func:`power_matcher` does in JPEG's
    basis). The images' mean colour (frequency 0) stays."""
    labels = torch.from_numpy(data.labels).long()
    share = torch.bincount(labels, minlength=data.num_classes).double() / len(labels)
    s = torch.einsum("k,kchw->chw", share, torch.fft.rfft2(patches.double() * 255).abs() ** 2)  # (C, H, W//2+1)
    t = None  # the gain per (channel, frequency): set by the passes below, before content is first called

    def content(start: int, x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.rfft2(x.double())
        return torch.fft.irfft2(f * (t - 1), s=x.shape[-2:]).float()

    def power(published: bool) -> torch.Tensor:
        total, n = 0, 0
        for x in set_chunks(data, (delta_of, content, rho) if published else None):
            total = total + (torch.fft.rfft2(x.double()).abs() ** 2).sum(0)
            n += len(x)
        return total / n

    m = power(False)
    for r in range(rounds + 1):
        if r:
            s = s + power(True) - m
        t = ((m - s).clamp_min(0) / m.clamp_min(1e-9)).sqrt()
        t[:, 0, 0] = 1  # the mean colour stays
    return content


@functools.lru_cache(maxsize=None)
def jpeg_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(8, 8) each: the luminance and chrominance quantization tables Pillow's encoder uses at ``quality`` (read
    from a colour file it wrote)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG", quality=quality)
    tables = Image.open(buf).quantization
    return tuple(torch.tensor(list(tables[i]), dtype=torch.float32).reshape(8, 8) for i in (0, 1))


def jpeg_luma_table(quality: int) -> torch.Tensor:
    """(8, 8): the luminance quantization table Pillow's encoder uses at ``quality``."""
    return jpeg_tables(quality)[0]


ISS_GRADS = ("ste", "cubic")  # the gradients of JPEG's rounding in soft_iss and soft_jpeg


def _quantized(plane: torch.Tensor, table: torch.Tensor, grad: str) -> torch.Tensor:
    """``plane`` (N, C, H, W, on JPEG's centred 0–255 scale) through its 8×8 blocks' DCT quantized with ``table``
    and back. The forward pass rounds exactly; ``grad`` is the rounding's gradient: "ste" passes it as if there
    were no rounding (straight-through), "cubic" as that of round(y) + (y − round(y))³ (Shin & Song, 2017's JPEG
    approximation): 3(y − round(y))², zero for a coefficient at a quantization level and largest half-way between
    two, where a small change of the image flips what survives."""
    q = table.to(plane.device, plane.dtype)
    y = block_dct(plane) / q
    rounded = torch.round(y).detach()
    if grad == "cubic":
        cube = (y - rounded) ** 3  # forward: rounded (the cube cancels); gradient: 3(y − round(y))²
        y = rounded + cube - cube.detach()
    else:
        y = y + (rounded - y).detach()
    return block_idct(y * q)


_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))  # JFIF; row 0: luma
_FROM_YCC = torch.linalg.inv(torch.tensor(_TO_YCC))  # once, not in every PGD step


def soft_iss(x: torch.Tensor, quality: int = 10, grad: str = "ste") -> torch.Tensor:
    """ISS's grayscale + JPEG (countermeasure ``grayscale+jpeg``) as a differentiable function of x (B, C, H, W) in
    [0, 1]: BT.601 luma, each 8×8 block's DCT quantized with the encoder's table (``grad``: the rounding's gradient,
    see :func:`_quantized`), copied to every channel. Within a level or two of the real transform on natural images
    (Pillow's integer DCT and its rounding differ slightly)."""
    luma = x if x.shape[1] == 1 else torch.einsum("bchw,c->bhw", x, x.new_tensor(_TO_YCC[0]))[:, None]
    out = ((_quantized(luma * 255 - 128, jpeg_luma_table(quality), grad) + 128) / 255).clamp(0, 1)
    return out.expand(-1, x.shape[1], -1, -1)


def soft_jpeg(x: torch.Tensor, quality: int = 10, grad: str = "ste") -> torch.Tensor:
    """Colour JPEG (countermeasure ``jpeg``: Pillow's encoder, 4:2:0) as a differentiable function of RGB x
    (B, 3, H, W) in [0, 1]: JFIF YCbCr, the chroma planes averaged over 2×2 pixels, every plane's 8×8 blocks
    quantized with the encoder's luminance or chrominance table (:func:`_quantized`), the chroma brought back to full
    size bilinearly (the decoder's "fancy" upsampling: weights 3/4 and 1/4) and back to RGB. Within a few levels
    of the real transform on smooth images (an image's 2×2 chroma detail makes the upsampling's difference larger)."""
    m = x.new_tensor(_TO_YCC)
    ycc = torch.einsum("bchw,dc->bdhw", x * 255, m)
    luma_table, chroma_table = jpeg_tables(quality)
    y = _quantized(ycc[:, :1] - 128, luma_table, grad) + 128
    chroma = _quantized(F.avg_pool2d(ycc[:, 1:], 2), chroma_table, grad)  # centred: Cb, Cr without the +128
    ycc = torch.cat([y, F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)], 1)
    return (torch.einsum("bdhw,cd->bchw", ycc, _FROM_YCC.to(x)) / 255).clamp(0, 1)


def _dct(u: int, v: int) -> torch.Tensor:
    """JPEG's DCT basis function cos((2x+1)uπ/16)·cos((2y+1)vπ/16) on an 8×8 block (rows y, columns x)."""
    t = (2 * torch.arange(8, dtype=torch.float64) + 1) * torch.pi / 16
    return torch.outer(torch.cos(v * t), torch.cos(u * t)).float()


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)  # never 0: every pixel at ±ρ
