"""The tiled-patch protector's options for the battery (issue 20): a luminance pattern (one sign for every
channel) and a per-image cyclic shift of the class's tiling."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import random_dataset
from uge.errors import ConfigError
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


def test_signed_patch_flips_each_image_and_leaves_nothing_in_the_class_means():
    d, labels = _delta(signs=True)
    fixed, _ = _delta()
    cls0, ref = d[labels == 0], fixed[labels == 0][0]
    flipped = [np.array_equal(img, -ref) for img in cls0]
    assert all(np.array_equal(img, ref) or f for img, f in zip(cls0, flipped))  # ± the class's pattern
    assert 0.2 < np.mean(flipped) < 0.8
    assert np.abs(cls0.mean(0)).mean() < 3  # the class mean no longer holds the ±8 pattern


def test_default_patch_is_unchanged_by_the_new_options():
    a = _delta()[0]
    b = _delta(luminance=False, shift=False, signs=False)[0]
    assert np.array_equal(a, b)


# ----------------------------------------------------------------- the JPEG-basis patch and JPEG on a moved grid
def _jpeg_patch(data, **params):
    return build_protector("jpeg-patch", rho=10 / 255, **params).protect(data, seed=0).protected


def test_jpeg_patch_blocks_are_signed_dct_basis_functions_on_the_jpeg_grid():
    data = random_dataset(n=60, size=32, channels=3, num_classes=3)
    data.images[:] = 128
    d = _jpeg_patch(data).images.astype(int) - 128
    assert (d[..., 0] == d[..., 1]).all() and (d[..., 1] == d[..., 2]).all()  # luminance: grayscale keeps it
    t = (2 * np.arange(8) + 1) * np.pi / 16
    allowed = [s * np.sign(np.outer(np.cos(v * t), np.cos(u * t))) * 10 for u, v in [(4, 0), (0, 4)] for s in (1, -1)]
    for img in d[..., 0]:  # every 8x8 block of the grid, wherever the image's shift put the tile
        for by in range(0, 32, 8):
            for bx in range(0, 32, 8):
                assert any(np.array_equal(img[by:by + 8, bx:bx + 8], a) for a in allowed)
    assert len({img.tobytes() for img in d[data.labels == 0]}) > 1  # shifted per image (by multiples of 8)


def test_jpeg_keeps_a_block_aligned_jpeg_patch_and_a_moved_grid_removes_half_of_it():
    """The protector's claim and the attack on it, on smooth images (a JPEG-friendly stand-in for photos)."""
    from uge.countermeasures import parse_countermeasures
    from uge.data.dataset import ImageDataset

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 32
    base = np.stack([128 + 60 * np.sin(2 * np.pi * (a * yy + b * xx)) for a, b in rng.uniform(0, 1, (40, 2))])
    clean = ImageDataset(np.repeat(base[..., None], 3, -1).round().astype(np.uint8), np.arange(40) % 2, ["a", "b"])
    pub = _jpeg_patch(clean)
    d0 = pub.images.astype(float) - clean.images

    def kept(spec):
        (c,) = parse_countermeasures(spec)
        d1 = c(pub, clean, False).images.astype(float) - c(clean, clean, False).images
        return (d0 * d1).sum() / (d0 ** 2).sum()

    assert kept("jpeg:quality=10") > 0.8
    assert kept("jpeg-grid:quality=10,offset=4") < 0.65


def test_jpeg_patch_mix_puts_its_energy_on_the_listed_frequencies_and_signs_flips_vary_it_per_image():
    data = random_dataset(n=200, size=16, channels=1, num_classes=2)
    data.images[:] = 128
    low = ["1,0", "0,1", "2,0", "0,2", "1,1"]
    d = _jpeg_patch(data, size=8, mix=True, freqs=low, shift=False).images[..., 0].astype(float) - 128
    assert set(np.unique(d)) == {-10, 10}
    t = (2 * np.arange(8) + 1) * np.pi / 16
    basis = {(u, v): np.outer(np.cos(v * t), np.cos(u * t)) for u in range(8) for v in range(8)}
    energy = {f: (d[0, :8, :8] * b).sum() ** 2 / (b ** 2).sum() for f, b in basis.items()}
    listed = sum(energy[tuple(map(int, f.split(",")))] for f in low)
    assert listed / sum(energy.values()) > 0.5  # a random ±1 block puts about 5/64 there
    fixed = d[data.labels == 0]
    assert (fixed == fixed[0]).all()  # no shift, signs or flips: one pattern per class
    v = _jpeg_patch(data, size=8, mix=True, freqs=low, shift=False, signs=True, flips=True)
    v = v.images[..., 0].astype(float) - 128
    cls = v[data.labels == 0]
    p = fixed[0]
    variants = [s * q for s in (1, -1) for q in (p, p[::-1], p[:, ::-1], p[::-1, ::-1])]
    assert all(any(np.array_equal(img, q) for q in variants) for img in cls)
    assert len({img.tobytes() for img in cls}) > 4 and np.abs(cls.mean(0)).mean() < 3  # the class mean fades


def test_jpeg_patch_distinct_gives_every_class_its_own_basis_and_refuses_too_few():
    data = random_dataset(n=60, size=16, channels=1, num_classes=3)
    data.images[:] = 128
    freqs = ["1,0", "0,1", "4,0"]
    d = _jpeg_patch(data, size=8, freqs=freqs, distinct=True, shift=False).images[..., 0].astype(int) - 128
    blocks = {d[data.labels == c][0, :8, :8].tobytes() for c in range(3)}
    t = (2 * np.arange(8) + 1) * np.pi / 16
    used = {f for c in range(3) for f in freqs
            if abs((d[data.labels == c][0, :8, :8] * np.sign(np.outer(np.cos(int(f[2]) * t), np.cos(int(f[0]) * t))))
                   .sum()) == 640}
    assert len(blocks) == 3 and used == set(freqs)  # each class one basis, no basis twice
    with pytest.raises(ConfigError, match="distinct needs a basis per block, 3 for 3 classes"):
        _jpeg_patch(data, size=8, freqs=freqs[:2], distinct=True)


