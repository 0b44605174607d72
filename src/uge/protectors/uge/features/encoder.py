"""Offline fallback feature space: a classifier trained by the protector on its own clean data.

DEVIATION FROM THE PAPER.  The paper takes E_i and E_t from CLIP.  Where no pretrained CLIP weights exist
(offline machines), the image encoder is the penultimate layer of a classifier trained on the clean
training set (``model.forward_features``), and the feature of class c is the L2-normalized mean of the
L2-normalized features of the clean training images of class c (a class prototype in place of the
text feature of "A photo of a <class c>").
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ConfigError, DataError
from .base import FeatureSpace, check_images, register_feature_space

log = logging.getLogger("uge")


def _in_channels(model: nn.Module, default: int) -> int:
    mean = getattr(model, "mean", None)  # Classifier keeps a (1, C, 1, 1) normalization buffer
    return int(mean.shape[1]) if isinstance(mean, torch.Tensor) and mean.ndim == 4 else default


class EncoderSpace(FeatureSpace):
    """Penultimate features of a trained classifier; class features are per-class prototypes.

    Args:
        model: a trained ``Classifier`` (anything with ``forward_features(x in [0, 1]) -> (B, D)``);
            a frozen copy is kept, the caller's model is left as it was.
        train_set: the clean ``ImageDataset`` the prototypes are computed from.
        device: where the space lives.
        name: description for logs and manifests (default ``"encoder:<body class>"``).
        batch_size: batch size for the prototype pass.
    """

    def __init__(self, model: nn.Module, train_set, device="cpu", *, name: str | None = None,
                 batch_size: int = 256):
        super().__init__()
        if not hasattr(model, "forward_features"):
            raise ConfigError(f"the encoder feature space needs a model with forward_features, got {type(model).__name__}")
        self.model = copy.deepcopy(model).to(device)
        self._freeze()
        body = getattr(model, "body", model)
        self.name = name or f"encoder:{type(body).__name__.lower()}"
        self.classes = list(train_set.classes)
        self.in_channels = _in_channels(self.model, train_set.channels)
        self.register_buffer("prototypes", self._prototypes(train_set, device, batch_size), persistent=False)

    @torch.no_grad()
    def _prototypes(self, train_set, device, batch_size: int) -> torch.Tensor:
        images, labels = train_set.tensors(device)
        sums, counts = None, torch.zeros(train_set.num_classes, device=device)
        for i in range(0, len(images), batch_size):
            feats = self.image_features(images[i:i + batch_size].float() / 255).double()
            y = labels[i:i + batch_size]
            if sums is None:
                sums = torch.zeros(train_set.num_classes, feats.shape[1], dtype=feats.dtype, device=device)
            sums.index_add_(0, y, feats)
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
        empty = [train_set.classes[c] for c in range(train_set.num_classes) if counts[c] == 0]
        if len(empty) >= train_set.num_classes - 1:
            raise DataError(f"cannot build class features: images of at least two classes are needed, "
                            f"none of {empty}")
        if empty:  # e.g. one server of a class-split (federated) set; L_fd never picks these classes
            log.warning("no training images of class(es) %s: they get no class feature", empty)
        protos = F.normalize(sums / counts.double().clamp(min=1)[:, None], dim=-1).float()
        protos[counts == 0] = float("nan")
        return protos

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        if x.shape[1] != self.in_channels:
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
        return F.normalize(self.model.forward_features(x), dim=-1)

    def class_features(self) -> torch.Tensor:
        return self.prototypes


@register_feature_space("encoder")
def build_encoder(classes, train_set=None, device="cpu", *, model: nn.Module | None = None,
                  train_fn: Callable | None = None, arch: str | None = None, seed: int = 0,
                  batch_size: int = 256) -> EncoderSpace:
    """Options: ``model`` (already trained), or ``arch`` + ``train_fn(model, train_set) -> model``.

    With ``train_fn``, a fresh ``create_model(arch, num_classes, channels, seed)`` is handed to it;
    with both ``model`` and ``train_fn``, ``model`` is the starting point.
    """
    if train_set is None:
        raise ConfigError("the 'encoder' feature space needs the clean training set (train_set)")
    if list(classes) != list(train_set.classes):
        raise ConfigError(f"classes {list(classes)} do not match the training set's classes {train_set.classes}")
    if model is None:
        if train_fn is None or arch is None:
            raise ConfigError("the 'encoder' feature space needs model= (trained) or arch= and train_fn=")
        from ....models.registry import create_model
        model = create_model(arch, num_classes=train_set.num_classes, in_channels=train_set.channels, seed=seed)
    if train_fn is not None:
        model = train_fn(model, train_set)
    return EncoderSpace(model, train_set, device, name=f"encoder:{arch}" if arch else None, batch_size=batch_size)
