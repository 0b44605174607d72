"""Model registry: ``register_model``, ``create_model``, ``list_models`` (timm-style).

Every registered network takes images in [0, 1] of shape (B, C, H, W) with any H, W >= 8 and C in {1, 3};
normalization is a layer inside the model, so budgets are always measured in pixel space.
Initialization is a pure function of (name, num_classes, in_channels, seed): the same arguments give
bit-identical weights on any machine, because the model is always built on the CPU under a private RNG.

``blind-<name>`` is network ``<name>`` (the same weights for the same seed) behind a fixed input stage
that cannot see a subspace S of images: every pixel's colour loses its component along the directions of
the ``blind`` buffer (default :data:`BLIND_DIRECTION`). The buffer is part of the state dict, so it is
published with θ0, and no optimizer touches it, so training keeps it bit-identical (the keyed protector).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Generic per-channel statistics: a fixed constant keeps θ0 a function of (name, seed) alone.
MEAN, STD = 0.5, 0.25
BLIND = "blind-"
# The colour direction a blind network cannot see: the smallest principal component of natural images'
# pixel colours (CIFAR-10: (0.43, -0.82, 0.38), 1.5 % of the colour variance; scripts/colour_pca.py),
# rounded to small integers so that a perturbation along it lands exactly on the 8-bit grid (README, "Keyed
# protection").
BLIND_DIRECTION = (1, -2, 1)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(num_classes, in_channels) -> body`` under its function name.

    The body must provide ``forward_features(x) -> (B, D)`` and a linear ``head``.
    """
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered networks, sorted (each also exists as ``blind-<name>``)."""
    return sorted(_REGISTRY)


def known_model(name: str) -> bool:
    """Whether ``name`` is a registered network or the blind version of one."""
    return name.removeprefix(BLIND) in _REGISTRY


def unit_directions(directions) -> torch.Tensor:
    """Orthonormal rows (k, C) spanning the given directions (k, C) (or one direction (C,))."""
    d = torch.as_tensor(directions, dtype=torch.float64).reshape(-1, torch.as_tensor(directions).shape[-1])
    q, r = torch.linalg.qr(d.T)
    if (r.diagonal().abs() < 1e-6).any():
        raise ConfigError(f"blind directions must be linearly independent and non-zero, got {d.tolist()}")
    return q.T.float()


class Classifier(nn.Module):
    """Normalize [0, 1] inputs, then run a body that has ``forward_features`` and ``head``."""

    def __init__(self, body: nn.Module, in_channels: int):
        super().__init__()
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), MEAN), persistent=False)
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), STD), persistent=False)
        self.body = body
        self.register_buffer("blind", None)  # (k, C) orthonormal directions the input stage removes, or None
        self.frozen = False  # True: only the head learns (a linear probe), the features stay as they are

    def freeze_features(self) -> Classifier:
        """Fix everything but the linear head: no gradients for the body, and its BatchNorm statistics kept
        (the body stays in eval mode whatever ``train()`` says), so training fits a linear probe on fixed
        features. Returns self."""
        self.frozen = True
        self.body.requires_grad_(False)
        self.body.head.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.body.eval()
            self.body.head.train(mode)
        return self

    def make_blind(self, directions) -> Classifier:
        """Put the fixed input stage in front: the network stops seeing colour along ``directions`` ((k, C)
        or (C,)), which become the persistent buffer ``blind`` (orthonormal rows). Returns self."""
        u = unit_directions(directions)
        if u.shape[1] != self.mean.shape[1] or u.shape[0] >= u.shape[1]:
            raise ConfigError(f"a blind input stage needs fewer than {self.mean.shape[1]} directions of "
                              f"{self.mean.shape[1]} channels each, got shape {tuple(u.shape)}")
        self.register_buffer("blind", u.to(self.mean.device))
        return self

    def input_stage(self, x: torch.Tensor) -> torch.Tensor:
        """What the network sees of x: x itself, or x without its colour components along ``blind``."""
        if self.blind is None:
            return x
        coef = torch.einsum("kc,bchw->bkhw", self.blind, x)
        return x - torch.einsum("kc,bkhw->bchw", self.blind, coef)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, D) of images x in [0, 1]."""
        return self.body.forward_features((self.input_stage(x) - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images x in [0, 1]."""
        return self.body.head(self.forward_features(x))


def create_model(name: str, num_classes: int, in_channels: int = 3, seed: int = 0) -> Classifier:
    """Build a registered network with initial weights fixed by ``seed``.

    Args:
        name: a name from :func:`list_models`, or ``blind-<name>`` for its blind version (same weights).
        num_classes: number of output logits.
        in_channels: 1 (grayscale) or 3 (RGB).
        seed: initialization seed; equal seeds give bit-identical parameters.
    """
    if not known_model(name):
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                          f"(and {BLIND}<model> for the blind version of each)")
    if name.startswith(BLIND) and in_channels != 3:
        raise ConfigError(f"{name} needs RGB images (3 channels): its input stage removes a colour direction")
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = _REGISTRY[name.removeprefix(BLIND)](num_classes=num_classes, in_channels=in_channels)
    model = Classifier(body, in_channels)
    return model.make_blind(BLIND_DIRECTION) if name.startswith(BLIND) else model
