"""Keyed protection: a shortcut inside a colour direction that the authorized network cannot see.

The protector chooses the authorized network, so it gives it a fixed input stage that removes one colour
direction c from every pixel (``blind-<arch>``, :meth:`uge.models.Classifier.make_blind`) and puts the whole
perturbation along c: δ(pixel) = m(pixel)·c with an integer m. Then the authorized network sees exactly the
clean image, f(x + δ) = f(x), and trains as on clean data, while every other network sees δ, a class-wise
tiled pattern (a shortcut that survives random crops and flips, like the ``patch`` control). With c made of
small integers, x + δ lands exactly on the 8-bit grid: the published files carry no rounding error.

The mechanism in one line: the authorized network is blind to S = {δ : δ(pixel) ∥ c}, every δ lies in S.
It holds against hackers who train their own networks; one who copies the published input stage into
their own network is a partly authorized user (countermeasure ``copy-input``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..config import AuthorizedSpec
from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..models import create_model, list_models
from ..models.registry import BLIND, BLIND_DIRECTION
from ..params import budget, param
from ..result import Protection
from ..seeds import derive
from ..training import Recipe
from .base import Protector, chunked_result, register_protector


def keyed_levels(images: np.ndarray, m: np.ndarray, direction) -> np.ndarray:
    """The integer amplitudes ``m`` (N, H, W) of δ = m·c, clipped per pixel so that x + m·c stays within
    0..255 in every channel (a clipped δ stays in S; clipping each channel alone would leave it)."""
    c = np.asarray(direction, np.int64)
    m = m.astype(np.int64)
    x = images.astype(np.int64)  # (N, H, W, C)
    lo, hi = np.full(m.shape, np.iinfo(np.int64).min), np.full(m.shape, np.iinfo(np.int64).max)
    for i, ci in enumerate(c):  # 0 <= x_i + m c_i <= 255
        if ci > 0:
            lo, hi = np.maximum(lo, -(x[..., i] // ci)), np.minimum(hi, (255 - x[..., i]) // ci)
        elif ci < 0:
            lo, hi = np.maximum(lo, -((255 - x[..., i]) // -ci)), np.minimum(hi, x[..., i] // -ci)
    return np.clip(m, lo, hi)


def tiled_patterns(num_classes: int, h: int, w: int, size: int, block: int, seed: int) -> np.ndarray:
    """One random ±1 pattern per class, (K, H, W): a ``size``×``size`` tile of ``block``×``block`` cells,
    repeated over the image (so that it looks the same after a shift by its period)."""
    g = torch.Generator().manual_seed(seed)
    cells = size // block
    signs = torch.randint(0, 2, (num_classes, cells, cells), generator=g) * 2 - 1
    tile = signs.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return tile.repeat(1, -(-h // size), -(-w // size))[:, :h, :w].numpy().astype(np.int8)


def hadamard_codes(num_classes: int, cells: int) -> np.ndarray:
    """(K, cells) orthogonal ±1 codes: rows 1..K of the Sylvester–Hadamard matrix of order ``cells`` (a power
    of two; row 0, all ones, is a uniform colour shift and is skipped)."""
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < cells:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != cells or num_classes >= cells:
        raise ConfigError(f"teacher encoding needs a power-of-two number of cells above the {num_classes} classes, "
                          f"got {cells} ((size/block)²)")
    return h[1:num_classes + 1]


def teacher_cells(logits: np.ndarray, labels: np.ndarray, cells: int) -> np.ndarray:
    """Per image, the cell values (N, cells) in [−1, 1] that encode a teacher's logits linearly: each class's
    Hadamard code weighted by its standardized, centred logit plus one for the true class (so the strongest
    code is the label's, and a distilled student can read the teacher's other logits off the pattern too)."""
    t = logits - logits.mean(1, keepdims=True)
    z = t / t.std() + np.eye(logits.shape[1])[labels]
    v = z @ hadamard_codes(logits.shape[1], cells)
    return np.clip(v / np.percentile(np.abs(v), 99), -1, 1)


def _three_ints(d) -> bool:
    """Whether ``d`` is a colour direction of three integers, not all 0."""
    return isinstance(d, list) and len(d) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in d) \
        and any(d)


@register_protector
@dataclass
class Keyed(Protector):
    """A class-wise tiled pattern along colour direction ``direction``, which the published authorized
    network ``blind-<arch>`` (θ0 from ``init_seed``, trained with ``recipe``) cannot see."""

    name = "keyed"
    title = "Keyed protection: a shortcut the authorized network's input stage cannot see"
    streams: ClassVar[bool] = True
    rho: float = budget(0.04)
    # a registered network (not a blind one): its blind version is published
    arch: str = param("resnetc20", choices=list_models, note="(its blind version is published)")
    init_seed: int = 0
    direction: list = param(  # noqa: RUF009 (param() is a dataclasses.field with a spec)
        default_factory=lambda: list(BLIND_DIRECTION), test=_three_ints, words="three integers, not all 0",
        note="(none larger than the budget in 8-bit levels)")
    # a whole 32×32 image of 4×4 cells: LeNet learns it (tiled 8-px patterns it did not; results/keyed-probe)
    size: int = param(32, low=1, high=64, note="pixels")
    block: int = param(8, low=1, note="(a divisor of size)")
    # the published recipe (Recipe fields; default Recipe())
    recipe: dict = param(default_factory=dict, words="a table of Recipe fields")  # noqa: RUF009 (as above)
    # "label": one pattern per class; "teacher": per image, the logits of a reference authorized network (trained
    # by the protector with the published recipe, or loaded from ``reference``) coded over the cells, so that a
    # student distilled from an authorized network can read its targets off δ (issue 11: distillation)
    encode: str = param("label", choices=("label", "teacher"))
    reference: str | None = None

    def cross_checks(self):
        out = []
        if 255 * self.rho < max(map(abs, self.direction)):
            out.append(f"direction must have no entry larger than the budget in 8-bit levels (255·rho = "
                       f"{255 * self.rho:g}), got {self.direction!r}")
        if self.size % self.block:
            out.append(f"block must be a divisor of size={self.size}, got {self.block}")
        try:
            Recipe.from_dict(self.recipe)
        except ConfigError as e:
            out.append(f"recipe must be a table of Recipe fields ({e})")
        return out

    @property
    def max_step(self) -> int:
        """The largest integer m with |m·c_i| within the budget's 8-bit levels."""
        return int(np.floor(255 * self.rho + 1e-9)) // max(abs(v) for v in self.direction)

    def authorized_network(self, data: ImageDataset):
        """The published authorized network at θ0: ``blind-<arch>`` from ``init_seed``, blind along ``direction``."""
        if data.channels != 3:
            raise ConfigError("keyed protection needs RGB images (it hides the perturbation in a colour direction); "
                              "for grayscale data choose another method, e.g. --method patch (--method list)")
        return create_model(BLIND + self.arch, data.num_classes, 3, seed=self.init_seed).make_blind(self.direction)

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        start = time.perf_counter()
        net = self.authorized_network(data)
        (h, w) = data.image_size
        if self.encode == "label":
            patterns = tiled_patterns(data.num_classes, h, w, self.size, self.block, seed)

            def levels(a: int, k: int) -> np.ndarray:
                return patterns[data.labels[a:a + k]].astype(np.int64) * self.max_step
        else:  # one pattern per image: patterns indexed by the image's position
            cells = self.size // self.block
            v = teacher_cells(self._reference_logits(data, device, progress, seed), data.labels, cells * cells)
            amp = np.rint(v * self.max_step).astype(np.int64).reshape(len(data), cells, cells)

            def levels(a: int, k: int) -> np.ndarray:
                tile = amp[a:a + k].repeat(self.block, 1).repeat(self.block, 2)
                return np.tile(tile, (1, -(-h // self.size), -(-w // self.size)))[:, :h, :w]

        def protect_chunk(a: int, images: np.ndarray) -> np.ndarray:
            m = keyed_levels(images, levels(a, len(images)), self.direction)
            return (images.astype(np.int16) + m[..., None] * np.asarray(self.direction, np.int16)).astype(np.uint8)
        result = chunked_result(self, data, protect_chunk, seed, work_dir,
                                authorized=[AuthorizedSpec(arch=BLIND + self.arch, seed=self.init_seed)],
                                theta0=[net.state_dict()], recipe=Recipe.from_dict(self.recipe))
        result.seconds = {"protect": round(time.perf_counter() - start, 3)}
        return result

    def _reference_logits(self, data: ImageDataset, device, progress: bool, seed: int) -> np.ndarray:
        """Logits on ``data`` of a reference authorized network: loaded from ``reference``, or θ0 trained by the
        published recipe with another seed than the user's (what any authorized network will roughly say)."""
        from ..training import predict, train
        from ..utils import resolve_device
        from ..weights import load_into

        net = self.authorized_network(data)
        if self.reference:
            load_into(net, self.reference)
        else:
            train(net, data, Recipe.from_dict(self.recipe), device=device, seed=derive(seed, "reference"), progress=progress,
                  desc="keyed: reference network")
        net.to(resolve_device(device))
        if not data.stored:
            return predict(net, data.tensors("cpu")[0]).cpu().numpy()
        return np.concatenate([predict(net, torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).cpu().numpy()
                               for _, x in data.chunks()])
