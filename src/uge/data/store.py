"""Image sets larger than memory: the *store*, an uncompressed ``.npy`` of shape (N, H, W, C) uint8.

Why ``.npy``: it is what users' loaders already open without loading it whole — ``np.load(f, mmap_mode="r")``
in NumPy, ``torch.from_numpy`` of that memmap in PyTorch, ``tf.data`` / JAX / anything that reads NumPy — it
is lossless, and image ``i`` lies at a fixed offset, so random access by index is one read. (WebDataset tar
shards suit object stores that stream sequentially; a store converts to them, not back, without decoding.)

A store folder holds ``images.npy``, ``labels.npy`` (N,) int64 and ``store.json`` (the class names and the
shape); :func:`open_store` gives an :class:`~uge.data.ImageDataset` whose images stay a read-only
``np.memmap``. This module writes stores chunk by chunk with ``pwrite`` and reads rows with ``pread``
(:class:`StoreWriter`, :func:`read_rows`, :func:`take_rows`) rather than through the mapping: pages touched
through a mapping count in the process's resident memory until the kernel drops them, pages read with
``pread`` only in the page cache, so a pass over a store keeps the resident memory flat in N.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..utils import atomic_dir

IMAGES, LABELS, STORE_FILE = "images.npy", "labels.npy", "store.json"
STORE_FORMAT = "uge-store"
CHUNK_BYTES = 8 << 20  # the images one chunk holds, at most (one image at least): small, as a chunk's float
# temporaries (protectors, similarity) are several times its bytes


def chunk_rows(image_shape, chunk_bytes: int | None = None) -> int:
    """Images per chunk: as many as fit in ``chunk_bytes`` (default :data:`CHUNK_BYTES`), a multiple of 1,000
    when 1,000 fit (the batch of :func:`uge.similarity.ssim`, so a chunked mean adds what the whole-set one
    adds), at least one."""
    rows = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, int(np.prod(image_shape))))
    return rows - rows % 1000 if rows >= 1000 else rows


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ------------------------------------------------------------------------------------------ images.npy


def open_images(path: str | os.PathLike) -> np.memmap:
    """The images of a store file as a read-only memmap; a corrupt or truncated file is one-line DataError."""
    path = Path(path)
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such image store") from None
    except Exception as e:  # bad magic, bad header, file shorter than its header says (mmap length), ...
        raise DataError(f"{path}: not a readable image store, corrupt or truncated ({_one_line(e)})") from None
    if not isinstance(a, np.memmap) or a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3) \
            or not a.flags.c_contiguous:
        raise DataError(f"{path}: an image store is a C-ordered uint8 array (N, H, W, C) with C in {{1, 3}}, "
                        f"got {a.dtype} {a.shape}")
    size = path.stat().st_size
    if size != a.offset + a.nbytes:
        raise DataError(f"{path}: {size} bytes where its header says {a.offset + a.nbytes}: truncated or appended to")
    return a


def stored_file(images: np.ndarray) -> tuple[str, int] | None:
    """(file, offset of the first image) when ``images`` is a whole C-ordered file mapping (rows read with
    ``pread``); None for an array in memory or a view of part of a mapping."""
    if not isinstance(images, np.memmap) or not images.filename or not images.flags.c_contiguous:
        return None
    try:
        whole = os.path.getsize(images.filename) == images.offset + images.nbytes
    except OSError:
        return None
    return (images.filename, int(images.offset)) if whole else None


def _pread_into(fd: int, buf: np.ndarray, pos: int) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], pos + done)
        if got <= 0:
            raise DataError(f"unexpected end of an image store at byte {pos + done}")
        done += got


def read_rows(images: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``images[start:stop]`` as an array in memory (read with ``pread`` from a store file)."""
    where = stored_file(images)
    if where is None:
        return np.array(images[start:stop])
    start, stop = max(0, start), min(len(images), stop)
    out = np.empty((max(0, stop - start), *images.shape[1:]), np.uint8)
    if len(out):
        fd = os.open(where[0], os.O_RDONLY)
        try:
            _pread_into(fd, out, where[1] + start * out[0].nbytes)
        finally:
            os.close(fd)
    return out


