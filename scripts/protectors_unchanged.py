"""Does every protector publish the same images as another source tree, on the same data and seed? (issue 19)

Usage: python scripts/protectors_unchanged.py OLD_SRC [NEW_SRC] [--seed S] [--out FILE.json]

Each protector runs with small parameters (the test suite's TINY sizes, on 100 digits, or on 40 synthetic RGB
images for keyed), once with PYTHONPATH=OLD_SRC and once with NEW_SRC, through the one call every version
has: ``build_protector(name, **params).protect(data, device="cpu", seed=S)``. Prints the SHA-256 of the
protected images (and labels) per protector and tree; exit 1 if any differ.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE = {"epochs": 2, "batch_size": 32, "flip": False}
UGE = {"authorized": ["cnn:0"], "recipe": RECIPE, "trajectory_epochs": 2, "generator_epochs": 1, "generator_width": 4,
       "generator_batch_size": 32, "encoder_arch": "lenet", "encoder_recipe": {"epochs": 1, "batch_size": 32,
                                                                                "flip": False}}
TINY = {
    "uge": UGE, "fd": UGE, "uge-delta": {**UGE, "parametrization": "delta", "delta_steps": 2},
    "random": {}, "patch": {"size": 4}, "cuda": {},
    "em": {"arch": "lenet", "train_steps": 2, "pgd_steps": 2, "max_rounds": 2, "batch_size": 32},
    "rem": {"arch": "lenet", "train_steps": 2, "pgd_steps": 2, "max_rounds": 2, "batch_size": 32, "adv_steps": 2},
    "tap": {"arch": "lenet", "epochs": 1, "steps": 3, "batch_size": 32},
    "keyed": {"arch": "lenet", "size": 8, "block": 2, "recipe": {"epochs": 1}},
}

CHILD = """
import hashlib, json, sys
import numpy as np, torch
torch.set_num_threads(1)
from uge.data import ImageDataset, load_splits
from uge.protectors import build_protector
name, params, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
if name == "keyed":
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), np.arange(40) % 4,
                        [f"c{i}" for i in range(4)])
else:
    data = load_splits("digits")[0].per_class(10)
result = build_protector(name.split("-")[0], **params).protect(data, device="cpu", progress=False, seed=seed)
h = hashlib.sha256(result.protected.images.tobytes() + result.protected.labels.tobytes()).hexdigest()
print(json.dumps({"sha256": h, "rho": result.rho}))
"""


def _run(src: Path, name: str, seed: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, name, json.dumps(TINY[name]), str(seed)], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src.resolve())})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=Path("src"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    rows, same = {}, True
    for name in TINY:
        old, new = _run(a.old, name, a.seed), _run(a.new, name, a.seed)
        rows[name] = {"old": old, "new": new, "identical": old == new}
        same &= old == new
        print(f"{name:10s} {'identical' if old == new else 'DIFFERS'}  {old['sha256'][:16]}  {new['sha256'][:16]}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": " ".join(sys.argv), "seed": a.seed, "protectors": rows}
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
