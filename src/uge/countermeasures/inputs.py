"""Input transforms: applied once to the training images before training (uint8 in, uint8 out).

These are the "image shortcut squeezing" defences against availability poisons (Liu et al., "Image
Shortcut Squeezing: Countering Perturbative Availability Poisons with Compression", ICML 2023): lossy
compression, grayscale, bit-depth reduction and blur remove much of a small, high-frequency perturbation.
"""
from __future__ import annotations

import io
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .registry import InputTransform, Param, register_countermeasure

_CHUNK = 4096  # images per chunk for the tensor transforms (bounded memory on 50k-image sets)


@register_countermeasure
class JPEG(InputTransform):
    """JPEG compression and decompression of every image with Pillow at quality Q (10 = strongest)."""

    name = "jpeg"
    summary = "JPEG-compress every training image at the given quality (Pillow)."
    params: ClassVar[dict[str, Param]] = {
        "quality": Param(int, 10, 10, 95, help="JPEG quality; lower removes more")}
    offset = 0  # pixels by which JPEG's 8x8 block grid is moved (see ShiftedJPEG)

    def transform(self, images: np.ndarray) -> np.ndarray:
        out = np.empty_like(images)
        gray = images.shape[-1] == 1
        o, (h, w) = self.offset, images.shape[1:3]
        for i, img in enumerate(images):
            if o:  # the grid moves by o: pad by reflection, compress, crop back
                img = np.pad(img, ((o, 8 - o), (o, 8 - o), (0, 0)), mode="reflect")
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if gray else img).save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            dec = np.asarray(Image.open(buf).convert("L" if gray else "RGB"))
            out[i] = (dec[..., None] if gray else dec)[o:o + h, o:o + w]
        return out


@register_countermeasure
class ShiftedJPEG(JPEG):
    """JPEG on a block grid moved by ``offset`` pixels down and right (the image padded by reflection, compressed
    and cropped back): a hacker's answer to a pattern aligned with JPEG's 8×8 blocks, which JPEG on the usual
    grid keeps (the ``jpeg-patch`` protector)."""

    name = "jpeg-grid"
    summary = "JPEG-compress every training image on an 8x8 grid moved by OFFSET pixels (against block-aligned patterns)."
    params: ClassVar[dict[str, Param]] = {
        **JPEG.params, "offset": Param(int, 4, 1, 7, help="pixels by which the 8x8 block grid is moved")}


@register_countermeasure
class Grayscale(InputTransform):
    """Luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B), copied to every channel so the network is unchanged.

    A network trained on grayscale images is also tested on grayscale images (``at_test``): the hacker
    puts the conversion into their input pipeline. One-channel data is left as it is.
    """

    name = "grayscale"
    summary = "convert training (and test) images to grayscale, kept at the original channel count."
    at_test = True

    def transform(self, images: np.ndarray) -> np.ndarray:
        if images.shape[-1] == 1:
            return images.copy()
        luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        g = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], images.shape[-1], axis=-1)


@register_countermeasure
class BitDepth(InputTransform):
    """Bit-depth reduction: every channel rounded to ``bits`` bits, 2**bits evenly spaced levels from 0 to 255
    (APBench's setting: 2 bits). A perturbation smaller than half a level's step survives only where it moves a
    pixel across a rounding threshold. Test images are reduced too (``at_test``): the hacker's input pipeline
    posterizes every image it sees, so training and test look alike.
    """

    name = "bitdepth"
    summary = "reduce every training (and test) image to BITS bits per channel (bit-depth reduction)."
    params: ClassVar[dict[str, Param]] = {
        "bits": Param(int, 2, 1, 7, help="bits per channel kept; fewer removes more")}
    at_test = True

    def transform(self, images: np.ndarray) -> np.ndarray:
        step = 255 / (2 ** self.bits - 1)
        return np.clip(np.rint(np.rint(images / step) * step), 0, 255).astype(np.uint8)


@register_countermeasure
class Blur(InputTransform):
    """Gaussian blur with standard deviation ``sigma`` pixels and an odd ``kernel`` size (default
    2·ceil(3σ)+1, which holds 99.7 % of the mass); borders replicate the edge pixels, so any kernel fits
    any image size."""

    name = "blur"
    summary = "Gaussian-blur every training image."
    params: ClassVar[dict[str, Param]] = {
        "sigma": Param(float, 1.0, 0, 10, low_open=True, help="standard deviation in pixels"),
        "kernel": Param(int, None, 3, 61, odd=True, help="kernel size; auto = 2*ceil(3*sigma)+1"),
    }

    def resolve(self, values: dict) -> dict:
        if values["kernel"] is None:
            values["kernel"] = min(61, 2 * math.ceil(3 * values["sigma"]) + 1)
        return values

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """Blur float images (B, C, H, W); separable, depthwise, replicate padding."""
        r = self.kernel // 2
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / self.sigma) ** 2)
        k = k / k.sum()
        c = x.shape[1]
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def transform(self, images: np.ndarray) -> np.ndarray:
        out = np.empty_like(images)
        for i in range(0, len(images), _CHUNK):
            x = torch.from_numpy(images[i:i + _CHUNK]).permute(0, 3, 1, 2).double()
            y = self.blur(x).round().clamp(0, 255).to(torch.uint8)
            out[i:i + _CHUNK] = y.permute(0, 2, 3, 1).numpy()
        return out
