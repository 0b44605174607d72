"""Tests of the data loaders: folder trees, tar archives, npz, digits, caching and every error."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uge.data import ImageDataset, load_dataset, load_splits, save_npz
from uge.data import loaders
from uge.errors import DataError

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.tar.gz"


def _pixels(seed: int, size=(8, 10), mode="RGB") -> np.ndarray:
    """Random pixels, (H, W, 3) for RGB or (H, W) for L; size is (W, H) as PIL has it."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _write(path: Path, arr: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def make_tree(root: Path, classes=("cat", "dog", "ant"), per_class=3, mode="RGB", seed=0,
              size=(8, 10)) -> dict[tuple[str, str], np.ndarray]:
    """An image-folder tree of PNGs; returns {(class, filename): pixels}. File names are written
    in reverse order so that loading has to sort them."""
    pixels = {}
    for ci, cls in enumerate(classes):
        for j in reversed(range(per_class)):
            arr = _pixels(seed * 1000 + ci * 100 + j, size, mode)
            name = f"img{j:02d}.png"
            _write(root / cls / name, arr)
            pixels[(cls, name)] = arr
    return pixels


def make_tar(src: Path, dest: Path, arcname: str = "") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcname or ".")
    return dest


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------ folder trees


def test_directory_round_trip(tmp_path, cache):
    pixels = make_tree(tmp_path / "data")
    ds = load_dataset(tmp_path / "data", cache_dir=cache)
    assert isinstance(ds, ImageDataset)
    assert ds.classes == ["ant", "cat", "dog"]
    assert ds.images.shape == (9, 10, 8, 3) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = [pixels[(c, f"img{j:02d}.png")] for c in ds.classes for j in range(3)]
    np.testing.assert_array_equal(ds.images, np.stack(expected))


def test_directory_skips_hidden_and_non_image_files(tmp_path, cache):
    make_tree(tmp_path / "data", classes=("a", "b"), per_class=2)
    (tmp_path / "data" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "a" / "._img00.png").write_bytes(b"macOS resource fork")
    (tmp_path / "data" / ".git").mkdir()
    ds = load_dataset(tmp_path / "data", cache_dir=cache)
    assert ds.classes == ["a", "b"] and len(ds) == 4


def test_grayscale_tree_has_one_channel(tmp_path, cache):
    pixels = make_tree(tmp_path / "gray", classes=("x", "y"), per_class=2, mode="L")
    ds = load_dataset(tmp_path / "gray", cache_dir=cache)
    assert ds.images.shape == (4, 10, 8, 1)
    np.testing.assert_array_equal(ds.images[0, ..., 0], pixels[("x", "img00.png")])


def test_mixed_gray_and_rgb_becomes_rgb(tmp_path, cache):
    make_tree(tmp_path / "d", classes=("x",), per_class=2, mode="RGB")
    gray = make_tree(tmp_path / "d", classes=("y",), per_class=2, mode="L", seed=1)
    ds = load_dataset(tmp_path / "d", cache_dir=cache)
    assert ds.images.shape == (4, 10, 8, 3)
    for k in range(3):  # L -> RGB replicates the channel
        np.testing.assert_array_equal(ds.images[2, ..., k], gray[("y", "img00.png")])


def test_jpeg_and_other_formats(tmp_path, cache):
    ramp = np.arange(16, dtype=np.uint8) * 16  # smooth, so that JPEG keeps it close
    arr = np.stack([ramp[None, :].repeat(16, 0), ramp[:, None].repeat(16, 1), np.full((16, 16), 128, np.uint8)], -1)
    _write(tmp_path / "d" / "a" / "1.jpg", arr, "JPEG")
    _write(tmp_path / "d" / "a" / "2.bmp", arr, "BMP")
    _write(tmp_path / "d" / "b" / "1.webp", arr, "WEBP")
    Image.fromarray(arr).convert("P").save(tmp_path / "d" / "b" / "2.gif")
    ds = load_dataset(tmp_path / "d", cache_dir=cache)
    assert ds.images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(ds.images[1], arr)  # BMP is lossless
    assert np.abs(ds.images[0].astype(int) - arr).mean() < 8  # JPEG is close


