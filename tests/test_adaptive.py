"""The adaptive countermeasures do what they claim on known patterns: a hacker who knows the method estimates
the perturbation from the published set's statistics (and clean images from elsewhere) and removes it."""
from __future__ import annotations

import numpy as np
import pytest

from uge.countermeasures import parse_countermeasures, transform_data
from uge.data import ImageDataset
from uge.errors import ConfigError

C = np.array([1, -2, 1])  # keyed protection's colour direction


def natural(n, size=16, seed=0) -> np.ndarray:
    """Smooth random colour images: a low-resolution random field, upsampled, with correlated channels."""
    rng = np.random.default_rng(seed)
    low = rng.normal(0, 1, (n, size // 4, size // 4, 1)) * 25 + rng.normal(0, 1, (n, size // 4, size // 4, 3)) * 8
    x = np.repeat(np.repeat(low, 4, 1), 4, 2) + rng.normal(0, 3, (n, size, size, 3))
    return np.clip(128 + x, 0, 255).astype(np.uint8)


def dataset(images, num_classes=4) -> ImageDataset:
    return ImageDataset(images, np.arange(len(images)) % num_classes, [f"c{i}" for i in range(num_classes)])


def keyed(images, labels, amp=5, seed=1) -> np.ndarray:
    """A class-wise ±amp pattern of 4-px cells along C (keyed protection's shape)."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1, 1], (labels.max() + 1, images.shape[1] // 4, images.shape[2] // 4))
    m = np.repeat(np.repeat(signs, 4, 1), 4, 2)[labels] * amp
    return np.clip(images.astype(int) + m[..., None] * C, 0, 255).astype(np.uint8)


def classwise_energy(data: ImageDataset, x: np.ndarray | None = None) -> float:
    """Mean squared deviation of the class mean images (of ``x``, default the images) from the overall mean."""
    x = data.images.astype(float) if x is None else x
    return float(np.mean([((x[data.labels == c].mean(0) - x.mean(0)) ** 2).mean() for c in range(data.num_classes)]))


def test_pca_finds_the_colour_key_and_removes_it():
    clean = dataset(natural(400))
    prot = dataset(keyed(clean.images, clean.labels))
    reference = dataset(natural(400, seed=7))  # clean images from elsewhere
    pca = parse_countermeasures("pca")[0]
    out = transform_data([pca], prot, reference=reference)
    u = pca._basis
    assert u.shape[1] >= 1 and abs(u[:, 0] @ C) / np.linalg.norm(C) > 0.95  # the key, read off the statistics
    along = lambda d: d.images.astype(float) @ C / np.linalg.norm(C)  # noqa: E731
    assert classwise_energy(prot, along(prot)) > 10 * classwise_energy(out, along(out))
    test = transform_data([pca], reference, test=True)  # the fitted projection, applied to the test set
    assert np.abs(along(test) - along(test).mean()).max() < 2  # nothing left along the key there either


def test_pca_leaves_clean_data_alone():
    pca = parse_countermeasures("pca:ratio=1.5")[0]
    clean = dataset(natural(400))
    out = transform_data([pca], clean, reference=dataset(natural(400, seed=7)))
    assert pca._basis.shape[1] == 0 and np.array_equal(out.images, clean.images)


def test_pca_on_patches_finds_a_block_pattern():
    clean = dataset(natural(400))
    rng = np.random.default_rng(3)
    pattern = rng.choice([-8, 8], (4, 4, 4, 3))  # one 4×4 RGB block per class, tiled
    prot = dataset(np.clip(clean.images.astype(int) + np.tile(pattern, (1, 4, 4, 1))[clean.labels], 0, 255)
                   .astype(np.uint8))
    out = transform_data(parse_countermeasures("pca:patch=4,k=8"), prot, reference=dataset(natural(400, seed=7)))
    assert classwise_energy(prot) > 5 * classwise_energy(out)


def test_pca_needs_a_reference():
    with pytest.raises(ConfigError, match="clean images from elsewhere"):
        transform_data(parse_countermeasures("pca"), dataset(natural(20)))


def test_classmean_removes_an_additive_classwise_pattern_exactly():
    clean = dataset(natural(200))
    prot = dataset(keyed(clean.images, clean.labels, amp=4))
    a = transform_data(parse_countermeasures("classmean"), prot).images.astype(int)
    b = transform_data(parse_countermeasures("classmean"), clean).images.astype(int)
    unclipped = (clean.images > 20).all(-1) & (clean.images < 235).all(-1)
    d = a - b  # what is left of the pattern: its mean over the classes, the same for every image
    assert np.abs(d - np.median(d, axis=0))[unclipped].max() <= 1
    assert classwise_energy(prot) > 10 * classwise_energy(clean, a.astype(float)) + 1


def test_classref_removes_a_classwise_cell_pattern_and_keeps_the_classes_own_content():
    rng = np.random.default_rng(4)
    shift = rng.normal(0, 12, (4, 1, 1, 3))  # the classes' own mean colours, which clean images share

    def labelled(n, seed):
        d = dataset(natural(n, seed=seed))
        d.images[:] = np.clip(d.images + shift[d.labels], 0, 255).astype(np.uint8)
        return d
    clean, reference = labelled(800, 0), labelled(800, 7)
    code = np.repeat(np.repeat(rng.choice([-8, 8], (4, 4, 4, 3)), 4, 1), 4, 2)  # one 4-px cell pattern per class
    prot = dataset(np.clip(clean.images.astype(int) + code[clean.labels], 0, 255).astype(np.uint8))
    spec = parse_countermeasures("classref:cell=4")
    out = transform_data(spec, prot, reference=reference).images.astype(int)
    kept = transform_data(spec, clean, reference=reference).images.astype(int)
    unclipped = (clean.images > 20).all(-1) & (clean.images < 235).all(-1)
    assert np.abs(out - kept)[unclipped].max() <= 1  # the code is gone: what is left is what clean data give
    moved = np.abs(kept - clean.images).mean()  # only the two class means' noise moves clean images (rms ~2.7)
    assert moved < 4 and 3 * moved < np.abs(transform_data(parse_countermeasures("classmean"), clean).images.astype(int)
                                            - clean.images).mean()  # classmean takes the classes' mean colours
    assert classwise_energy(clean, kept) > 0.8 * classwise_energy(clean)
    with pytest.raises(ConfigError, match="clean images from elsewhere"):
        transform_data(spec, prot)


def test_orthogonal_projection_removes_a_linearly_separable_pattern():
    clean = dataset(natural(800, size=8))
    rng = np.random.default_rng(5)
    pattern = rng.choice([-6, 6], (4, 8, 8, 3))  # sample-independent, class-wise: linearly separable
    prot = dataset(np.clip(clean.images.astype(int) + pattern[clean.labels], 0, 255).astype(np.uint8))
    orth = parse_countermeasures("orthogonal:steps=300")[0]
    out = transform_data([orth], prot)
    assert orth.linear_acc > 90  # the linear model found the shortcut
    assert classwise_energy(prot) > 5 * classwise_energy(out)
    out_clean = transform_data(parse_countermeasures("orthogonal:steps=300"), clean)
    assert classwise_energy(out_clean) <= classwise_energy(clean) + 1  # nothing class-wise to remove there


def _along(prot: ImageDataset, clean: ImageDataset, spec: str, reference: ImageDataset) -> tuple[float, float]:
    """(the amplitude of δ = prot − clean left after ``spec`` fitted on ``prot``, the mean change of the clean
    images under the fitted transform, in levels)."""
    cm = parse_countermeasures(spec)[0]
    a = transform_data([cm], prot, reference=reference).images.astype(float)
    b = transform_data([cm], clean, test=True).images.astype(float)  # as fitted on the published set
    d0 = prot.images.astype(float) - clean.images
    return float(((a - b) * d0).sum() / (d0 ** 2).sum()), float(np.abs(b - clean.images).mean())


@pytest.mark.parametrize("shift", [False, True])
def test_spectral_removes_a_tiled_pattern_shifted_or_not(shift):
    clean, reference = dataset(natural(400)), dataset(natural(400, seed=7))
    rng = np.random.default_rng(3)
    tile = rng.choice([-8, 8], (4, 4, 4, 3))  # one 4×4 RGB tile per class, repeated over the image
    pattern = np.tile(tile, (1, 4, 4, 1))[clean.labels]
    if shift:  # each image's tiling cyclically shifted: only the Fourier phases change
        pattern = np.stack([np.roll(p, tuple(rng.integers(0, 4, 2)), (0, 1)) for p in pattern])
    prot = dataset(np.clip(clean.images.astype(int) + pattern, 0, 255).astype(np.uint8))
    left, harm = _along(prot, clean, "spectral:k=256,ratio=1.5,zero=1", reference)
    assert left < 0.1 and harm < 2  # the pattern is gone, the clean images barely changed
    wiener, _ = _along(prot, clean, "spectral:k=256,ratio=1.5", reference)
    assert left < wiener < 0.5  # the Wiener shrink keeps the natural part of the bins, and a little pattern


def test_spectral_leaves_clean_data_alone_and_needs_a_reference():
    clean = dataset(natural(400))
    spectral = parse_countermeasures("spectral")[0]
    out = transform_data([spectral], clean, reference=dataset(natural(400, seed=7)))
    assert spectral.found == 0 and np.abs(out.images.astype(int) - clean.images).max() <= 1  # rounding only
    with pytest.raises(ConfigError, match="clean images from elsewhere"):
        transform_data(parse_countermeasures("spectral"), clean)


def test_blockdct_removes_a_block_aligned_jpeg_basis_pattern_that_block_signs_hide_from_spectral():
    """The jpeg-patch grating code (one DCT basis per class): ``blockdct`` finds its coefficients in JPEG's basis
    whether or not every block has its own sign; a sign per block spreads the tiling's comb of frequencies, so
    ``spectral`` removes much less of it."""
    from uge.protectors import build_protector

    clean, reference = dataset(natural(300, size=32)), dataset(natural(300, size=32, seed=7))
    kept = {}
    for block_signs in (False, True):
        prot = build_protector("jpeg-patch", rho=8 / 255, size=8, freqs=["4,0", "0,4", "3,0", "0,3"], distinct=True,
                               shift=False, block_signs=block_signs).protect(clean, seed=0).protected
        left, harm = _along(prot, clean, "blockdct:k=64,ratio=1.5", reference)
        assert left < 0.2 and harm < 8  # less change to clean images than the pattern (8 levels) itself
        kept[block_signs] = _along(prot, clean, "spectral:k=256,ratio=1.5,zero=1", reference)[0]
    assert kept[False] < 0.1 and kept[True] > kept[False] + 0.3


def test_knownbasis_removes_a_code_of_the_listed_bases_and_part_of_a_secret_mix_of_them():
    """``knownbasis`` needs no statistics: the ladder's stage G2 (one listed basis per class, power matched to
    clean) lies in the span of the patterns it projects out, so it goes; a pattern of another JPEG basis, (2, 2),
    stays; the default's code, a mix of the listed bases with secret weights, is partly outside their span:
    ``dct=1`` takes more of it than the sign patterns alone, and some stays."""
    from uge.protectors import build_protector

    clean, reference = dataset(natural(200, size=32), num_classes=10), dataset(natural(200, size=32, seed=7))
    g2 = build_protector("grating", mix=False).protect(clean, seed=0).protected
    assert _along(g2, clean, "knownbasis", reference)[0] < 0.1
    other = build_protector("jpeg-patch", rho=8 / 255, size=8, freqs=["2,2"], shift=False,
                            block_signs=True).protect(clean, seed=0).protected
    assert _along(other, clean, "knownbasis", reference)[0] > 0.8
    mixed = build_protector("grating").protect(clean, seed=0).protected
    left = {spec: _along(mixed, clean, spec, reference)[0] for spec in ("knownbasis", "knownbasis:dct=1")}
    assert left["knownbasis"] > left["knownbasis:dct=1"] > 0.1


def test_knownband_removes_the_smooth_code_and_only_the_coarse_band():
    """``knownband`` is ``knownbasis`` for ``smooth``: zeroing the modes the code is made of removes the whole code,
    matched to clean power or not (no statistics needed), and leaves finer content untouched; with a band below the
    code's it does not."""
    from uge.protectors import build_protector

    clean, reference = dataset(natural(120, size=32), num_classes=10), dataset(natural(120, size=32, seed=7))
    for matched in (False, True):
        code = build_protector("smooth", rho=24 / 255, size=32, fmax=2, matched=matched).protect(clean, seed=0).protected
        assert abs(_along(code, clean, "knownband:fmax=2", reference)[0]) < 0.05  # rounding only
        assert _along(code, clean, "knownband:fmax=1", reference)[0] > 0.3
    t = 2 * np.pi * np.arange(32) / 32
    fine = 40 * np.cos(3 * t)[:, None] * np.cos(5 * t)[None, :] + 30 * np.cos(16 * t)[None, :]  # 3 to 16 cycles
    x = np.repeat(np.rint(128 + fine)[None, ..., None], 4, 0).astype(np.uint8)
    out = transform_data(parse_countermeasures("knownband:fmax=2"), dataset(x))
    assert np.abs(out.images.astype(int) - x).max() <= 1  # rounding only: nothing in the band
    assert np.abs(transform_data(parse_countermeasures("knownband:fmax=5"), dataset(x)).images.astype(int) - x).max() > 20


def test_blockdct_leaves_clean_data_alone():
    clean = dataset(natural(400))
    cm = parse_countermeasures("blockdct")[0]
    out = transform_data([cm], clean, reference=dataset(natural(400, seed=7)))
    assert cm.found == 0 and np.abs(out.images.astype(int) - clean.images).max() <= 1


def _class_contrast(data: ImageDataset, freqs) -> float:
    """The largest ratio, over classes and the (u, v) in ``freqs``, of a class's block-DCT power to the other
    classes' (the mean over channels): a class-wise code at one frequency per class shows here."""
    from uge.countermeasures.adaptive import BlockDCTExcess

    f = BlockDCTExcess._coefficients(data.images)[0] ** 2
    labels = np.repeat(data.labels, len(f) // len(data))
    return max(f[labels == c][:, v, u].mean() / f[labels != c][:, v, u].mean()
               for c in range(data.num_classes) for u, v in freqs)


def _block_power(images):
    from uge.countermeasures.adaptive import BlockDCTExcess
    return (BlockDCTExcess._coefficients(images)[0] ** 2).mean(0)


def test_matched_jpeg_patch_keeps_the_sets_block_dct_power_and_a_class_code_that_classdct_sees():
    """``jpeg-patch`` with ``matched``: the published set's power per block-DCT coefficient equals the clean set's
    (so ``blockdct`` finds nothing), while each class keeps more power at its own frequency than the others; the
    per-class comparison (``classdct``) finds that and rescales it away."""
    from uge.protectors import build_protector

    freqs = [(1, 0), (0, 1), (1, 1), (3, 0)]
    clean, reference = dataset(natural(400, size=32)), dataset(natural(400, size=32, seed=7))
    pubs = {m: build_protector("jpeg-patch", rho=10 / 255, size=8, freqs=[f"{u},{v}" for u, v in freqs],
                               distinct=True, shift=False, block_signs=True, share=0.75, matched=m)
            .protect(clean, seed=0).protected for m in (False, True)}
    for pub in pubs.values():
        assert np.abs(pub.images.astype(int) - clean.images).max() <= 10  # the budget holds on the images
    ratio = {m: (_block_power(p.images) / _block_power(clean.images))[np.arange(8) + np.arange(8)[:, None] > 0]
             for m, p in pubs.items()}  # every AC coefficient and channel
    assert ratio[False].max() > 1.5 and np.abs(ratio[True] - 1).max() < 0.02
    found = {}
    for m, pub in [("clean", clean), *pubs.items()]:
        cm = parse_countermeasures("blockdct:k=64,ratio=1.05")[0]
        transform_data([cm], pub, reference=reference)
        found[m] = cm.found
    assert found[False] >= found["clean"] + 20 and found[True] <= found["clean"] + 2  # about as many as two clean sets differ by
    assert _class_contrast(clean, freqs) < 1.1 and _class_contrast(pubs[True], freqs) > 3  # the code is there
    out = transform_data(parse_countermeasures("classdct:k=16,ratio=1.2"), pubs[True], reference=reference)
    assert _class_contrast(out, freqs) < 1.3


def test_classdct_leaves_clean_data_alone_and_needs_labelled_clean_images_of_every_class():
    clean = dataset(natural(400, size=32))
    cm = parse_countermeasures("classdct:k=16,ratio=1.3")[0]
    out = transform_data([cm], clean, reference=dataset(natural(400, size=32, seed=7)))
    assert cm.found == 0 and np.abs(out.images.astype(int) - clean.images).max() <= 1  # rounding only
    test = transform_data([cm], clean, test=True)
    assert np.array_equal(test.images, clean.images)  # test images: their labels are what is asked
    with pytest.raises(ConfigError, match="no image of class"):
        transform_data(parse_countermeasures("classdct"), clean, reference=dataset(natural(40, size=32), 2))


def test_match_to_leaves_the_code_coefficients_at_that_fraction_of_the_clean_power():
    from uge.protectors import build_protector

    freqs = [(1, 0), (0, 1), (1, 1), (3, 0)]
    clean = dataset(natural(400, size=32))
    pub = build_protector("jpeg-patch", rho=10 / 255, size=8, freqs=[f"{u},{v}" for u, v in freqs], distinct=True,
                          shift=False, block_signs=True, share=0.75, matched=True, match_to=0.9
                          ).protect(clean, seed=0).protected
    ratio = _block_power(pub.images) / _block_power(clean.images)
    coded = np.array([ratio[v, u] for u, v in freqs])
    assert np.abs(coded - 0.9).max() < 0.02
    assert abs(ratio[2, 2].mean() - 1) < 0.02  # (2, 2) carries no code (nor a harmonic of one)


def test_match_to_without_matched_is_refused_not_ignored():
    from uge.protectors import build_protector

    with pytest.raises(ConfigError, match="match_to=0.9 needs matched"):
        build_protector("jpeg-patch", size=8, match_to=0.9)


def test_lowband_zeroes_the_band_and_keeps_the_block_means_and_finer_frequencies():
    """``lowband:k=2`` removes a pattern of block-DCT coefficient (1, 1) entirely and leaves the block means and a
    pattern at (3, 4) untouched (up to rounding); with k=7 the finer pattern goes too."""
    import scipy.fft

    def block(v, u, amp):
        f = np.zeros((8, 8))
        f[v, u] = amp
        return np.tile(scipy.fft.idctn(f, norm="ortho"), (2, 2))

    base = 128 + block(3, 4, 160)
    x = np.repeat(np.rint(base + block(1, 1, 200))[None, ..., None], 3, 0).astype(np.uint8)
    out = transform_data(parse_countermeasures("lowband:k=2"), dataset(x)).images.astype(int)
    assert np.abs(out - np.rint(base)[None, ..., None]).max() <= 1
    assert np.abs(transform_data(parse_countermeasures("lowband:k=7"), dataset(x)).images.astype(int) - 128).max() <= 1
