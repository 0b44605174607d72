"""Load image classification sets into :class:`ImageDataset` from built-in names, ``.npz`` files,
image-folder trees and tar archives of such trees.

The one entry point is :func:`load_dataset`; :func:`load_splits` loads a train/test pair and checks
that they agree, and :func:`save_npz` writes the ``.npz`` format that :func:`load_dataset` reads.

Sources
    ``"digits"``
        scikit-learn's 8x8 grayscale digits (1797 images), split 80/20 into train/test by a fixed,
        stratified split. No files, no network.
    ``"shapes"``
        a synthetic 32x32 RGB set of ten simple objects drawn in code from a fixed seed (2,000 train,
        1,000 test; :mod:`uge.data.shapes`). No files, no network.
    ``"cifar10"``, ``"cifar100"``
        torchvision's CIFAR sets, stored under ``root`` (default ``<cache_dir>/torchvision``);
        ``download=True`` fetches them.
    ``path/to/file.npz``
        Arrays ``images`` (N, H, W, C) or (N, H, W) uint8, ``labels`` (N,) int, ``classes`` (K,) str.
        One file holds one split: the ``split`` argument is ignored.
    ``path/to/dir``
        An image-folder tree ``<class>/<image>``. If the directory has a subfolder named ``split``
        (``train``, ``test``, ...) that subfolder is the class root, otherwise the directory itself
        is. A directory that holds only one folder, which in turn holds the split folder or the
        class folders (``cifar10/train/<class>/...``), is looked through. Class names are the sorted
        folder names; images are read in file-name order; every format PIL reads is accepted.
        Images are RGB unless every image is grayscale (PIL mode ``"L"``), then C=1.
    ``path/to/unsealed``
        A folder written by ``uge unseal`` (``data.npz`` beside ``unsealed.json``): read as that ``.npz``.
    ``path/to/store``
        A store folder (``images.npy``, ``labels.npy``, ``store.json``; :mod:`uge.data.store`), a set larger
        than memory: with ``stream=True`` its images stay a memmap, otherwise they are read into memory.
    ``path/to/tree.tar`` (also ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``)
        The same tree inside a tar archive, read in place (nothing is extracted to disk).

A built-in name wins over a file or folder of the same name in the working directory; write
``./digits`` to mean the folder. Hidden files and folders (``.name``, ``__MACOSX``) and files whose
extension PIL does not know are skipped.

Folder and tar sources are decoded once and cached as an uncompressed ``.npz`` in ``cache_dir``
(default: ``$UGE_CACHE`` or ``~/.cache/uge``). A tar archive's cache entry is keyed by its resolved
path, size and modification time; a folder's by its resolved path and the name, size and
modification time of every file in it, so editing an image invalidates the entry. An unreadable
cache entry is ignored and rebuilt. With ``stream=True`` they (and ``.npz`` files) are decoded chunk by chunk
into a cached store folder instead, never holding every decoded image (a set larger than memory).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import DataError
from ..utils import atomic_file
from .dataset import ImageDataset
from .shapes import load_shapes
from .store import IMAGES, LABELS, StoreWriter, chunk_rows, is_store, npz_chunks, npz_shape, open_images, \
    open_store, read_rows, write_store_meta

__all__ = ["load_dataset", "load_splits", "save_npz", "BUILTINS", "default_cache_dir"]

# Bump when the decoding rules change, so that old cache entries are not reused.
_CACHE_VERSION = 1
# Folder names that mark a split; a tree that has some of them but not the one asked for is an error
# rather than a class root whose classes would be called "train" and "test".
_SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

Item = tuple[str, str, bytes]  # (class name, file name, encoded image)


# ----------------------------------------------------------------------------------------- public


def default_cache_dir() -> Path:
    """``$UGE_CACHE`` if set, else ``~/.cache/uge``."""
    return Path(os.environ.get("UGE_CACHE") or Path.home() / ".cache" / "uge").expanduser()


def load_dataset(source: str | os.PathLike, split: str = "train", *, root: str | os.PathLike | None = None,
                 download: bool = False, cache_dir: str | os.PathLike | None = None,
                 per_class: int | None = None, seed: int = 0, stream: bool = False) -> ImageDataset:
    """Load one split of ``source`` (see the module docstring for the kinds of source).

    Args:
        source: a built-in name (``"digits"``, ``"cifar10"``, ``"cifar100"``) or a path to an
            ``.npz`` file, an image-folder directory or a tar archive of one.
        split: which split; for trees the name of the split subfolder. Ignored for ``.npz``.
        root: where torchvision keeps the CIFAR files (default ``<cache_dir>/torchvision``).
        download: let torchvision download the CIFAR files if they are missing.
        cache_dir: where decoded folder/tar sources are cached (default :func:`default_cache_dir`).
        per_class: if given, return a class-balanced subset of this many images per class.
        seed: seed of the ``per_class`` draw.
        stream: a set larger than memory: folders, tars and ``.npz`` files are built chunk by chunk into a
            cached store and a store stays one (images a memmap; :mod:`uge.data.store`). Built-in sets are
            small and load into memory either way; a ``per_class`` subset is read into memory.

    Raises:
        DataError: the source is unknown, missing or malformed; the message names the file.
    """
    split = str(split)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    ds = _resolve(source)(source, split, root=root, download=download, cache_dir=cache, stream=stream)
    if per_class is not None:
        ds = ds.per_class(int(per_class), seed)
    return ds


def load_splits(source: str | os.PathLike, *, per_class_train: int | None = None,
                per_class_test: int | None = None, root: str | os.PathLike | None = None,
                download: bool = False, cache_dir: str | os.PathLike | None = None,
                seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Load the ``train`` and ``test`` splits of ``source`` and check that they match.

    For built-in sets the test split is the official one. An ``.npz`` file or a tree without split
    folders has one split only: that is an error here, since testing on the training images would
    silently overstate every accuracy.

    Raises:
        DataError: as :func:`load_dataset`, the source has a single split, or the two splits differ in
            classes or image shape.
    """
    common = dict(root=root, download=download, cache_dir=cache_dir, seed=seed)
    train = load_dataset(source, "train", per_class=per_class_train, **common)
    test = load_dataset(source, "test", per_class=per_class_test, **common)
    train.check_compatible(test, "test set")
    if np.array_equal(train.labels, test.labels) and np.array_equal(train.images, test.images):
        raise DataError(f"{source} holds a single split (no train/test folders); give the test set separately")
    return train, test


