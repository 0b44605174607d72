"""Probe: which tiled pattern inside the keyed direction do hackers pick up? (issue 11, before the bench)

Trains hacker networks on keyed-protected copies of the selectivity bench's training set (one per pattern
setting) and prints their clean test accuracy beside the clean baseline; one seed each, so read the
numbers against the bench's noise (σ ≈ 1.3 points).

    python scripts/keyed_probe.py --out results/keyed-probe/probe.json [--archs lenet,cnn] [--blocks 1,2,4]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from uge.benchmark.config import load_config
from uge.benchmark.runner import load_data
from uge.models import create_model
from uge.protectors import build_protector
from uge.training import accuracy, train
from uge.utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/selectivity-cpu.toml")
    ap.add_argument("--archs", default="lenet,cnn")
    ap.add_argument("--settings", default="size=8,block=1;size=8,block=2;size=8,block=4",
                    help="keyed protector settings, ';' between settings, e.g. 'size=8,block=2'")
    ap.add_argument("--clean", action="store_true", help="also train every arch on the clean data")
    ap.add_argument("--epochs", type=int, default=None, help="override the bench recipe's epochs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(args.config)
    recipe = cfg.recipe if args.epochs is None else type(cfg.recipe).from_dict({**cfg.recipe.to_dict(), "epochs": args.epochs})
    train_set, test_set = load_data(cfg)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["setting"], r["arch"]) for r in rows}
    settings = (["clean"] if args.clean else []) + [s.strip() for s in args.settings.split(";") if s.strip()]
    for setting in settings:
        if setting == "clean":
            data = train_set
        else:
            params = {k: int(v) for k, v in (kv.split("=") for kv in setting.split(","))}
            data = build_protector("keyed", **params).protect(train_set, seed=cfg.seed).protected
        for arch in args.archs.split(","):
            if (setting, arch) in done:
                continue
            model = create_model(arch, train_set.num_classes, 3, seed=1)
            start = time.perf_counter()
            train(model, data, recipe, device="cpu", seed=cfg.seed, progress=False)
            row = {"setting": setting, "arch": arch, "test_acc": accuracy(model, test_set),
                   "train_acc": accuracy(model, data), "seconds": round(time.perf_counter() - start, 1),
                   "epochs": recipe.epochs, "n_train": len(data), "torch_threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            rows.append(row)
            write_json(out, {"command": "python scripts/keyed_probe.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, True))
                + (" --clean" if args.clean else ""), "rows": rows})


if __name__ == "__main__":
    main()
