"""NTGA's cost on CIFAR-sized images (issue 23): the kernel per block, and the whole protector per 1,000 images.

Usage: python scripts/ntga_speed.py [--data SRC] [--images N] [--blocks 64,128] [--param KEY=VALUE ...]
                                    [--test-per-class M] [--device cpu] [--out FILE.json]

1. Per block size B in --blocks, on random 32x32x3 images: the time of Θ(block, block) + Θ(held-out, block)
   (``held_out`` held-out images, as one NTGA step needs them) without gradient, and of one step of the
   attack (the held-out loss and its gradient in the block's images), for each kernel (infinite, empirical)
   and, for the empirical one at B = 64, of the same kernel by ``torch.func`` Jacobian contraction (the
   reference that the layer-by-layer computation replaces).
2. ``build_protector("ntga", **params).protect`` on a class-balanced subset of N images of --data, timed,
   with seconds per 1,000 images; and, as a check that the attack did something, the test accuracy of kernel
   regression with the same kernel (at the attack's time t, and at infinite time) trained on the clean and on
   the protected N images together, on M test images per class.

3. With --transfer: the same N images protected with each kernel, and every protected set judged by kernel
   regression with each kernel: the infinite one at t and at infinite time, the empirical one of the attack's
   own draw (seed 0) and of another draw (seed 1) — does an attack on one finite network's NTK carry over?

Every time is the median of --repeats runs (the first, warm-up run not counted) for the kernels, one run for
the protector. Writes one JSON (the command, the machine, torch's thread count, every time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

from uge.data import load_dataset
from uge.protectors import build_protector
from uge.protectors.ntga import EmpiricalNTK


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def kernel_rows(params: dict, blocks: list[int], repeats: int, device) -> list[dict]:
    """Per kernel and block size: the kernels one step needs, and one attack step (loss + input gradient)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for kernel_name in ("infinite", "empirical"):
        p = build_protector("ntga", **{**params, "kernel": kernel_name})
        kernel = p.ntk(3072, 0, device)
        x_held = torch.rand(p.held_out, 3072, generator=g, dtype=torch.float64).to(device)
        y_held = torch.randint(0, 10, (p.held_out,), generator=g).to(device)
        test = kernel[0](x_held)
        for b in blocks:
            x = torch.rand(b, 3072, generator=g, dtype=torch.float64).to(device)
            y = torch.randint(0, 10, (b,), generator=g).to(device)

            def kernels(x=x, kernel=kernel, test=test):
                with torch.no_grad():
                    a = kernel[0](x)
                    kernel[1](a, a), kernel[1](test, a)

            def step(x=x, y=y, p=p, kernel=kernel, test=test, y_held=y_held):
                x = x.clone().requires_grad_(True)
                torch.autograd.grad(p.heldout_loss(kernel, x, y, test, y_held, 10), x)

            rows.append({"kernel": kernel_name, "block": b, "held_out": p.held_out,
                         "kernels_s": round(_median_time(kernels, repeats), 4),
                         "step_s": round(_median_time(step, repeats), 4)})
            print(rows[-1], flush=True)
    p = build_protector("ntga", **{**params, "kernel": "empirical"})
    net = EmpiricalNTK(3072, p.width, p.depth, 0, device)
    jac = vmap(jacrev(EmpiricalNTK.forward), in_dims=(None, 0))
    x = torch.rand(64, 3072, generator=g, dtype=torch.float64).to(device)

    def contraction():
        with torch.no_grad():
            j = jac(net.params(), x)
            sum(v.flatten(1) @ v.flatten(1).T for v in j.values())

    rows.append({"kernel": "empirical, torch.func Jacobian contraction", "block": 64, "held_out": 0,
                 "kernels_s": round(_median_time(contraction, 1), 4), "step_s": None})
    print(rows[-1], flush=True)
    return rows


