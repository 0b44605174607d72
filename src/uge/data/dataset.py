"""The one form of an image classification set: uint8 images, int labels, class names.

The images are an array in memory, or a read-only ``np.memmap`` of a store file (:mod:`uge.data.store`), a set
larger than memory: :meth:`ImageDataset.chunks`, :meth:`~ImageDataset.take` and
:meth:`~ImageDataset.batch_source` then read only the rows asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from .store import chunk_rows, read_rows, stored_file, take_rows


@dataclass
class ImageDataset:
    """An image classification set, held in memory or stored (images a memmap of a store file).

    Attributes:
        images: uint8 array (N, H, W, C), C in {1, 3}; a ``np.memmap`` stays one (not read).
        labels: int64 array (N,), values in [0, len(classes)).
        classes: class names; label i names ``classes[i]``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self):
        if not isinstance(self.images, np.memmap):
            self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels)
        self.classes = [str(c) for c in self.classes]
        if self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise DataError(f"images must have shape (N, H, W, C) with C in {{1, 3}}, got {self.images.shape}")
        if self.images.shape[1] < 8 or self.images.shape[2] < 8:
            raise DataError(f"images must be at least 8x8 pixels, got {self.images.shape[1]}x{self.images.shape[2]}")
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got {self.labels.dtype}")
        self.labels = self.labels.astype(np.int64)
        if self.labels.shape != (len(self.images),):
            raise DataError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if len(self.classes) < 2:
            raise DataError(f"need at least 2 classes, got {len(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise DataError("class names must be unique")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(
                f"labels out of range: found [{self.labels.min()}, {self.labels.max()}] "
                f"for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def stored(self) -> bool:
        """Whether the images are a whole store file read on demand (a set larger than memory)."""
        return stored_file(self.images) is not None

    def in_memory(self) -> "ImageDataset":
        """This set with its images read into memory (itself when they are)."""
        if not isinstance(self.images, np.memmap):
            return self
        return ImageDataset(read_rows(self.images, 0, len(self)), self.labels, list(self.classes))

    def chunks(self, rows: int | None = None):
        """``(start, images[start:start + rows])`` over the set, each chunk an array in memory (default size:
        :func:`uge.data.store.chunk_rows`). An in-memory set's chunks are views."""
        rows = rows or chunk_rows(self.images.shape[1:])
        for start in range(0, len(self), rows):
            yield start, (read_rows(self.images, start, start + rows) if isinstance(self.images, np.memmap)
                          else self.images[start:start + rows])

    def take(self, indices) -> np.ndarray:
        """The images at ``indices`` (N, H, W, C), read from the store for a stored set."""
        return take_rows(self.images, indices)

    def batch_source(self, device="cpu"):
        """(images, labels) for training: ``images[idx]`` (idx an int64 tensor) gives uint8 (B, C, H, W) on
        ``device``. For an in-memory set the whole set as one tensor (:meth:`tensors`); for a stored set a
        reader of each batch's rows."""
        if not self.stored:
            return self.tensors(device)
        return _StoredBatches(self, device), torch.from_numpy(self.labels).to(device)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices) -> "ImageDataset":
        """The samples at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(self.take(idx), self.labels[idx], list(self.classes))

    def per_class(self, n: int, seed: int = 0) -> "ImageDataset":
        """A class-balanced subset: ``n`` random samples of every class, in their original order."""
        return self.subset(self.per_class_indices(n, seed))

    def per_class_indices(self, n: int, seed: int = 0) -> np.ndarray:
        """The sorted indices :meth:`per_class` keeps."""
        rng = np.random.default_rng(seed)
        keep = []
        for c in range(self.num_classes):
            idx = np.flatnonzero(self.labels == c)
            if len(idx) < n:
                raise DataError(f"class {self.classes[c]!r} has {len(idx)} samples, fewer than the {n} asked for")
            keep.append(rng.choice(idx, size=n, replace=False))
        return np.sort(np.concatenate(keep))

    def tensors(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (N, C, H, W), int64 labels (N,)) on ``device``; divide by 255 to get [0, 1]. A stored
        set is read whole."""
        images = self.in_memory().images
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        return x, torch.from_numpy(self.labels).to(device)

    def check_compatible(self, other: "ImageDataset", what: str = "test set") -> None:
        """Raise DataError unless ``other`` has the same classes, channels and image size."""
        if other.classes != self.classes:
            raise DataError(f"{what} classes {other.classes} do not match training classes {self.classes}")
        if other.images.shape[1:] != self.images.shape[1:]:
            raise DataError(f"{what} images are {other.images.shape[1:]}, training images {self.images.shape[1:]}")


class _StoredBatches:
    """``[idx]``: the rows ``idx`` of a stored set as uint8 (B, C, H, W) on a device (training's batches)."""

    def __init__(self, data: ImageDataset, device):
        self.data, self.device = data, torch.device(device) if not isinstance(device, torch.device) else device

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = idx.cpu().numpy() if torch.is_tensor(idx) else np.asarray(idx)
        x = torch.from_numpy(np.ascontiguousarray(self.data.take(idx).transpose(0, 3, 1, 2)))
        return x.to(self.device)
