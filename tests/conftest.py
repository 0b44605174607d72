"""Shared tiny fixtures for the training / protect / publish / CLI tests.

Everything here is sized for a loaded 2-core CPU: 8x8 digits, 100-image subsets, 1-2 epoch recipes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread: the tests' networks are tiny, and on a machine that is busy with other work two
# threads fight over the cores (a 1-second training run becomes a 20-second one). UGE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("UGE_TEST_THREADS", "1")))

from uge.config import AuthorizedSpec, ProtectConfig
from uge.data import ImageDataset, load_splits
from uge.training import Recipe

TINY_RECIPE = {"epochs": 2, "batch_size": 32, "lr": 0.05, "flip": False}


def rehash(path: Path) -> None:
    """Regenerate a published set's checksums.sha256 over every file, as a careful forger would."""
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "checksums.sha256")
    (path / "checksums.sha256").write_text(
        "".join(f"{hashlib.sha256((path / f).read_bytes()).hexdigest()}  {f}\n" for f in files))


def tiny_config(**overrides) -> ProtectConfig:
    """The smallest protect config that still runs every stage (trajectory, encoder, generator)."""
    kw = {"authorized": [AuthorizedSpec("cnn", 0)], "recipe": Recipe(**TINY_RECIPE), "trajectory_epochs": 2,
          "generator_epochs": 1, "generator_width": 4, "generator_batch_size": 32, "encoder_arch": "lenet",
          "encoder_recipe": Recipe(epochs=1, batch_size=32, flip=False)}
    kw.update(overrides)
    return ProtectConfig.from_dict(kw)  # flat keys, as on the command line


@pytest.fixture(scope="session")
def digits_splits() -> tuple[ImageDataset, ImageDataset]:
    """scikit-learn's digits: (train 1437, test 360) images of 8x8x1."""
    return load_splits("digits")


@pytest.fixture(scope="session")
def digits_small(digits_splits) -> ImageDataset:
    """100 training digits, 10 per class (the same subset ``--per-class 10`` selects)."""
    return digits_splits[0].per_class(10)


def random_dataset(n=40, size=8, channels=1, num_classes=4, seed=0) -> ImageDataset:
    """Synthetic uint8 images with every class present (labels cycle through the classes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    return ImageDataset(images, labels, [f"c{i}" for i in range(num_classes)])
