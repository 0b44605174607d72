"""Model registry: ``register_model``, ``create_model``, ``list_models`` (timm-style).

Every registered network takes images in [0, 1] of shape (B, C, H, W) with any H, W >= 8 and C in {1, 3};
normalization is a layer inside the model, so budgets are always measured in pixel space.
Initialization is a pure function of (name, num_classes, in_channels, seed): the same arguments give
bit-identical weights on any machine, because the model is always built on the CPU under a private RNG.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Generic per-channel statistics: a fixed constant keeps θ0 a function of (name, seed) alone.
MEAN, STD = 0.5, 0.25


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(num_classes, in_channels) -> body`` under its function name.

    The body must provide ``forward_features(x) -> (B, D)`` and a linear ``head``.
    """
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered networks, sorted."""
    return sorted(_REGISTRY)


class Classifier(nn.Module):
    """Normalize [0, 1] inputs, then run a body that has ``forward_features`` and ``head``."""

    def __init__(self, body: nn.Module, in_channels: int):
        super().__init__()
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), MEAN), persistent=False)
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), STD), persistent=False)
        self.body = body

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, D) of images x in [0, 1]."""
        return self.body.forward_features((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images x in [0, 1]."""
        return self.body.head(self.forward_features(x))


def create_model(name: str, num_classes: int, in_channels: int = 3, seed: int = 0) -> Classifier:
    """Build a registered network with initial weights fixed by ``seed``.

    Args:
        name: a name from :func:`list_models`.
        num_classes: number of output logits.
        in_channels: 1 (grayscale) or 3 (RGB).
        seed: initialization seed; equal seeds give bit-identical parameters.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels)
    return Classifier(body, in_channels)
