"""How sample-specific are the published perturbations of a benchmark run?

For every protected variant of RUN_DIR: mean |δ| in 8-bit levels, the share of pixels at the budget's edge,
and the share of δ's energy that is one *universal* pattern (the per-pixel mean of δ over all images) or one
pattern per class. A perturbation that is mostly universal or class-wise is close to a fixed shift that a
network can learn to ignore; sample-wise noise is what the paper's generator is meant to produce.

    python scripts/perturbation_stats.py results/table1-cpu DATA   ->  RUN_DIR/perturbation_stats.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from uge.benchmark import parse_config
from uge.benchmark.runner import load_data
from uge.diagnostics import perturbation_shares
from uge.published import read_published


def main(run_dir: str, data: str | None = None):
    run = Path(run_dir)
    cfg = load_config_from_run(run, data)
    clean, _ = load_data(cfg)
    out = {}
    for v in cfg.variants:
        pubs = sorted((run / "variants" / v.slug).glob("published*"))
        if not pubs:
            continue
        images = clean.images.astype(np.int16).copy()
        for p in pubs:
            pub = read_published(p)
            idx = np.flatnonzero(np.isin(clean.labels, np.unique(pub.data.labels)))
            images[idx] = pub.data.images
            levels = pub.manifest.get("rho_levels") or 255
        out[v.name] = perturbation_shares(images - clean.images.astype(np.int16), clean.labels, levels)
        print(v.name, json.dumps({k: round(x, 3) for k, x in out[v.name].items()}))
    (run / "perturbation_stats.json").write_text(json.dumps(out, indent=2) + "\n")


def load_config_from_run(run: Path, data: str | None):
    """The run's own resolved config (config.json), with the data path overridden if given."""
    d = json.loads((run / "config.json").read_text())
    if data:
        d["data"]["source"] = data
    return parse_config(d)


if __name__ == "__main__":
    main(*sys.argv[1:])
