"""Can a hacker who knows the method read keyed protection's key off the published set? (issue 20)

Usage: python scripts/pca_key_recovery.py PUBLISHED_DIR --reference SRC [--reference-split test]
                                          [--reference-per-class N] [--out FILE.json]

Fits the ``pca`` countermeasure (colour directions, patch=1) on the published images against clean images from
elsewhere (the reference) and prints the excess directions it found, their variance ratio, and |cos| with the
set's key direction (the manifest's ``params.direction``), with the same for the clean originals' statistics
where the set records a built-in source. Writes the numbers as JSON with the command.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from uge.countermeasures import parse_countermeasures
from uge.data import load_dataset
from uge.published import read_published
from uge.utils import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("published")
    p.add_argument("--reference", required=True, help="clean images from elsewhere (a data source)")
    p.add_argument("--reference-split", default="test")
    p.add_argument("--reference-per-class", type=int)
    p.add_argument("--out")
    a = p.parse_args(argv)
    pub = read_published(a.published)
    key = np.asarray(pub.manifest["params"].get("direction") or [1, -2, 1], float)
    key /= np.linalg.norm(key)
    ref = load_dataset(a.reference, a.reference_split, per_class=a.reference_per_class)
    pca = parse_countermeasures("pca:patch=1,k=3,ratio=1.01")[0]  # every direction with any excess, for the record
    basis = pca.fit(pub.data.images, ref.images)
    found = [{"direction": [round(float(v), 4) for v in basis[:, i]], "variance_ratio": pca.found[i],
              "abs_cos_with_key": round(float(abs(basis[:, i] @ key)), 4)} for i in range(basis.shape[1])]
    doc = {"command": "python " + " ".join(sys.argv), "published": a.published, "method": pub.manifest["method"],
           "key_direction": [round(float(v), 4) for v in key], "reference": a.reference,
           "reference_images": len(ref), "excess_directions": found,
           "default_pca_removes": pca.found and [f for f in found if f["variance_ratio"] >= 1.5]}
    print(json.dumps(doc, indent=1))
    if a.out:
        write_json(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
