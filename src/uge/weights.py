"""Safe weight files: safetensors only, never pickle."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ConfigError
from .models.registry import Classifier, create_model
from .utils import atomic_file


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write a state dict as safetensors (atomically: temp file, then rename)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a valid safetensors weights file: {e}") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata stored beside a safetensors file's tensors ({} when there is none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a valid safetensors file: {e}") from None


def load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights from ``path`` into ``model``; a shape or key mismatch is a ConfigError."""
    state = load_weights(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"weights in {path} do not fit this network: {str(e).splitlines()[0]}") from None
    return model


def build_network(arch: str, num_classes: int, in_channels: int, seed: int = 0,
                  weights: str | os.PathLike | None = None) -> Classifier:
    """A registered network initialized from ``seed``, or from a weights file when one is given."""
    model = create_model(arch, num_classes, in_channels, seed=seed)
    return load_into(model, weights) if weights else model