def take_rows(images: np.ndarray, indices) -> np.ndarray:
    """``images[indices]`` as an array in memory (one ``pread`` per run of consecutive indices of a store)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    where = stored_file(images)
    if where is None:
        return images[idx]
    n = len(images)
    if len(idx) and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for {n} images")
    idx = np.where(idx < 0, idx + n, idx)
    out = np.empty((len(idx), *images.shape[1:]), np.uint8)
    row = int(np.prod(images.shape[1:]))
    fd = os.open(where[0], os.O_RDONLY)
    try:
        i = 0
        while i < len(idx):
            j = i + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            _pread_into(fd, out[i:j], where[1] + int(idx[i]) * row)
            i = j
    finally:
        os.close(fd)
    return out


class StoreWriter:
    """Write an images ``.npy`` of ``shape`` (N, H, W, C) uint8 by chunks at any positions (``pwrite``, no
    mapping), atomically: the file appears under its name on :meth:`close` (a context manager's clean exit).

    The bytes are those of ``np.save`` of the whole array."""

    def __init__(self, path: str | os.PathLike, shape):
        self.path, self.shape = Path(path), tuple(int(s) for s in shape)
        if len(self.shape) != 4 or self.shape[-1] not in (1, 3):
            raise DataError(f"an image store has shape (N, H, W, C) with C in {{1, 3}}, got {self.shape}")
        self.row = int(np.prod(self.shape[1:]))
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": self.shape})
            self.offset = f.tell()
            f.truncate(self.offset + self.shape[0] * self.row)
        self.fd = os.open(self.tmp, os.O_WRONLY)

    def write(self, start: int, images: np.ndarray) -> None:
        """Images ``start``, ``start + 1``, … are ``images`` (uint8, rows of this store's image shape)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape[1:] != self.shape[1:] or start < 0 or start + len(images) > self.shape[0]:
            raise DataError(f"cannot write images {images.shape} at {start} into a store of {self.shape}")
        view, done, pos = memoryview(images).cast("B"), 0, self.offset + start * self.row
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], pos + done)

    def close(self) -> Path:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, kind, *_):
        self.abort() if kind else self.close()


def write_images(path: str | os.PathLike, chunks, shape) -> Path:
    """Write ``chunks`` ((start, images) pairs, e.g. :meth:`ImageDataset.chunks`) as an images ``.npy``."""
    with StoreWriter(path, shape) as w:
        for start, images in chunks:
            w.write(start, images)
    return Path(path)


def npz_chunks(path: str | os.PathLike, rows: int | None = None):
    """(start, images) of an ``.npz``'s ``images`` array (stored uncompressed, as :func:`np.savez` writes it),
    read from its zip member in chunks of ``rows`` images."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if dtype != np.uint8 or fortran or len(shape) not in (3, 4):
                raise DataError(f"{path}: images are {dtype} {shape}, not C-ordered uint8 (N, H, W[, C])")
            if len(shape) == 3:
                shape = (*shape, 1)
            rows = rows or chunk_rows(shape[1:])
            row = int(np.prod(shape[1:]))
            for start in range(0, shape[0], rows):
                n = min(rows, shape[0] - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise DataError(f"{path}: images.npy is truncated")
                yield start, np.frombuffer(buf, np.uint8).reshape(n, *shape[1:])
    except DataError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz data set ({_one_line(e)})") from None


def npz_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape (N, H, W, C) of an ``.npz``'s images, from its header (nothing else read)."""
    with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read(f)[0]
    return (*shape, 1) if len(shape) == 3 else tuple(shape)


# ------------------------------------------------------------------------------------------ store folders


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a store folder (``store.json`` beside ``images.npy``)."""
    path = Path(path)
    return (path / STORE_FILE).is_file() and (path / IMAGES).is_file()


def open_store(path: str | os.PathLike):
    """The store folder ``path`` as an :class:`~uge.data.ImageDataset` whose images stay a memmap."""
    from .dataset import ImageDataset

    path = Path(path)
    try:
        meta = json.loads((path / STORE_FILE).read_text())
        classes = list(meta["classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / STORE_FILE}: not a readable store description ({_one_line(e)})") from None
    images = open_images(path / IMAGES)
    try:
        labels = np.load(path / LABELS, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path / LABELS}: not readable ({_one_line(e)})") from None
    try:
        return ImageDataset(images, labels, classes)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def save_store(dataset, path: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``dataset`` (in memory or a store) as a store folder, chunk by chunk and atomically."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_images(tmp / IMAGES, dataset.chunks(), dataset.images.shape)
        np.save(tmp / LABELS, np.asarray(dataset.labels, np.int64))
        write_store_meta(tmp, dataset.classes, dataset.images.shape, extra)
    return Path(path)


def write_store_meta(folder: str | os.PathLike, classes, shape, extra: dict | None = None) -> None:
    """A store folder's ``store.json``: its class names and shape."""
    (Path(folder) / STORE_FILE).write_text(json.dumps(
        {"format": STORE_FORMAT, "format_version": 1, "classes": [str(c) for c in classes],
         "num_samples": int(shape[0]), "image_shape": [int(s) for s in shape[1:]], **(extra or {})}, indent=1) + "\n")
