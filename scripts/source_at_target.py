"""How often does a TAP variant's source network predict the target class on the published set? (issue 20 part 3)

Usage: python scripts/source_at_target.py CONFIG RUN_DIR VARIANT [--out FILE.json]

Trains the variant's source network again (the benchmark's seed: the same network, on the same device kind) and
reads the published set from RUN_DIR. Prints, for each source (the one trained on full images, the ``blanket_`` one
trained on block means for ``source_blanket``, the ``scratch_`` one from random init for ``scratch``), the share of published images it sends to the target class, on the
full images and on their 8×8 block means, beside the same on the clean images and its accuracy: how far the attack
got on its own model. ``protect.json``'s ``source_at_target`` is each source's share on its own view (the block means
for the blanket source) for runs made after stop 39; before, the full images for every source. Writes JSON with
the command.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from uge.benchmark import load_config
from uge.benchmark.runner import load_data
from uge.data.dataset import ImageDataset
from uge.protectors import build_protector
from uge.protectors.tap import block_means
from uge.published import read_published
from uge.training import accuracy
from uge.utils import write_json


def measure(cfg, run_dir: Path, variant: str) -> dict:
    """The shares, in %, for the TAP variant named ``variant`` of the benchmark config ``cfg`` run in ``run_dir``."""
    v = next((v for v in cfg.variants if v.name == variant), None)
    if v is None or v.protector != "tap":
        raise SystemExit(f"error: no TAP variant named {variant!r} in the config")
    tap = build_protector("tap", **cfg.params(v))
    train, _ = load_data(cfg)
    published = read_published(run_dir / "variants" / v.slug / "published").data
    sets = {}  # (the set, its view) -> (that view, its target labels): computed once for every source
    for name, data in (("published", published), ("clean", train)):
        target = tap.targets(data.labels, data.num_classes)
        for view, d in (("full", data), ("block_means", block_means(data))):
            sets[name, view] = d, ImageDataset(d.images, target, d.classes)
    out = {"variant": v.name}
    for kind in tap.source_kinds():  # each source on what it sees, and on the other view
        model = tap.source_network(train, device="cpu", seed=cfg.seed, kind=kind).requires_grad_(False)
        for (name, view), (d, targeted) in sets.items():
            key = f"{'' if kind == 'full' else kind + '_'}source_{name}_{view}"
            out[f"{key}_at_target"] = round(accuracy(model, targeted), 2)
            out[f"{key}_correct"] = round(accuracy(model, d), 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("variant")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    out = {"command": shlex.join(["python", *sys.argv]), **measure(load_config(a.config), a.run_dir, a.variant)}
    for k, val in out.items():
        print(f"{k}: {val}")
    if a.out:
        write_json(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
