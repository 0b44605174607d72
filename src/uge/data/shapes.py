"""``shapes``: a synthetic 32×32 RGB set of ten simple objects, generated in code (no files, no network).

The built-in colour set of the demo and the tests. Real photo sets (CIFAR) are never copied into the
repository, so this one is drawn deterministically from a fixed seed: each image is one object — a disc,
square, triangle, ring, cross, horizontal bar, vertical bar, diamond, ellipse or L-shape — at a random
position, size, small rotation and colour, over a smooth random colour field with pixel noise. The same
bytes come out on every machine (NumPy's PCG64 stream of ``SeedSequence([seed, split])``).

Sizes: ``train`` 200 images per class (2,000), ``test`` 100 per class (1,000), class-balanced, labels in
class order repeated (0, 1, …, 9, 0, 1, …). The draws are wide enough (low-contrast objects, objects partly
outside the image, bars and ellipses that resemble each other) that a small CNN learns it well but not
perfectly in a few epochs.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from .dataset import ImageDataset

SIZE = 32
PER_CLASS = {"train": 200, "test": 100}
SEED = 2024
_SPLIT_IDS = {"train": 0, "test": 1}


# Each shape: a signed distance (pixels; negative inside) over the object's frame, where (u, v) are the pixel
# offsets from its centre, rotated, and s its half-size.
def _box(u, v, a, b):
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _triangle(u, v, s):
    # an upward equilateral triangle: the largest of its three edges' half-plane distances
    edges = [(0.0, 1.0, -0.5 * s), (-0.866, -0.5, -0.5 * s), (0.866, -0.5, -0.5 * s)]
    return np.max([nx * u + ny * v + c for nx, ny, c in edges], axis=0)


SHAPES = {
    "disc": lambda u, v, s: np.hypot(u, v) - s,
    "square": lambda u, v, s: _box(u, v, 0.8 * s, 0.8 * s),
    "triangle": _triangle,
    "ring": lambda u, v, s: np.abs(np.hypot(u, v) - 0.75 * s) - 0.25 * s,
    "cross": lambda u, v, s: np.minimum(_box(u, v, s, 0.28 * s), _box(u, v, 0.28 * s, s)),
    "horizontal-bar": lambda u, v, s: _box(u, v, s, 0.3 * s),
    "vertical-bar": lambda u, v, s: _box(u, v, 0.3 * s, s),
    "diamond": lambda u, v, s: (np.abs(u) + np.abs(v) - s) * 0.707,
    "ellipse": lambda u, v, s: (np.hypot(u / 1.0, v / 0.55) - s) * 0.55,
    "L-shape": lambda u, v, s: np.minimum(_box(u + 0.55 * s, v, 0.3 * s, s), _box(u, v - 0.7 * s, 0.85 * s, 0.3 * s)),
}
CLASSES = list(SHAPES)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field: a 4×4 grid of random colours, bilinearly upsampled to 32×32 (float, 0–255)."""
    grid = rng.uniform(30, 225, (4, 4, 3))
    t = np.linspace(0, 3, SIZE)
    i0 = np.minimum(t.astype(int), 2)
    f = (t - i0)[:, None]
    rows = grid[i0] * (1 - f[..., None]) + grid[i0 + 1] * f[..., None]  # (32, 4, 3)
    return rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]


def _image(rng: np.random.Generator, shape: str) -> np.ndarray:
    """One 32×32×3 uint8 image of ``shape``."""
    s = rng.uniform(5.0, 11.0)
    cy, cx = rng.uniform(s * 0.6, SIZE - s * 0.6, 2)
    angle = rng.uniform(-0.35, 0.35)  # ±20°: a square stays a square, not a diamond
    y, x = np.mgrid[:SIZE, :SIZE] + 0.5
    c, si = np.cos(angle), np.sin(angle)
    u, v = c * (x - cx) + si * (y - cy), -si * (x - cx) + c * (y - cy)
    alpha = np.clip(0.5 - SHAPES[shape](u, v, s), 0.0, 1.0)[..., None]  # anti-aliased edge
    bg = _background(rng)
    # the object's colour: each channel in the half away from the background's at its centre, so that it shows
    under = bg[int(min(cy, SIZE - 1)), int(min(cx, SIZE - 1))] > 127.5
    colour = rng.uniform(0, 110, 3) + np.where(under, 0.0, 145.0)
    texture = rng.normal(0, 12, (SIZE, SIZE, 3))
    img = bg * (1 - alpha) + colour * alpha + texture
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_shapes(split: str = "train", per_class: int | None = None, seed: int = SEED) -> ImageDataset:
    """The ``split`` of ``shapes``: ``per_class`` images of each class (default :data:`PER_CLASS`), from ``seed``."""
    if split not in _SPLIT_IDS:
        raise DataError(f"shapes has splits 'train' and 'test', not {split!r}")
    n = (PER_CLASS[split] if per_class is None else int(per_class)) * len(CLASSES)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split]]))
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    images = np.stack([_image(rng, CLASSES[y]) for y in labels])
    return ImageDataset(images, labels, CLASSES)


def load_shapes(source, split: str, **_) -> ImageDataset:
    """The loaders' entry (``load_dataset("shapes", split)``)."""
    return make_shapes(split)
