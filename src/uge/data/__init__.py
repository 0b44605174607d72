"""Image classification data: the in-memory :class:`ImageDataset` and the loaders that fill it."""
from .dataset import ImageDataset
from .loaders import load_dataset, load_splits, save_npz

__all__ = ["ImageDataset", "load_dataset", "load_splits", "save_npz"]
