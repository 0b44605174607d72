"""What does the blind input stage cost the authorized network? (issue 11)

Pools the authorized networks' clean test accuracies over every training seed found in the given run folders
(the selectivity bench and configs/keyed-seeds-cpu.toml), per group: the standard architecture on clean
data, the blind one on clean data, the blind one on the keyed set. Prints each group's mean, spread and
seeds and the differences between group means with their standard errors, and writes them to
``<last run>/authorized_cost.json``.

    python scripts/authorized_cost.py results/selectivity-cpu results/keyed-seeds-cpu
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from uge.benchmark.runner import read_records
from uge.models.registry import BLIND
from uge.utils import write_json

GROUPS = {"standard, clean": ("clean", False), "blind, clean": ("clean", True), "blind, keyed set": ("keyed", True)}


def main(*run_dirs: str) -> None:
    accs: dict[str, dict[int, float]] = {g: {} for g in GROUPS}
    for run in run_dirs:
        for r in read_records(run):
            if r["role"] != "authorized" or r.get("countermeasures") or r.get("recipe_label"):
                continue
            for g, (protector, blind) in GROUPS.items():
                if r.get("protector") == protector and r["arch"].startswith(BLIND) == blind:
                    if r["train_seed"] in accs[g]:
                        raise SystemExit(f"seed {r['train_seed']} of group {g!r} found twice ({run})")
                    accs[g][r["train_seed"]] = r["test_acc"]
    stats = {g: {"n": len(a), "seeds": sorted(a), "mean": float(np.mean(list(a.values()))),
                 "std": float(np.std(list(a.values()), ddof=1)) if len(a) > 1 else None,
                 "accuracies": [a[s] for s in sorted(a)]} for g, a in accs.items() if a}
    lines = ["| group | seeds | mean acc % | std |", "|---|---|---|---|"]
    for g, s in stats.items():
        std = "–" if s["std"] is None else f"{s['std']:.2f}"
        lines.append(f"| {g} | {', '.join(map(str, s['seeds']))} | {s['mean']:.2f} | {std} |")
    diffs = {}
    for a, b in (("blind, keyed set", "standard, clean"), ("blind, keyed set", "blind, clean"),
                 ("blind, clean", "standard, clean")):
        if a in stats and b in stats and stats[a]["std"] is not None and stats[b]["std"] is not None:
            se = math.sqrt(stats[a]["std"] ** 2 / stats[a]["n"] + stats[b]["std"] ** 2 / stats[b]["n"])
            diffs[f"{a} − {b}"] = {"difference": stats[a]["mean"] - stats[b]["mean"], "standard_error": se}
    lines += ["", "| difference of means | points | standard error |", "|---|---|---|"]
    lines += [f"| {k} | {v['difference']:+.2f} | {v['standard_error']:.2f} |" for k, v in diffs.items()]
    print("\n".join(lines))
    write_json(Path(run_dirs[-1]) / "authorized_cost.json", {
        "command": "python scripts/authorized_cost.py " + " ".join(run_dirs), "groups": stats,
        "differences": diffs, "table": "\n".join(lines)})


if __name__ == "__main__":
    main(*sys.argv[1:])
