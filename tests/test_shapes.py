"""Issue 21: ``shapes``, the built-in synthetic RGB set: deterministic, class-balanced, 32×32×3, learnable."""
from __future__ import annotations

import numpy as np

from uge.data import load_dataset, load_splits
from uge.data.shapes import CLASSES, make_shapes


def test_shapes_is_deterministic_class_balanced_32x32_rgb():
    train, test = load_splits("shapes")
    assert train.images.shape == (2000, 32, 32, 3) and test.images.shape == (1000, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.classes == CLASSES and len(CLASSES) == 10
    assert np.bincount(train.labels).tolist() == [200] * 10 and np.bincount(test.labels).tolist() == [100] * 10
    again = load_dataset("shapes", "train")
    assert again.images.tobytes() == train.images.tobytes() and np.array_equal(again.labels, train.labels)
    assert not np.array_equal(train.images[:1000], test.images)  # two draws, not one
    assert 40 < train.images.std() < 90  # a textured picture, not flat colour or noise


def test_shapes_objects_differ_from_their_background():
    """Every class is drawn: the mean image of a class differs from the mean of the others (the object)."""
    data = make_shapes("test", per_class=20)
    means = np.stack([data.images[data.labels == c].mean(0) for c in range(10)])
    gaps = [np.abs(means[c] - np.delete(means, c, 0).mean(0)).mean() for c in range(10)]
    assert min(gaps) > 1.0


def test_a_small_network_learns_shapes_above_chance_in_two_epochs():
    from uge.models.registry import create_model
    from uge.training import Recipe, accuracy, train

    data, test = make_shapes("train", per_class=100), make_shapes("test", per_class=30)
    model = create_model("smallcnn", 10, 3, seed=0)
    train(model, data, Recipe(epochs=2, batch_size=32, lr=0.05), device="cpu", seed=0, progress=False)
    assert accuracy(model, test) > 16  # chance is 10 ± 1.7 on 300 images; this torch gives 23 (6 epochs on all: ~65)
