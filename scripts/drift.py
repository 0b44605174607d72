"""Does the authorized network's run on the protected set stay on the trajectory the generator matched?

Issue 10's diagnosis. L_gm matches the gradients of x and x_u at checkpoints of the authorized network's run on
the *clean* data. If training on x_u leaves that run, the matching no longer holds where the network is, and
x_u is a shortcut for the authorized network as for everyone. This script trains, from the published θ0 and
with one training seed, the authorized network on D and on the published D_u (and a network of the same
architecture from another init on D_u: a hacker), keeps every epoch's checkpoint, and prints per epoch:

- ``gm_clean_run``: the gradient distance of Eq. 6 between x and x_u (batch-mean loss, BatchNorm frozen at the
  clean batch; the measure of the report's diagnostics) at the clean run's checkpoint θt(D);
- ``gm_protected_run``: the same at the checkpoint θt(D_u) of the authorized run on the protected set;
- ``gm_hacker_run``: the same along the other-init network's run on D_u;
- ``apart``: ‖θt(D_u) − θt(D)‖ / ‖θt(D) − θ0‖ (matched parameters), how far the two runs are apart;
- the test accuracy of the three networks after each epoch.

    python scripts/drift.py configs/selectivity-cpu.toml results/selectivity-cpu uge-class-wise-l_gm \
        --seed 1 --out results/selectivity-cpu/drift/uge-class-wise-l_gm.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from uge.benchmark import load_config
from uge.benchmark.runner import load_data
from uge.config import AuthorizedSpec
from uge.models import create_model
from uge.protectors.uge.losses import measured_gradient_distance
from uge.published import authorized_network, read_published
from uge.training import accuracy, record_trajectory
from uge.utils import write_json
from uge.weights import build_network


def gm_distance(model: torch.nn.Module, state: dict, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor,
                batch: int) -> float:
    """The report's gradient distance at ``state``, averaged over batches of ``batch`` images."""
    model.load_state_dict(state)
    return float(np.mean([measured_gradient_distance(model, x[i:i + batch], x_u[i:i + batch], y[i:i + batch])
                          for i in range(0, len(y), batch)]))


def apart(a: dict, b: dict, theta0: dict, names: list[str]) -> float:
    """‖a − b‖ / ‖b − θ0‖ over the parameters ``names`` (0 while b is still θ0)."""
    num = sum((a[k] - b[k]).float().pow(2).sum() for k in names)
    den = sum((b[k] - theta0[k]).float().pow(2).sum() for k in names)
    return float((num / den).sqrt()) if den > 0 else 0.0


def table(rows: list[dict]) -> str:
    """The per-epoch rows as a markdown table."""
    cols = ["epoch", "acc_clean_run", "acc_protected_run", "acc_hacker_run", "gm_clean_run", "gm_protected_run",
            "gm_hacker_run", "apart"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if c == "epoch" else f"{r[c]:.1f}" if c.startswith("acc")
                                       else f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("run_dir")
    p.add_argument("variant", help="the variant's folder name under RUN_DIR/variants")
    p.add_argument("--seed", type=int, default=1, help="the training seed of all three runs (a fresh one)")
    p.add_argument("--hacker-seed", type=int, default=1, help="init seed of the other-init network")
    p.add_argument("--images", type=int, default=512, help="images the distance is averaged over")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    cfg = load_config(a.config)
    clean, test = load_data(cfg)
    pub = read_published(Path(a.run_dir) / "variants" / a.variant / "published")
    prot = pub.data
    if not (np.array_equal(prot.labels, clean.labels) and prot.images.shape == clean.images.shape):
        raise SystemExit("the published set is not the config's training set in the same order")
    epochs = a.epochs or cfg.recipe.epochs
    t0 = time.perf_counter()
    if pub.manifest.get("authorized"):  # the published θ0
        net, arch = authorized_network(pub.path, pub.manifest, 0), pub.manifest["authorized"][0]["arch"]
    else:  # a baseline protector publishes none: the bench's authorized network
        spec = AuthorizedSpec.parse(cfg.protect["authorized"][0])
        net, arch = build_network(spec.arch, clean.num_classes, clean.channels, spec.seed, spec.theta0), spec.arch
    theta0 = {k: v.clone() for k, v in net.state_dict().items()}

    def run(model, data):
        curve = []
        states = record_trajectory(model, data, cfg.recipe, epochs, device="cpu", seed=a.seed, progress=False)
        for s in states:
            model.load_state_dict(s)
            curve.append(accuracy(model, test))
        return states, curve

    runs = {}
    net.load_state_dict(theta0)
    runs["clean_run"] = run(net, clean)
    net.load_state_dict(theta0)
    runs["protected_run"] = run(net, prot)
    hacker = create_model(arch, clean.num_classes, clean.channels, seed=a.hacker_seed)
    runs["hacker_run"] = run(hacker, prot)

    idx = np.random.default_rng(0).permutation(len(clean))[:a.images]
    x = torch.from_numpy(clean.images[idx]).permute(0, 3, 1, 2).float() / 255
    x_u = torch.from_numpy(prot.images[idx]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(clean.labels[idx]).long()
    names = [n for n, w in net.named_parameters() if w.dim() > 1]  # conv and linear weights
    rows = []
    for t in range(epochs + 1):
        row = {"epoch": t}
        for name, (states, curve) in runs.items():
            model = hacker if name == "hacker_run" else net
            row[f"gm_{name}"] = gm_distance(model, states[t], x, x_u, y, a.batch)
            row[f"acc_{name}"] = curve[t]
        row["apart"] = apart(runs["protected_run"][0][t], runs["clean_run"][0][t], theta0, names)
        rows.append(row)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    write_json(a.out, {"command": "python scripts/drift.py " + " ".join(
        [a.config, a.run_dir, a.variant, "--seed", str(a.seed), "--images", str(a.images), "--out", a.out]),
        "variant": a.variant, "arch": arch, "training_seed": a.seed, "hacker_init_seed": a.hacker_seed,
        "images": a.images, "seconds": time.perf_counter() - t0, "epochs": rows})
    Path(a.out).with_suffix(".md").write_text(table(rows))


if __name__ == "__main__":
    main()