def test_split_subfolders(tmp_path, cache):
    train = make_tree(tmp_path / "d" / "train", per_class=3, seed=1)
    test = make_tree(tmp_path / "d" / "test", per_class=2, seed=2)
    tr = load_dataset(tmp_path / "d", "train", cache_dir=cache)
    te = load_dataset(tmp_path / "d", "test", cache_dir=cache)
    assert len(tr) == 9 and len(te) == 6
    np.testing.assert_array_equal(tr.images[0], train[("ant", "img00.png")])
    np.testing.assert_array_equal(te.images[0], test[("ant", "img00.png")])
    tr2, te2 = load_splits(tmp_path / "d", cache_dir=cache)
    np.testing.assert_array_equal(tr2.images, tr.images)
    np.testing.assert_array_equal(te2.images, te.images)


def test_split_folder_inside_single_top_folder(tmp_path, cache):
    make_tree(tmp_path / "d" / "cifar" / "train", per_class=2)
    assert len(load_dataset(tmp_path / "d", "train", cache_dir=cache)) == 6


def test_missing_split_folder_is_an_error(tmp_path, cache):
    make_tree(tmp_path / "d" / "train", per_class=2)
    with pytest.raises(DataError, match="no 'test' folder"):
        load_dataset(tmp_path / "d", "test", cache_dir=cache)


def test_tree_without_split_folders_is_the_class_root(tmp_path, cache):
    make_tree(tmp_path / "d", per_class=2)
    a = load_dataset(tmp_path / "d", "train", cache_dir=cache)
    b = load_dataset(tmp_path / "d", "test", cache_dir=cache)
    np.testing.assert_array_equal(a.images, b.images)


# ------------------------------------------------------------------------------------------- tar


@pytest.mark.parametrize("arcname,suffix", [("", ".tar.gz"), ("mydata", ".tgz"), ("", ".tar")])
def test_tar_matches_directory(tmp_path, cache, arcname, suffix):
    make_tree(tmp_path / "d" / "train", per_class=3, seed=1)
    make_tree(tmp_path / "d" / "test", per_class=2, seed=2)
    dest = tmp_path / f"tree{suffix}"
    with tarfile.open(dest, "w:gz" if suffix != ".tar" else "w") as tf:
        tf.add(tmp_path / "d", arcname=arcname or ".")
    for split in ("train", "test"):
        a = load_dataset(tmp_path / "d", split, cache_dir=cache)
        b = load_dataset(dest, split, cache_dir=cache)
        assert a.classes == b.classes
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("arcname", ["", "cifar100"])
def test_tar_class_named_like_a_split(tmp_path, cache, arcname):
    """CIFAR-100 has a class "train": inside the test split it is a class, not another split."""
    make_tree(tmp_path / "d" / "train", classes=("apple", "train"), per_class=3, seed=1)
    make_tree(tmp_path / "d" / "test", classes=("apple", "train"), per_class=2, seed=2)
    dest = make_tar(tmp_path / "d", tmp_path / "c100.tar.gz", arcname)
    for split, n in (("train", 3), ("test", 2)):
        a = load_dataset(tmp_path / "d", split, cache_dir=cache)
        b = load_dataset(dest, split, cache_dir=cache)
        assert b.classes == ["apple", "train"] and np.bincount(b.labels).tolist() == [n, n]
        np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize("arcname", ["", "top"])
def test_tar_without_split_folders(tmp_path, cache, arcname):
    make_tree(tmp_path / "d", per_class=2)
    dest = make_tar(tmp_path / "d", tmp_path / "flat.tar.gz", arcname)
    a = load_dataset(tmp_path / "d", cache_dir=cache)
    b = load_dataset(str(dest), cache_dir=str(cache))
    assert b.classes == ["ant", "cat", "dog"]
    np.testing.assert_array_equal(a.images, b.images)


