"""The tiled-patch protector's options for the battery (issue 20): a luminance pattern (one sign for every
channel) and a per-image cyclic shift of the class's tiling."""
from __future__ import annotations

import numpy as np

from conftest import random_dataset
from uge.protectors import build_protector

RHO = 8 / 255


def _delta(**params):
    data = random_dataset(n=200, size=16, channels=3, num_classes=4)
    data.images[:] = 128  # no clipping: the perturbation is the pattern
    out = build_protector("patch", rho=RHO, size=8, block=4, **params).protect(data, seed=0).protected
    return out.images.astype(int) - 128, data.labels


def test_luminance_patch_has_one_sign_per_cell_for_every_channel():
    d, _ = _delta(luminance=True)
    assert (d[..., 0] == d[..., 1]).all() and (d[..., 1] == d[..., 2]).all()
    assert np.abs(d).max() == 8
    d, _ = _delta()
    assert not (d[..., 0] == d[..., 1]).all()  # the default draws each channel's signs


def test_shifted_patch_moves_the_tiling_per_image_and_averages_out_in_the_class_means():
    d, labels = _delta(luminance=True, shift=True)
    assert np.abs(d).max() == 8 and set(np.unique(d)) == {-8, 8}
    cls0 = d[labels == 0]
    assert len({img.tobytes() for img in cls0}) > 10  # not one fixed image per class
    # every image is a cyclic shift of its class's tile: some shift of image 0 matches each other image
    tile = cls0[0, :8, :8, 0]
    for img in cls0[1:5]:
        assert any(np.array_equal(np.roll(np.roll(img[:8, :8, 0], dy, 0), dx, 1), tile)
                   for dy in range(8) for dx in range(8))
    fixed, _ = _delta(luminance=True)
    mean = lambda x: np.abs(x[labels == 0].mean(0)).mean()  # noqa: E731
    assert mean(fixed) == 8 and mean(d) < 4  # the class mean no longer holds the pattern


def test_default_patch_is_unchanged_by_the_new_options():
    a = _delta()[0]
    b = _delta(luminance=False, shift=False)[0]
    assert np.array_equal(a, b)