def test_jpeg_patch_block_signs_flip_each_block_on_its_own():
    data = random_dataset(n=40, size=32, channels=1, num_classes=2)
    data.images[:] = 128
    kw = dict(size=8, freqs=["4,0", "0,4"], distinct=True, shift=False)
    plain = _jpeg_patch(data, **kw).images[..., 0].astype(int) - 128
    signed = _jpeg_patch(data, block_signs=True, **kw).images[..., 0].astype(int) - 128
    ratio = (signed * plain).reshape(40, 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(40, 16, 64) // 100
    assert (np.abs(ratio) == 1).all() and (ratio == ratio[..., :1]).all()  # one sign per block ...
    assert len({tuple(r[:, 0]) for r in ratio}) > 20  # ... drawn per block and per image


# ----------------------------------------------------------------- the smooth low-frequency code (stage H4)
def _smooth(data, **params):
    data.images[:] = 128  # no clipping: the perturbation is the pattern
    out = build_protector("smooth", rho=16 / 255, **params).protect(data, seed=0).protected
    return out.images.astype(int) - 128


def test_smooth_code_is_a_shifted_low_frequency_luminance_pattern_per_class():
    data = random_dataset(n=120, size=16, channels=3, num_classes=3)
    d = _smooth(data, size=16, fmax=2)
    assert (d[..., 0] == d[..., 1]).all() and (d[..., 1] == d[..., 2]).all()  # luminance: grayscale keeps it
    assert np.abs(d).max() == 16  # the whole budget, at the pattern's extreme
    cls0 = d[data.labels == 0, :, :, 0]
    for img in cls0[1:5]:  # each image a cyclic shift (any pixel) of its class's pattern
        assert any(np.array_equal(np.roll(img, (dy, dx), (0, 1)), cls0[0]) for dy in range(16) for dx in range(16))
    assert not any(np.array_equal(np.roll(d[data.labels == 1][0, :, :, 0], (dy, dx), (0, 1)), cls0[0])
                   for dy in range(16) for dx in range(16))  # another class, another pattern
    power = np.abs(np.fft.fft2(cls0)) ** 2  # no power beyond fmax cycles per axis but the rounding's
    freq = np.abs(np.fft.fftfreq(16, 1 / 16))
    high = (freq[:, None] > 2) | (freq[None, :] > 2)
    assert power[:, high].sum() < 0.01 * power.sum()
    assert np.abs(cls0.mean(0)).max() < 0.3 * 16  # the class mean of shifted copies holds little of it


def test_smooth_code_rejects_frequencies_the_period_cannot_hold():
    with pytest.raises(ConfigError, match="fmax"):
        build_protector("smooth", size=8, fmax=4)


def test_sharper_smooth_code_has_more_power_within_the_same_budget_and_the_same_sign():
    data = random_dataset(n=60, size=16, channels=1, num_classes=3)
    soft = _smooth(data, size=16, fmax=2)
    sharp = _smooth(data, size=16, fmax=2, sharpness=4)
    assert np.abs(sharp).max() == 16
    assert (sharp ** 2).mean() > 1.5 * (soft ** 2).mean()
    assert (np.sign(sharp) == np.sign(soft))[np.abs(soft) > 2].all()  # the same pattern, flattened at its extremes


def _fourier_power(images: np.ndarray) -> np.ndarray:
    return (np.abs(np.fft.rfft2(images.astype(float), axes=(1, 2))) ** 2).mean(0)  # (H, W//2+1, C), as `spectral`


def test_matched_smooth_code_keeps_the_sets_fourier_power_and_the_budget():
    """Stage H6: each image's content shrunk per Fourier frequency, so the published set's power is the clean set's
    (what ``spectral`` compares) where the plain code adds to it; the budget holds on the published pixels."""
    import torch

    from uge.protectors.noise import smooth_patterns

    data = random_dataset(n=300, size=16, channels=3, num_classes=3)
    rng = np.random.default_rng(0)
    content = smooth_patterns(300, 16, 3, torch.Generator().manual_seed(1)).numpy() * 60  # coarse, like photos
    data.images[:] = np.clip(128 + content[..., None] + rng.normal(0, 4, (300, 16, 16, 3)), 0, 255).astype(np.uint8)
    clean = _fourier_power(data.images)
    out = {m: build_protector("smooth", rho=16 / 255, size=16, fmax=2, sharpness=2, matched=m).protect(data, seed=0)
           .protected.images for m in (False, True)}
    ratio = {m: _fourier_power(x) / clean for m, x in out.items()}
    for r in ratio.values():
        r[0, 0] = 1  # the mean colour
    assert ratio[False].max() > 1.3  # the plain code shows ...
    assert np.abs(ratio[True] - 1).max() < 0.05  # ... the matched one does not, at any frequency
    d = out[True].astype(int) - data.images
    assert np.abs(d).max() == 16  # the budget holds, and is used
    code = out[False].astype(int) - data.images
    assert (d * code).sum() / (code ** 2).sum() > 0.8  # the code is still there: the change is the content's


def test_matched_smooth_code_needs_the_images_size_as_its_period():
    data = random_dataset(n=12, size=16, channels=1, num_classes=3)
    with pytest.raises(ConfigError, match="matched needs size equal to the images' side"):
        build_protector("smooth", size=8, fmax=2, matched=True).protect(data, seed=0)
