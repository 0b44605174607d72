"""What the ``knownbasis`` countermeasure takes of a ``grating`` code, and its two implementations (issue 20).

Usage: python scripts/knownbasis_check.py [--images N] > results/battery-cpu/knownbasis_check.txt

1. The share of a class pattern's energy in the span ``knownbasis`` projects out: the ten bases' sign patterns
   (``dct=0``) and those with the DCT bases (``dct=1``), for the listed patterns of stage G2 (``mix=false``) and
   for 1,000 mixes of the bases with random weights (the default's ``mix``, whose weights the key draws).
2. The earlier implementations (a three-operand einsum, which made the battery's first ``knownbasis`` records,
   and the projector first in a two-operand einsum, which made the later ones) against the one in the package
   (the projector as one broadcast matmul) on ``shapes``: seconds of each, measured in this run on this machine,
   and the fraction of output values that differ (by one level, at rounding ties).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uge.countermeasures import parse_countermeasures, transform_data
from uge.countermeasures.adaptive import _blocks, _unblock
from uge.data import load_splits
from uge.protectors.noise import G2_FREQS, _dct, grating_patterns


def _share(patterns: torch.Tensor, span: torch.Tensor) -> float:
    """Mean fraction of each pattern's energy (rows, 64 values) in the row span of ``span``."""
    q, _ = torch.linalg.qr(span.T)
    inside = patterns @ q
    return float(((inside ** 2).sum(1) / (patterns ** 2).sum(1)).mean())


def spans() -> None:
    n = len(G2_FREQS)
    signs = grating_patterns(n).double().reshape(n, 64)
    both = grating_patterns(n, dct=True).double().reshape(2 * n, 64)
    bases = torch.stack([_dct(*map(int, f.split(","))) for f in G2_FREQS]).double().reshape(n, 64)
    weights = torch.randn(1000, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mixed = torch.where(weights @ bases >= 0, 1.0, -1.0).double()
    print("share of a pattern's energy in the span knownbasis removes")
    for name, pats in (("listed (mix=false)", signs), ("mixed (mix=true, 1,000 draws)", mixed)):
        print(f"  {name:32s} dct=0: {_share(pats, signs):.3f}   dct=1: {_share(pats, both):.3f}")


def implementations(images: int) -> None:
    train, _ = load_splits("shapes", per_class_train=images // 10)
    x = train.images
    cm = parse_countermeasures("knownbasis")[0]
    span = grating_patterns(cm.bases).double().reshape(-1, 64).numpy()
    q, _ = np.linalg.qr(span.T)
    blocks, grid = _blocks(x, 8)
    blocks = blocks.reshape(len(blocks), 64, x.shape[-1])
    earlier = {"first (three-operand einsum)": lambda: np.einsum("pk,qk,nqc->npc", q, q, blocks),
               "second (projector first, einsum)": lambda: np.einsum("pq,nqc->npc", q @ q.T, blocks)}
    t = time.perf_counter()
    now = transform_data([cm], train).images
    t_now = time.perf_counter() - t
    print(f"\nknownbasis on {len(x)} shapes images: the package's implementation (one broadcast matmul) {t_now:.2f} s")
    for name, project in earlier.items():
        t = time.perf_counter()
        out = _unblock((blocks - project()).reshape(len(blocks), -1), x, 8, grid)
        took = time.perf_counter() - t
        print(f"  {name}: {took:.2f} s (x{took / t_now:.1f}); values that differ: {np.mean(out != now):.4%} "
              f"(largest difference {np.abs(out.astype(int) - now).max()} level)")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    a = p.parse_args()
    spans()
    implementations(a.images)
