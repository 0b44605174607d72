"""How much one accuracy varies on a *protected* set: the noise the bench's selectivity must beat there.

Usage: python scripts/poisoned_noise.py CONFIG RUN_DIR VARIANT_SLUG [--seeds 2 3] [--out FILE.json]

The bench's σ comes from the clean variant trained twice. On a protected set networks may vary far more
from run to run (a poison is learnt or not). This script takes a variant's published set and trains, with
the bench's recipe and test set, the authorized network from the published θ0 with each training seed in
``--seeds`` (fresh runs, as a user's), and the same architecture from each init seed in ``--seeds`` (the
hacker with another init), then writes every accuracy and their spread. A selectivity smaller than the
spread between these two groups' members is no result.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from uge.benchmark.config import load_config
from uge.benchmark.runner import load_data
from uge.config import HackerSpec
from uge.evaluate import evaluate_set
from uge.published import read_published
from uge.records import AuthorizedNet
from uge.utils import write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("run_dir", type=Path)
    p.add_argument("variant")
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cfg = load_config(args.config)
    _, test = load_data(cfg)
    pub = read_published(args.run_dir / "variants" / args.variant / "published")
    arch = pub.manifest["authorized"][0]["arch"]
    authorized = [AuthorizedNet(arch, pub.authorized_network(0), "theta0:published0")]
    out = args.out or args.run_dir / "noise" / f"{args.variant}.json"
    records = evaluate_set(pub.data, test, authorized, [HackerSpec(arch, "normal", s) for s in args.seeds],
                           cfg.recipe, data_label=args.variant, out_dir=out.with_suffix(""), device="cpu",
                           seed=args.seeds[0], authorized_seeds=args.seeds[1:])
    auth = [r["test_acc"] for r in records if r["role"] == "authorized"]
    other = [r["test_acc"] for r in records if r["role"] == "hacker"]
    allv = auth + other
    summary = {"command": " ".join(sys.argv), "variant": args.variant, "arch": arch, "seeds": args.seeds,
               "authorized_from_theta0": auth, "other_init": other,
               "mean": statistics.mean(allv), "stdev": statistics.stdev(allv) if len(allv) > 1 else None,
               "range": max(allv) - min(allv)}
    write_json(out, summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
