"""Principal components of pixel colours: which direction do natural images vary least in? (issue 11)

The keyed protector hides δ along one colour direction; the one with the least variance costs a network
blind to it the least. Prints the covariance's eigenvalues and eigenvectors (8-bit units) and the variance
along candidate directions, and writes them to ``--out``.

    python scripts/colour_pca.py --out results/keyed-probe/colour_pca.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from uge.benchmark.config import load_config
from uge.benchmark.runner import load_data
from uge.utils import write_json

CANDIDATES = {"(1,-2,1)": (1, -2, 1), "(2,-1,-1)": (2, -1, -1), "(1,0,-1)": (1, 0, -1), "(1,1,1)": (1, 1, 1)}
LUMA = np.array([0.299, 0.587, 0.114])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/selectivity-cpu.toml")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    train, _ = load_data(load_config(args.config))
    cov = np.cov(train.images.reshape(-1, 3).astype(np.float64).T)
    values, vectors = np.linalg.eigh(cov)
    total = float(np.trace(cov))
    cand = {}
    for name, c in CANDIDATES.items():
        u = np.asarray(c, float) / np.linalg.norm(c)
        cand[name] = {"variance": float(u @ cov @ u), "share": float(u @ cov @ u) / total, "luma_per_unit": float(LUMA @ c)}
    out = {"command": f"python scripts/colour_pca.py --config {args.config} --out {args.out}",
           "n_images": len(train), "total_variance": total, "eigenvalues": values.tolist(),
           "eigenvectors": vectors.T.tolist(), "candidates": cand}
    print(json.dumps(out, indent=2))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
