"""What a perturbation is made of: how much of its energy is universal, class-wise or sample-wise.

A perturbation that is mostly one pattern for every image (or one per class) is close to a fixed shift,
which a network can learn around (universal) or take as a label shortcut (class-wise); sample-wise noise is
what the paper's generator is meant to produce. Used by the benchmark runner (``protect.json``), the
generator's per-epoch diagnostics and ``scripts/perturbation_stats.py``.
"""
from __future__ import annotations

import numpy as np
import torch


def perturbation_shares(delta, labels, levels: float | None = None) -> dict:
    """Energy shares of δ (N, ...) with labels (N,): universal (the per-pixel mean over the set), class-wise
    (per-class means) and sample-wise (the rest, 1 − class-wise), plus mean |δ| and, given the budget in
    ``levels`` (the unit of δ), the share of values at the budget's edge."""
    d = delta.double() if isinstance(delta, torch.Tensor) else torch.from_numpy(np.asarray(delta, np.float64))
    y = torch.as_tensor(np.asarray(labels)).long()
    d = d.reshape(len(d), -1)
    energy = d.pow(2).sum().clamp(min=1e-12)
    universal = d.mean(0).pow(2).sum() * len(d) / energy
    classes = y.unique()
    class_means = torch.stack([d[y == c].mean(0) for c in classes])
    classwise = class_means[torch.searchsorted(classes, y)].pow(2).sum() / energy
    out = {"mean_abs": float(d.abs().mean()), "universal_energy_share": float(universal),
           "classwise_energy_share": float(classwise), "samplewise_energy_share": float(1 - classwise)}
    if levels is not None:
        out["at_budget_edge"] = float((d.abs() >= levels - 1e-6).double().mean())
    return out
