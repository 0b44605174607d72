"""The shared feature space of L_fd: an image encoder E_i and one constant feature per class.

L_fd (METHOD.md, Eqs. 7-9) compares L2-normalized image features F_i = E_i(x)/||E_i(x)|| with
L2-normalized class features F_t^c.  The paper takes both from CLIP; :mod:`.encoder` is the documented
offline fallback.  Every space is a frozen ``nn.Module`` that stays in eval mode, so it can sit inside a
training module (``.to(device)`` moves it, ``.train()`` leaves it in eval mode).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
from torch import nn

from ....errors import ConfigError

# kind -> builder(classes, train_set, device, **options) -> FeatureSpace
FeatureSpaceBuilder = Callable[..., "FeatureSpace"]
FEATURE_SPACES: dict[str, FeatureSpaceBuilder] = {}


class FeatureSpace(nn.Module, ABC):
    """A frozen image encoder plus constant, L2-normalized class features.

    Attributes:
        name: what the space is, for logs and manifests (e.g. ``"clip:ViT-B-32:/path/file.pt"``).
    """

    name: str = "feature-space"

    @abstractmethod
    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized features (B, D) of images x in [0, 1], shape (B, C, H, W), C in {1, 3}.

        Differentiable with respect to x (the parameters are frozen, the graph to x is kept).
        """

    @abstractmethod
    def class_features(self) -> torch.Tensor:
        """L2-normalized class features (K, D), row c for class c; a constant (no grad)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_features(x)

    @property
    def num_classes(self) -> int:
        return int(self.class_features().shape[0])

    @property
    def dim(self) -> int:
        return int(self.class_features().shape[1])

    def train(self, mode: bool = True) -> "FeatureSpace":
        """Always stays in eval mode: the space is a fixed reference, never trained."""
        return super().train(False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def check_images(x: torch.Tensor) -> None:
    """Raise ValueError unless x is (B, C, H, W) with C in {1, 3}."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}")


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Repeat a grayscale batch (B, 1, H, W) to 3 channels; RGB passes through."""
    check_images(x)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def register_feature_space(kind: str) -> Callable[[FeatureSpaceBuilder], FeatureSpaceBuilder]:
    """Register ``builder(classes, train_set, device, **options) -> FeatureSpace`` under ``kind``."""

    def deco(fn: FeatureSpaceBuilder) -> FeatureSpaceBuilder:
        FEATURE_SPACES[kind] = fn
        return fn

    return deco


def build_feature_space(kind: str, *, classes: Sequence[str], train_set=None, device="cpu",
                        **options) -> FeatureSpace:
    """Build the feature space ``kind`` (a key of :data:`FEATURE_SPACES`).

    Args:
        kind: ``"clip"`` (OpenCLIP, needs pretrained weights) or ``"encoder"`` (offline fallback).
        classes: class names; row c of ``class_features()`` belongs to ``classes[c]``.
        train_set: the protector's clean ``ImageDataset`` (needed by ``"encoder"``).
        device: where the space lives.
        options: passed to the builder (see :func:`uge.protectors.uge.features.clip.build_clip`,
            :func:`uge.protectors.uge.features.encoder.build_encoder`).
    """
    if kind not in FEATURE_SPACES:
        raise ConfigError(f"unknown feature space {kind!r}; known feature spaces: {', '.join(sorted(FEATURE_SPACES))}")
    return FEATURE_SPACES[kind](classes=list(classes), train_set=train_set, device=device, **options)