def test_tar_errors_name_the_member(tmp_path, cache):
    make_tree(tmp_path / "d" / "train", classes=("a", "b"), per_class=2)
    (tmp_path / "d" / "train" / "b" / "img01.png").write_bytes(b"garbage bytes")
    dest = make_tar(tmp_path / "d", tmp_path / "bad.tar.gz")
    with pytest.raises(DataError, match=r"bad\.tar\.gz:train/b/img01\.png"):
        load_dataset(dest, cache_dir=cache)


def test_corrupt_tar_is_a_data_error(tmp_path, cache):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="bad.tar.gz"):
        load_dataset(bad, cache_dir=cache)


# ------------------------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path, cache):
    ds = load_dataset(_tree(tmp_path), cache_dir=cache)
    path = save_npz(ds, tmp_path / "out.npz")
    back = load_dataset(path, "test")  # split is ignored for npz
    np.testing.assert_array_equal(back.images, ds.images)
    np.testing.assert_array_equal(back.labels, ds.labels)
    assert back.classes == ds.classes
    with np.load(path, allow_pickle=False) as z:
        assert z["classes"].dtype.kind == "U"
    assert not list(tmp_path.glob(".out.npz*"))  # no temp file left behind


def test_npz_accepts_3d_images(tmp_path):
    np.savez(tmp_path / "g.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]),
             classes=np.array(["a", "b"]))
    assert load_dataset(tmp_path / "g.npz").images.shape == (4, 8, 8, 1)


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "m.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"m\.npz.*'classes'"):
        load_dataset(tmp_path / "m.npz")


def test_npz_labels_out_of_range(tmp_path):
    np.savez(tmp_path / "r.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.array([0, 1, 5]),
             classes=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"r\.npz.*out of range"):
        load_dataset(tmp_path / "r.npz")


def test_npz_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "o.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, 1]),
             classes=np.array(["a", "b"], dtype=object))
    with pytest.raises(DataError, match=r"o\.npz"):
        load_dataset(tmp_path / "o.npz")


def _tree(tmp_path: Path) -> Path:
    make_tree(tmp_path / "src", per_class=4)
    return tmp_path / "src"


# ---------------------------------------------------------------------------------------- digits


def test_digits():
    tr = load_dataset("digits", "train")
    te = load_dataset("digits", "test")
    assert tr.images.shape[1:] == (8, 8, 1) and te.images.shape[1:] == (8, 8, 1)
    assert tr.classes == [str(i) for i in range(10)] == te.classes
    assert len(tr) + len(te) == 1797
    assert len(te) == 360
    assert tr.images.max() == 255 and tr.images.min() == 0
    assert set(np.bincount(te.labels)) <= {35, 36, 37}  # stratified
    again = load_dataset("digits", "train")
    np.testing.assert_array_equal(again.images, tr.images)
    np.testing.assert_array_equal(again.labels, tr.labels)
    tr2, te2 = load_splits("digits", per_class_train=5, per_class_test=2)
    assert len(tr2) == 50 and len(te2) == 20


def test_cifar_missing_files_says_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="--download.*--root"):
        load_dataset("cifar10", root=tmp_path / "nothing-here")


def test_builtin_bad_split():
    with pytest.raises(DataError, match="'val'"):
        load_dataset("digits", "val")


# ----------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_dataset(tmp_path / "nope")


def test_unknown_name_lists_builtins():
    with pytest.raises(DataError, match="cifar10.*digits|digits.*cifar10"):
        load_dataset("imagenet-9000")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported"):
        load_dataset(tmp_path / "x.csv")


def test_empty_class_folder(tmp_path, cache):
    make_tree(tmp_path / "d", classes=("a", "b"), per_class=2)
    (tmp_path / "d" / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "d", cache_dir=cache)


def test_no_class_folders(tmp_path, cache):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path / "d", cache_dir=cache)