def save_npz(dataset: ImageDataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` as an uncompressed ``.npz`` (``images``, ``labels``, ``classes``), atomically.

    The file is written exactly at ``path`` (no suffix is added). Returns the path.
    """
    path = Path(path)
    arrays = dict(images=np.ascontiguousarray(dataset.images), labels=np.asarray(dataset.labels, np.int64),
                  classes=np.array(dataset.classes, dtype=np.str_))
    _atomic_savez(path, arrays)
    return path


# ---------------------------------------------------------------------------------- dispatching

Loader = Callable[..., ImageDataset]  # (source, split, *, root, download, cache_dir) -> ImageDataset


def _resolve(source: str | os.PathLike) -> Loader:
    """The loader for ``source``: a built-in name, else a path kind chosen by type and suffix."""
    if isinstance(source, str) and source.lower() in BUILTINS:
        return BUILTINS[source.lower()]
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"no such data set: {str(source)!r} is neither a built-in name "
                        f"({', '.join(sorted(BUILTINS))}) nor an existing file or folder")
    if path.is_dir():
        if is_store(path):  # a store folder (also `uge unseal`'s output of a set with images.npy)
            return _load_store
        if (path / "unsealed.json").is_file() and (path / "data.npz").is_file():  # `uge unseal`'s output
            return lambda source, split, **kw: _load_npz(Path(source).expanduser() / "data.npz", split, **kw)
        return _load_directory
    name = path.name.lower()
    for suffix in sorted(_PATH_LOADERS, key=len, reverse=True):
        if name.endswith(suffix):
            return _PATH_LOADERS[suffix]
    raise DataError(f"{path}: unsupported file type; expected a folder, "
                    f"{', '.join(sorted(_PATH_LOADERS))} file, or a built-in name ({', '.join(sorted(BUILTINS))})")


def _check_split(name: str, split: str) -> bool:
    """True for ``"train"``, False for ``"test"``; DataError otherwise."""
    if split not in ("train", "test"):
        raise DataError(f"{name} has splits 'train' and 'test', not {split!r}")
    return split == "train"


# ------------------------------------------------------------------------------------- built-ins


def _load_digits(source, split: str, **_) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    train = _check_split("digits", split)
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    idx = np.sort(tr if train else te)
    return ImageDataset(images[idx], labels[idx], [str(c) for c in range(10)])


def _load_torchvision(cls_name: str) -> Loader:
    def load(source, split: str, *, root=None, download: bool = False, cache_dir: Path, **_) -> ImageDataset:
        import torchvision

        train = _check_split(cls_name.lower(), split)
        where = Path(root).expanduser() if root is not None else cache_dir / "torchvision"
        try:
            tv = getattr(torchvision.datasets, cls_name)(root=str(where), train=train, download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise DataError(
                f"{cls_name} files not found or corrupted under {where} ({e}); pass --download to fetch "
                f"them (needs internet), or --root to point at a folder that has them") from e
        except OSError as e:  # download failed: no network, disk full, ...
            raise DataError(f"could not download {cls_name} into {where}: {e}; "
                            f"download it elsewhere and pass --root") from e
        return ImageDataset(np.asarray(tv.data, dtype=np.uint8), np.asarray(tv.targets, dtype=np.int64),
                            list(tv.classes))
    return load


BUILTINS: dict[str, Loader] = {
    "digits": _load_digits,
    "shapes": load_shapes,
    "cifar10": _load_torchvision("CIFAR10"),
    "cifar100": _load_torchvision("CIFAR100"),
}


# ------------------------------------------------------------------------------------------- npz


def _load_store(source, split: str, *, stream: bool = False, **_) -> ImageDataset:
    """A store folder is one split: ``split`` is ignored."""
    ds = open_store(Path(source).expanduser())
    return ds if stream else ds.in_memory()


def _load_npz(source, split: str, *, stream: bool = False, cache_dir: Path | None = None, **_) -> ImageDataset:
    """One ``.npz`` is one split: ``split`` is ignored."""
    path = Path(source).expanduser()
    if stream and cache_dir is not None:
        st = path.stat()
        key = _cache_key("npz", str(path.resolve()), st.st_size, st.st_mtime_ns)
        return _cached_store(cache_dir, path.name, key, lambda out: _npz_to_store(path, out))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for key in ("images", "labels", "classes"):
                if key not in z.files:
                    raise DataError(f"{path}: missing array {key!r} (has {', '.join(z.files) or 'none'})")
                arrays[key] = z[key]
    except DataError:
        raise
    except Exception as e:  # not a zip, truncated, object arrays (allow_pickle=False), ...
        raise DataError(f"{path}: not a readable .npz data set ({type(e).__name__}: {e})") from e
    images, classes = arrays["images"], arrays["classes"]
    if images.ndim == 3:
        images = images[..., None]
    if classes.dtype.kind not in "US":
        raise DataError(f"{path}: 'classes' must be an array of strings, got dtype {classes.dtype}")
    try:
        return ImageDataset(images, arrays["labels"], [str(c) for c in classes.reshape(-1)])
    except DataError as e:
        raise DataError(f"{path}: {e}") from e


# ------------------------------------------------------------------------------ trees (dir, tar)


def _image_suffixes() -> frozenset[str]:
    from PIL import Image
    return frozenset(Image.registered_extensions())


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _choose_root(children: Callable[[tuple[str, ...]], list[str]], split: str, where: str) -> tuple[str, ...]:
    """The class root of a tree, as path parts below its top.

    ``children(parts)`` lists the visible subfolders of ``parts``. The split folder may be at the top
    or inside a single top-level folder; without one the top (or that single folder, if it holds
    folders) is the class root.
    """
    top = children(())
    if split in top:
        return (split,)
    prefix: tuple[str, ...] = ()
    if len(top) == 1 and top[0] not in _SPLIT_NAMES:
        inner = children((top[0],))
        if split in inner:
            return (top[0], split)
        if inner:
            prefix, top = (top[0],), inner
    found = sorted(_SPLIT_NAMES.intersection(top))
    if found:
        loc = f"{where}/{'/'.join(prefix)}" if prefix else where
        raise DataError(f"{loc} has no {split!r} folder (it has split folders {', '.join(found)})")
    return prefix


def _decode_image(data: bytes) -> np.ndarray:
    """Decode one encoded image with PIL: (H, W) uint8 if grayscale mode "L", else (H, W, 3) RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        return np.asarray(im)


def _build_dataset(classes: Sequence[str], items: Iterable[Item], where: str) -> ImageDataset:
    """Decode ``items`` into an ImageDataset; shared by the directory and tar loaders.

    ``classes`` are the class folder names (also those with no images, to report them); ``items``
    are (class name, file name, encoded bytes). Images are ordered by class, then by file name.
    """
    classes = sorted(classes)
    if not classes:
        raise DataError(f"{where}: no class folders found (expected <class>/<image> files)")
    by_class: dict[str, list[tuple[str, bytes]]] = {c: [] for c in classes}
    for cls, name, data in items:
        by_class[cls].append((name, data))
    for cls in classes:
        if not by_class[cls]:
            raise DataError(f"{where}/{cls}: class folder has no images")

    n = sum(len(v) for v in by_class.values())
    labels = np.empty(n, dtype=np.int64)
    out: np.ndarray | None = None
    gray = np.zeros(n, dtype=bool)
    first = ""
    i = 0
    decode = _decode_image
    for label, cls in enumerate(classes):
        members = sorted(by_class[cls], key=lambda t: t[0])
        by_class[cls] = []  # drop the encoded bytes as we go
        labels[i:i + len(members)] = label
        for name, data in members:
            try:
                arr = decode(data)
            except Exception as e:
                raise DataError(f"{where}/{cls}/{name}: cannot decode image ({type(e).__name__}: {e})") from e
            if out is None:
                out = np.empty((n, arr.shape[0], arr.shape[1], 3), dtype=np.uint8)
                first = f"{where}/{cls}/{name}"
            if arr.shape[:2] != out.shape[1:3]:
                raise DataError(f"{where}/{cls}/{name}: image is {arr.shape[1]}x{arr.shape[0]} (WxH) but "
                                f"{first} is {out.shape[2]}x{out.shape[1]}; all images must have one size")
            if arr.ndim == 3:
                out[i] = arr
            else:
                gray[i] = True
                out[i, :, :, 0] = arr
            i += 1
    if gray.all():
        images = np.ascontiguousarray(out[..., :1])
    else:
        images = out
        if gray.any():  # same as PIL's L -> RGB: replicate the channel
            images[gray, ..., 1:] = images[gray, ..., :1]
    return ImageDataset(images, labels, classes)


def _load_directory(source, split: str, *, cache_dir: Path, stream: bool = False, **_) -> ImageDataset:
    top = Path(source).expanduser()

    def children(parts: tuple[str, ...]) -> list[str]:
        with os.scandir(top.joinpath(*parts)) as it:
            return sorted(e.name for e in it if not _hidden(e.name) and e.is_dir())

    try:
        base = top.joinpath(*_choose_root(children, split, str(top)))
        classes = children(tuple(base.relative_to(top).parts))
        suffixes = _image_suffixes()
        files: list[tuple[str, str, os.stat_result]] = []
        for cls in classes:
            with os.scandir(base / cls) as it:
                for e in it:
                    if (not _hidden(e.name) and os.path.splitext(e.name)[1].lower() in suffixes
                            and e.is_file()):
                        files.append((cls, e.name, e.stat()))
    except OSError as e:
        raise DataError(f"{top}: cannot read folder ({e})") from e
    files.sort(key=lambda f: (f[0], f[1]))
    listing = [(c, n, st.st_size, st.st_mtime_ns) for c, n, st in files]
    key = _cache_key("dir", str(base.resolve()), split, classes, listing)

    def build() -> ImageDataset:
        def items():
            for cls, name, _st in files:
                try:
                    yield cls, name, (base / cls / name).read_bytes()
                except OSError as e:
                    raise DataError(f"{base / cls / name}: cannot read ({e})") from e
        return _build_dataset(classes, items(), str(base))

    if stream:  # files in (class, name) order, decoded one by one into the store
        def blobs():
            for pos, (cls, name, _st) in enumerate(files):
                try:
                    yield pos, (base / cls / name).read_bytes()
                except OSError as e:
                    raise DataError(f"{base / cls / name}: cannot read ({e})") from e
        members = [(cls, name) for cls, name, _st in files]
        return _cached_store(cache_dir, f"{top.name}-{split}", key,
                             lambda out: _build_store(classes, members, blobs(), str(base), out))
    return _cached(cache_dir, f"{top.name}-{split}", key, build)


def _tar_parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _read_tar(path: Path, split: str) -> ImageDataset:
    suffixes = _image_suffixes()
    dirs: set[tuple[str, ...]] = set()
    files: list[tuple[tuple[str, ...], bytes]] = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:  # one streaming pass: headers and the bytes of files we may need
                parts = _tar_parts(m.name)
                if not parts or any(_hidden(p) for p in parts):
                    continue
                folder = parts if m.isdir() else parts[:-1]
                for k in range(1, len(folder) + 1):
                    dirs.add(folder[:k])
                if not m.isfile() or os.path.splitext(parts[-1])[1].lower() not in suffixes:
                    continue
                named = next((p for p in folder[:2] if p in _SPLIT_NAMES), split)
                if named != split:  # another split: never used, don't hold its bytes. Only the first split-named
                    continue        # folder counts: CIFAR-100 has a class "train" inside its test split
                f = tf.extractfile(m)
                files.append((parts, f.read() if f is not None else b""))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"{path}: cannot read tar archive ({type(e).__name__}: {e})") from e

    def children(parts: tuple[str, ...]) -> list[str]:
        return sorted(d[-1] for d in dirs if len(d) == len(parts) + 1 and d[:-1] == parts)

    root = _choose_root(children, split, str(path))
    classes = children(root)
    depth = len(root)
    items = ((p[depth], p[depth + 1], data) for p, data in files
             if len(p) == depth + 2 and p[:depth] == root)
    return _build_dataset(classes, items, f"{path}:{'/'.join(root)}" if root else str(path))


def _load_tar(source, split: str, *, cache_dir: Path, stream: bool = False, **_) -> ImageDataset:
    path = Path(source).expanduser()
    st = path.stat()
    key = _cache_key("tar", str(path.resolve()), st.st_size, st.st_mtime_ns, split)
    if stream:
        return _cached_store(cache_dir, f"{path.name}-{split}", key, lambda out: _stream_tar(path, split, out))
    return _cached(cache_dir, f"{path.name}-{split}", key, lambda: _read_tar(path, split))


def _stream_tar(path: Path, split: str, out: Path) -> None:
    """:func:`_read_tar` into a store folder in two passes over the archive: the headers (which files, in which
    order), then each wanted file's bytes decoded into its place; no file's bytes are held past its decoding."""
    suffixes = _image_suffixes()
    dirs: set[tuple[str, ...]] = set()
    candidates: list[tuple[int, tuple[str, ...]]] = []  # (member number, path parts)
    try:
        with tarfile.open(path, "r:*") as tf:
            for k, m in enumerate(tf):
                parts = _tar_parts(m.name)
                if not parts or any(_hidden(p) for p in parts):
                    continue
                folder = parts if m.isdir() else parts[:-1]
                for j in range(1, len(folder) + 1):
                    dirs.add(folder[:j])
                if not m.isfile() or os.path.splitext(parts[-1])[1].lower() not in suffixes:
                    continue
                if next((p for p in folder[:2] if p in _SPLIT_NAMES), split) == split:  # as _read_tar
                    candidates.append((k, parts))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"{path}: cannot read tar archive ({type(e).__name__}: {e})") from e

    def children(parts: tuple[str, ...]) -> list[str]:
        return sorted(d[-1] for d in dirs if len(d) == len(parts) + 1 and d[:-1] == parts)

    root = _choose_root(children, split, str(path))
    classes, depth = children(root), len(root)
    kept = [(p[depth], p[depth + 1], k) for k, p in candidates if len(p) == depth + 2 and p[:depth] == root]
    kept.sort(key=lambda t: (t[0], t[1]))  # stable: as _build_dataset orders them
    position = {k: pos for pos, (_, _, k) in enumerate(kept)}

    def blobs():
        try:
            with tarfile.open(path, "r:*") as tf:
                for k, m in enumerate(tf):
                    if k in position:
                        f = tf.extractfile(m)
                        yield position[k], f.read() if f is not None else b""
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{path}: cannot read tar archive ({type(e).__name__}: {e})") from e

    where = f"{path}:{'/'.join(root)}" if root else str(path)
    _build_store(classes, [(c, n) for c, n, _ in kept], blobs(), where, out)


_PATH_LOADERS: dict[str, Loader] = {".npz": _load_npz, **{s: _load_tar for s in _TAR_SUFFIXES}}


# ------------------------------------------------------------------------------------------ cache


def _cache_key(*parts) -> str:
    blob = json.dumps([_CACHE_VERSION, *parts], separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cached(cache_dir: Path, label: str, key: str, build: Callable[[], ImageDataset]) -> ImageDataset:
    """``build()``, memoised as ``<cache_dir>/<label>.<key>.npz``; unreadable entries are rebuilt."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:80]
    file = cache_dir / f"{safe}.{key}.npz"
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as z:
                return ImageDataset(z["images"], z["labels"], [str(c) for c in z["classes"]])
        except Exception as e:  # corrupt, truncated, wrong arrays: rebuild below
            warnings.warn(f"ignoring unreadable cache file {file} ({type(e).__name__}: {e}); rebuilding")
    ds = build()
    try:
        save_npz(ds, file)
    except OSError as e:
        warnings.warn(f"could not write cache file {file}: {e}")
    return ds


def _cached_store(cache_dir: Path, label: str, key: str, build: Callable[[Path], None]) -> ImageDataset:
    """The store folder ``<cache_dir>/<label>.<key>.store`` that ``build(folder)`` fills, built once (atomically)
    and then opened with its images a memmap; an unreadable entry is rebuilt."""
    from ..utils import atomic_dir

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:80]
    folder = cache_dir / f"{safe}.{key}.store"
    if is_store(folder):
        try:
            return open_store(folder)
        except DataError as e:
            warnings.warn(f"ignoring unreadable cache store {folder} ({e}); rebuilding")
    with atomic_dir(folder, overwrite=True) as tmp:
        build(tmp)
    return open_store(folder)


def _build_store(classes: Sequence[str], members: list[tuple[str, str]], blobs, where: str, out: Path) -> None:
    """:func:`_build_dataset` into the store folder ``out``, chunk by chunk: ``members`` are (class, file name)
    in the set's order (by class, then name), ``blobs`` yields (position in members, encoded bytes) in any
    order. The same images, labels and errors as :func:`_build_dataset`."""
    classes = sorted(classes)
    if not classes:
        raise DataError(f"{where}: no class folders found (expected <class>/<image> files)")
    counts = {c: 0 for c in classes}
    for cls, _ in members:
        counts[cls] += 1
    for cls in classes:
        if not counts[cls]:
            raise DataError(f"{where}/{cls}: class folder has no images")
    n = len(members)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c, _ in members], dtype=np.int64)
    gray = np.zeros(n, dtype=bool)
    writer: StoreWriter | None = None
    buf, buf_start, fill, first = None, 0, 0, ""
    try:
        for pos, data in blobs:
            cls, name = members[pos]
            try:
                arr = _decode_image(data)
            except Exception as e:
                raise DataError(f"{where}/{cls}/{name}: cannot decode image ({type(e).__name__}: {e})") from e
            if writer is None:
                writer = StoreWriter(out / IMAGES, (n, arr.shape[0], arr.shape[1], 3))
                buf = np.empty((chunk_rows(writer.shape[1:]), *writer.shape[1:]), np.uint8)
                first = f"{where}/{cls}/{name}"
            if arr.shape[:2] != writer.shape[1:3]:
                raise DataError(f"{where}/{cls}/{name}: image is {arr.shape[1]}x{arr.shape[0]} (WxH) but "
                                f"{first} is {writer.shape[2]}x{writer.shape[1]}; all images must have one size")
            if arr.ndim == 2:  # same as PIL's L -> RGB: replicate the channel (kept as C=1 if every image is gray)
                gray[pos] = True
                arr = arr[..., None]
            if fill and (pos != buf_start + fill or fill == len(buf)):  # not next in line, or full: write it out
                writer.write(buf_start, buf[:fill])
                fill = 0
            if not fill:
                buf_start = pos
            buf[fill] = arr
            fill += 1
        if writer is not None and fill:
            writer.write(buf_start, buf[:fill])
        if writer is None:
            raise DataError(f"{where}: no images")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if gray.all():  # every image grayscale: C = 1, the first channel
        full = open_images(out / IMAGES)
        with StoreWriter(out / "gray.npy", (n, *full.shape[1:3], 1)) as w:
            rows = chunk_rows(full.shape[1:])
            for start in range(0, n, rows):
                w.write(start, read_rows(full, start, start + rows)[..., :1])
        del full
        os.replace(out / "gray.npy", out / IMAGES)
    np.save(out / LABELS, labels)
    write_store_meta(out, classes, open_images(out / IMAGES).shape)


def _npz_to_store(path: Path, out: Path) -> None:
    """An ``.npz`` data set as a store folder, its images copied chunk by chunk."""
    with np.load(path, allow_pickle=False) as z:  # labels and classes only: the images stay in the file
        missing = [k for k in ("images", "labels", "classes") if k not in z.files]
        if missing:
            raise DataError(f"{path}: missing array {missing[0]!r} (has {', '.join(z.files) or 'none'})")
        labels, classes = z["labels"], z["classes"]
    shape = npz_shape(path)
    with StoreWriter(out / IMAGES, shape) as w:
        for start, chunk in npz_chunks(path):
            w.write(start, chunk)
    np.save(out / LABELS, np.asarray(labels, np.int64))
    write_store_meta(out, [str(c) for c in classes.reshape(-1)], shape)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