def kernel_accuracy(p, train, test, device, seed: int = 0) -> float:
    """Test accuracy (%) of kernel regression ``p.predict`` (its kernel, time and ridge; an empirical kernel drawn
    from ``seed``) trained on ``train``'s images."""
    def flat(d):
        x = torch.from_numpy(d.images).to(device).double().div(255).permute(0, 3, 1, 2).flatten(1)
        return x, torch.from_numpy(d.labels).long().to(device)

    (x, y), (xt, yt) = flat(train), flat(test)
    features, gram = p.ntk(x.shape[1], seed, device)
    a = features(x)
    with torch.no_grad():
        out = p.predict(gram(a, a), gram(features(xt), a), F.one_hot(y, train.num_classes).double())
    return round((out.argmax(1) == yt).double().mean().item() * 100, 2)


def transfer(params: dict, train, test, device) -> dict:
    """Test accuracy (%) of kernel regression with each judge kernel on the clean set and on the set protected
    with each attack kernel (3. in the module docstring)."""
    judges = {"infinite t": (build_protector("ntga", **{**params, "kernel": "infinite"}), 0),
              "infinite t=None": (build_protector("ntga", **{**params, "kernel": "infinite", "t": None,
                                                              "ridge": params.get("ridge") or 1e-4}), 0),
              "empirical, the attack's draw": (build_protector("ntga", **{**params, "kernel": "empirical"}), 0),
              "empirical, another draw": (build_protector("ntga", **{**params, "kernel": "empirical"}), 1)}
    sets = {"clean": train}
    for kernel in ("infinite", "empirical"):
        sets[f"ntga {kernel}"] = build_protector("ntga", **{**params, "kernel": kernel}).protect(
            train, device=device, progress=False, seed=0).protected
    out = {name: {j: kernel_accuracy(p, d, test, device, seed) for j, (p, seed) in judges.items()}
           for name, d in sets.items()}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg.tar.gz")
    ap.add_argument("--images", type=int, default=200, help="class-balanced training images to protect")
    ap.add_argument("--blocks", default="64,128", help="block sizes of the kernel timings ('' for none)")
    ap.add_argument("--param", action="append", default=[], help="an ntga parameter, KEY=VALUE (JSON value)")
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--transfer", action="store_true", help="also the cross-kernel table (3. above)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    params = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.param)}
    device = torch.device(args.device)
    doc = {"command": shlex.join(["python", *sys.argv]), "python": platform.python_version(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "device": str(device),
           "machine": platform.processor() or platform.machine(), "params": build_protector("ntga", **params).params()}
    blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    doc["kernel_per_block"] = kernel_rows(params, blocks, args.repeats, device) if blocks else []

    classes = 10
    train = load_dataset(args.data, per_class=args.images // classes)
    test = load_dataset(args.data, "test", per_class=args.test_per_class)
    p = build_protector("ntga", **params)
    start = time.perf_counter()
    result = p.protect(train, device=device, progress=False, seed=0)
    seconds = time.perf_counter() - start
    inf = build_protector("ntga", **{**params, "t": None, "ridge": p.ridge or 1e-4})
    levels = int((result.protected.images.astype(int) - train.images.astype(int)).__abs__().max())
    doc["protect"] = {"images": len(train), "image_size": list(train.image_size), "seconds": round(seconds, 2),
                      "seconds_per_1000_images": round(seconds * 1000 / len(train), 1), "linf_levels": levels,
                      "blocks": len(result.history),
                      "held_out_loss_clean": round(statistics.mean(h["loss_clean"] for h in result.history), 5),
                      "held_out_loss_attacked": round(statistics.mean(h["loss"] for h in result.history), 5),
                      "kernel_regression_test_acc": {  # the attack's own regression, and at infinite time
                          f"t={p.t}": {"clean": kernel_accuracy(p, train, test, device),
                                       "ntga": kernel_accuracy(p, result.protected, test, device)},
                          "t=None": {"clean": kernel_accuracy(inf, train, test, device),
                                     "ntga": kernel_accuracy(inf, result.protected, test, device)}},
                      "test_images": len(test)}
    print(json.dumps(doc["protect"]), flush=True)
    if args.transfer:
        doc["transfer"] = transfer(params, train, test, device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
