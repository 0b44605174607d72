"""Convolution-based unlearnable datasets (CUDA): Sadasivan et al., "CUDA: Convolution-based Unlearnable
Datasets", CVPR 2023."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import ImageDataset
from ..params import param
from ..result import Protection
from .base import Protector, chunked_result, register_protector


@register_protector
@dataclass
class ConvolutionFilters(Protector):
    """Blur every image of class c with that class's random filter; no network, no optimization.

    Each class c draws one k×k filter per colour channel from the seed (the "private key"): off-centre
    weights uniform in [0, ``blur``], centre weight 1, normalized to sum 1 so the mean brightness stays.
    Networks learn the filter–label relation instead of the image content (Sadasivan et al., Sec. 3).
    Paper (CIFAR-10): k = 3, blur parameter 0.3. Image borders are padded by replication (our choice).

    Not norm-bounded (``norm_bounded = False``, ``rho = None``): published sets report PSNR and SSIM to
    the originals instead of an L∞ distance.
    """

    name = "cuda"
    title = "Convolution-based unlearnable dataset, class-wise filters (Sadasivan et al., CVPR 2023)"
    norm_bounded: ClassVar[bool] = False
    streams: ClassVar[bool] = True
    rho: ClassVar[None] = None
    kernel_size: int = param(3, low=3, odd=True)
    blur: float = param(0.3, low=0, high=1, low_open=True)

    def filters(self, num_classes: int, channels: int, seed: int = 0) -> torch.Tensor:
        """The class filters, (K, C, k, k) float64, each summing to 1 (the same seed gives the same filters)."""
        k = self.kernel_size
        w = np.random.default_rng(seed).uniform(0, self.blur, (num_classes, channels, k, k))
        w[:, :, k // 2, k // 2] = 1.0
        return torch.from_numpy(w / w.sum(axis=(2, 3), keepdims=True))

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        # On the CPU in float64: cheap (one small convolution per image), and identical on every machine.
        weights, p, c = self.filters(data.num_classes, data.channels, seed), self.kernel_size // 2, data.channels

        def protect_chunk(start: int, chunk: np.ndarray) -> np.ndarray:
            images = torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2)))
            labels = torch.from_numpy(data.labels[start:start + len(chunk)])
            out = torch.empty_like(images)
            for y in range(data.num_classes):
                idx = (labels == y).nonzero().flatten()
                if len(idx):
                    x = F.pad(images[idx].double() / 255, (p, p, p, p), mode="replicate")
                    blurred = F.conv2d(x, weights[y].unsqueeze(1), groups=c)  # one filter per channel
                    out[idx] = torch.round(blurred.clamp(0, 1) * 255).to(torch.uint8)
            return out.permute(0, 2, 3, 1).numpy()
        return chunked_result(self, data, protect_chunk, seed, work_dir)
