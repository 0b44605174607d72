"""Hackers who use what is published about the authorized network.

- θ0 plus Gaussian noise (:func:`perturb_init`): a hacker who knows the authorized architecture and θ0
  approximately. Used to sweep "how close must an initialization be to count as authorized": σ = 0 is the
  authorized start exactly. In :mod:`uge.evaluate` such a hacker is written ``ARCH:MODE:theta0+SIGMA[:SEED]``.
- ``copy-input``: a hacker who copies the authorized network's fixed input stage (keyed protection,
  :mod:`uge.protectors.keyed`) in front of their own network, and so stops seeing the keyed perturbation.
- ``probe``: a hacker who trains only a linear head on fixed features. With a network pretrained on clean
  images from elsewhere (the hacker ``ARCH:normal:@FILE.safetensors``) this is the linear probe of transfer
  learning: features that never saw the protected set, so a shortcut in it is learnt only as far as those
  features already respond to it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .registry import ModelAdapter, register_countermeasure


@torch.no_grad()
def perturb_init(model: nn.Module, sigma: float, seed: int = 1) -> nn.Module:
    """Add relative Gaussian noise to every parameter tensor of ``model``, in place, and return it.

    Each floating-point parameter tensor p becomes p + σ·std(p)·N(0, I): the noise is relative to the
    tensor's own spread, so σ means the same for a conv kernel and a classifier head. Tensors with a
    single value or no spread (e.g. BatchNorm weights at 1) get no noise; buffers (BatchNorm running
    statistics) are left alone. The noise comes from a private CPU generator seeded with ``seed``, so it is
    the same on every machine and, for one seed, its direction is the same for every σ.
    """
    if not (sigma >= 0):
        raise ConfigError(f"the θ0 noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return model
    gen = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if not p.is_floating_point() or p.numel() < 2:
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.add_((sigma * p.detach().float().std().cpu() * noise).to(p.device, p.dtype))
    return model


@register_countermeasure
class CopyInputStage(ModelAdapter):
    """Put the first authorized network's blind input stage in front of the hacker's network."""

    name = "copy-input"
    summary = ("copy the authorized network's fixed input stage (keyed protection) in front of the hacker's "
               "network; networks without one have nothing to copy (no change).")

    def adapt(self, model, authorized: list):
        stages = [a.blind for a in authorized if getattr(a, "blind", None) is not None]
        if stages and getattr(model, "make_blind", None) is not None:
            model.make_blind(stages[0].detach().clone().cpu())
        return model


@register_countermeasure
class LinearProbe(ModelAdapter):
    """Train only the hacker network's linear head; its features (and BatchNorm statistics) stay fixed."""

    name = "probe"
    summary = ("a linear probe: only the hacker network's last linear layer learns, its features and BatchNorm "
               "statistics stay as initialized; with a pretrained hacker (ARCH:normal:@FILE) the features of "
               "clean images from elsewhere.")

    def adapt(self, model, authorized: list):
        if getattr(model, "freeze_features", None) is None:
            raise ConfigError(f"countermeasure 'probe' needs a network with a linear head, not {type(model).__name__}")
        return model.freeze_features()
