"""Do two runs of the published recipe from the same θ0 end in the same basin?

Issue 10's stop-13 diagnostic. UGE's key is θ0: the perturbation is matched to the authorized network's run
from θ0, and a user's own run (another training seed: batch order, augmentation) must stay near that run for
the matching to hold. Frankle et al. (2020) found ResNet-20 on CIFAR-10 *unstable* to SGD noise at a random
init: two runs from one init are separated by an error barrier on the line between them, as two runs from
different inits are. This script measures it on a benchmark's saved authorized networks (every
``records/VARIANT/*_authorized0_*.safetensors``: the replay seed, the fresh seeds, the clean repeats), all
trained from one θ0 on the same set with different training seeds:

- ``acc(α)``: test accuracy of (1 − α)·θa + α·θb, BatchNorm statistics re-estimated on the (un-augmented)
  training set at every α (the interpolated running statistics are not those of the interpolated network);
- ``barrier``: mean(acc(0), acc(1)) − min over α of acc(α), in points (≈ 0: one basin);
- ``apart``: ‖θa − θb‖ / ‖θa − θ0‖ over the parameters (0: the same network; ≈ 1.4: as far apart as two
  independent directions of the same length).

    python scripts/stability.py configs/selectivity-cpu.toml results/selectivity-cpu clean \
        --out results/selectivity-cpu/stability/clean.json

With ``--against clean`` each network of VARIANT is paired with the clean run of the same training seed
instead: does the authorized run on the protected set end in the basin of its run on the clean set (what
gradient matching aims for)?
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from uge.benchmark import load_config
from uge.benchmark.runner import load_data
from uge.training import accuracy
from uge.utils import write_json
from uge.weights import build_network, load_weights

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> None:
    """Set every BatchNorm's running statistics to their average over ``images`` (uint8 or [0, 1] float)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    model.train()
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        model(x.float().div(255) if x.dtype == torch.uint8 else x)
    model.eval()


def interpolate(a: dict, b: dict, alpha: float) -> dict:
    """(1 − α)·a + α·b for float tensors; integer buffers (BatchNorm's counters) from a."""
    return {k: torch.lerp(a[k], b[k], alpha) if a[k].is_floating_point() else a[k] for k in a}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("run")
    ap.add_argument("variant", help="the variant's folder name under RUN/records (e.g. clean)")
    ap.add_argument("--against", metavar="VARIANT", help="pair each network with the one of the same training "
                    "seed in this variant (e.g. clean: is the run on D_u in the basin of the run on D?)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    cfg = load_config(a.config)
    train_set, test_set = load_data(cfg)
    spec = cfg.authorized(cfg.variants[0])[0]
    model = build_network(spec.arch, train_set.num_classes, train_set.channels, seed=spec.seed, weights=spec.theta0)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    saved = lambda v: sorted((Path(a.run) / "records" / v).glob("*_authorized0_*.safetensors"))
    files = saved(a.variant)
    if a.against:  # same training seed and repeat: the file names agree after the variant's prefix
        theirs = {f.name.removeprefix(a.against): f for f in saved(a.against)}
        todo = [(theirs[f.name.removeprefix(a.variant)], f) for f in files if f.name.removeprefix(a.variant) in theirs]
    else:
        todo = list(itertools.combinations(files, 2))
    if not todo:
        raise SystemExit(f"{a.run}/records/{a.variant}: no pair of saved authorized networks to compare")
    images = train_set.tensors("cpu")[0]
    pairs = []
    for fa, fb in todo:
        sa, sb = load_weights(fa), load_weights(fb)
        accs = []
        for alpha in ALPHAS:
            model.load_state_dict(interpolate(sa, sb, alpha))  # every buffer too: BatchNorm is re-estimated
            reestimate_batchnorm(model, images)  # at the ends too, so that every point is measured alike
            accs.append(round(accuracy(model.eval(), test_set), 2))
        dist = sum((sa[k] - sb[k]).pow(2).sum() for k in names).sqrt()
        moved = sum((sa[k] - theta0[k]).pow(2).sum() for k in names).sqrt()
        pairs.append({"a": fa.stem, "b": fb.stem, "acc": dict(zip(map(str, ALPHAS), accs)),
                      "barrier": round((accs[0] + accs[-1]) / 2 - min(accs), 2), "apart": round(float(dist / moved), 3)})
        print(f"{fa.stem} vs {fb.stem}: acc along the line {accs}, barrier {pairs[-1]['barrier']:.2f} points, "
              f"apart {pairs[-1]['apart']:.3f}")
    write_json(a.out, {"config": a.config, "run": a.run, "variant": a.variant, "against": a.against,
                       "theta0": spec.theta0 or f"seed:{spec.seed}", "alphas": list(ALPHAS), "pairs": pairs,
                       "command": "python scripts/stability.py " + " ".join(argv or sys.argv[1:])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