def test_undecodable_image_is_named(tmp_path, cache):
    make_tree(tmp_path / "d", classes=("a", "b"), per_class=2)
    (tmp_path / "d" / "b" / "broken.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(tmp_path / "d", cache_dir=cache)


def test_mixed_sizes(tmp_path, cache):
    make_tree(tmp_path / "d", classes=("a", "b"), per_class=2)
    _write(tmp_path / "d" / "b" / "zbig.png", _pixels(9, (12, 12)))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "d", cache_dir=cache)
    msg = str(err.value)
    assert "zbig.png" in msg and "12x12" in msg and "8x10" in msg and "img00.png" in msg


def test_train_test_class_mismatch(tmp_path, cache):
    make_tree(tmp_path / "d" / "train", classes=("a", "b"), per_class=2)
    make_tree(tmp_path / "d" / "test", classes=("a", "c"), per_class=2)
    with pytest.raises(DataError, match="classes"):
        load_splits(tmp_path / "d", cache_dir=cache)


# ------------------------------------------------------------------------------------------ cache


def test_cache_is_used_on_second_load(tmp_path, cache, monkeypatch):
    src = _tree(tmp_path)
    first = load_dataset(src, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1

    def refuse(data):
        raise AssertionError("decoded again instead of using the cache")
    monkeypatch.setattr(loaders, "_decode_image", refuse)
    second = load_dataset(src, cache_dir=cache)
    np.testing.assert_array_equal(second.images, first.images)
    assert second.classes == first.classes


def test_cache_default_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("UGE_CACHE", str(tmp_path / "envcache"))
    load_dataset(_tree(tmp_path))
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1


def test_cache_invalidated_when_an_image_changes(tmp_path, cache):
    src = _tree(tmp_path)
    load_dataset(src, cache_dir=cache)
    new = _pixels(42)
    _write(src / "cat" / "img00.png", new)
    ds = load_dataset(src, cache_dir=cache)
    np.testing.assert_array_equal(ds.images[ds.classes.index("cat") * 4], new)


def test_tar_cache_is_used(tmp_path, cache, monkeypatch):
    dest = make_tar(_tree(tmp_path), tmp_path / "t.tar.gz")
    first = load_dataset(dest, cache_dir=cache)
    monkeypatch.setattr(loaders, "_read_tar", lambda *a: pytest.fail("tar read again"))
    np.testing.assert_array_equal(load_dataset(dest, cache_dir=cache).images, first.images)


def test_corrupt_cache_is_rebuilt(tmp_path, cache):
    src = _tree(tmp_path)
    first = load_dataset(src, cache_dir=cache)
    (file,) = cache.glob("*.npz")
    file.write_bytes(b"PK\x03\x04 truncated garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = load_dataset(src, cache_dir=cache)
    np.testing.assert_array_equal(again.images, first.images)
    with np.load(file, allow_pickle=False) as z:  # rewritten, readable again
        np.testing.assert_array_equal(z["images"], first.images)


# -------------------------------------------------------------------------------------- per_class


def test_per_class_is_balanced(tmp_path, cache):
    make_tree(tmp_path / "d", classes=("a", "b", "c"), per_class=5)
    ds = load_dataset(tmp_path / "d", cache_dir=cache, per_class=3, seed=1)
    assert np.bincount(ds.labels).tolist() == [3, 3, 3]
    again = load_dataset(tmp_path / "d", cache_dir=cache, per_class=3, seed=1)
    np.testing.assert_array_equal(again.images, ds.images)
    assert np.bincount(load_dataset("digits", per_class=7).labels).tolist() == [7] * 10
    with pytest.raises(DataError, match="fewer"):
        load_dataset(tmp_path / "d", cache_dir=cache, per_class=6)


# ------------------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CIFAR10.is_file(), reason=f"{REAL_CIFAR10} not present")
def test_real_cifar10_tar(tmp_path):
    ds = load_dataset(REAL_CIFAR10, "test", cache_dir=tmp_path, per_class=20)
    assert ds.images.shape == (200, 32, 32, 3)
    assert len(ds.classes) == 10 and ds.classes[0] == "airplane"
    assert np.bincount(ds.labels).tolist() == [20] * 10
