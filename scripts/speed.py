"""Speed of every stage of protection and evaluation, beside a naive reference measured in the same run.

Prints, per stage: time per call, throughput (images/s), the naive reference's time and the ratio, and
the fraction of the FLOP floor (FLOPs counted by torch.utils.flop_counter for one call, divided by the
device's peak: the vendor bf16 dense peak for known GPUs, otherwise a measured large matmul).

    python scripts/speed.py                                   # CPU-sized defaults (ResNetC-20, 2,000 images)
    python scripts/speed.py --device cuda --arch resnet18 --data .data/cifar10-jpeg.tar.gz --images 50000 \\
        --protect-images 50000 --out results/speed-gpu.json

Stages:
  train_step   one SGD step of --arch (the unit the gradient-matching cost is quoted in)
  gm_step      one L_gm step (clean gradient, gradient on x_u with graph, distance, backward to x_u);
               fast: clean gradient reused + batched cosines; naive: recomputed + per-tensor loop
  gm_fwd_rev   the same input gradient of L_gm by forward-over-reverse (torch.func.jvp of the input
               gradient along ∂Dist/∂g_u); its reference column is double backward, the one the package uses
  gen_step     one generator step with all three losses (fast vs naive as above)
  train_epoch  one epoch of uge.training.train (on GPU: bf16 + channels_last) vs a plain fp32 loop
  protect      uge.protect + publish end to end on --protect-images images (optional)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import replace_all_batch_norm_modules_
from torch.utils.flop_counter import FlopCounterMode

from uge import AuthorizedSpec, ImageDataset, ProtectConfig, load_dataset, protect, publish
from uge.models import create_model
from uge.protectors.uge import Generator, UGEObjective
from uge.protectors.uge.features import build_feature_space
from uge.protectors.uge.losses import (clean_gradient, gradient_distance_reference, gradient_matching_input_grad,
                                      gradient_matching_loss, matched_parameters)
from uge.training import Recipe, train

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks (vendor sheets)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeat: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` (after warm-up), with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def timepair(fast, naive, device, repeat: int) -> tuple[float, float]:
    """Median seconds of two functions timed alternately, so a change in machine load hits both alike."""
    for _ in range(2):
        fast(), naive()
    tf, tn = [], []
    for _ in range(repeat):
        for fn, acc in ((fast, tf), (naive, tn)):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - t)
    return float(np.median(tf)), float(np.median(tn))


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_flops(device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 dense peak (vendor)"
    n = 2048 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sec = timeit(lambda: a @ b, device, repeat=5)
    return 2 * n ** 3 / sec, f"measured {n}x{n} {str(dtype).split('.')[-1]} matmul"


def naive_gm(model, x, x_u, y, params):
    """The straightforward L_gm: clean gradient recomputed, per-tensor cosine loop."""
    g_clean = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)]
    g_u = torch.autograd.grad(F.cross_entropy(model(x_u), y), params, create_graph=True)
    return gradient_distance_reference(g_clean, g_u)


def naive_epoch(model, images, labels, bs, lr=0.05):
    """A plain fp32 PyTorch loop: index a batch, forward, backward, step, read the loss every step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    perm = torch.randperm(len(images), device=images.device)
    for i in range(len(images) // bs):
        idx = perm[i * bs:(i + 1) * bs]
        loss = F.cross_entropy(model(images[idx].float() / 255), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()


def uncached(cfg: ProtectConfig) -> ProtectConfig:
    """The same config without L_gm's clean-gradient cache (the naive reference)."""
    return dataclasses.replace(cfg, gm=dataclasses.replace(cfg.gm, cache_mb=0))


def load(args) -> ImageDataset:
    if args.data:
        data = load_dataset(args.data, "train")  # stored class by class: take a random subset
        return data.subset(np.random.default_rng(0).permutation(len(data))[:args.images])
    rng = np.random.default_rng(0)
    return ImageDataset(rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8),
                        np.arange(args.images) % 10, [str(c) for c in range(10)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnetc20", help="authorized / evaluation network")
    p.add_argument("--encoder-arch", default="resnetc20")
    p.add_argument("--batch", type=int, default=128, help="batch of the step stages")
    p.add_argument("--train-batch", type=int, default=None, help="batch of train_epoch (default --batch)")
    p.add_argument("--data", help="images to use (default: synthetic 32x32x3)")
    p.add_argument("--images", type=int, default=2000, help="images in train_epoch")
    p.add_argument("--width", type=int, default=16, help="generator width")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--protect-images", type=int, default=0, help="also time protect+publish on this many images")
    p.add_argument("--protect-epochs", type=int, default=1, help="generator epochs of the protect stage")
    p.add_argument("--naive-protect", action="store_true", help="also time protect with the reference paths")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = load(args)
    images, labels = data.tensors(device)
    B = args.batch
    x, y = images[:B].float() / 255, labels[:B]
    peak, peak_src = peak_flops(device)
    rows = []

    def row(stage, sec, n_images, flops=None, naive=None, note=""):
        r = {"stage": stage, "seconds": sec, "images_per_s": n_images / sec, "naive_seconds": naive,
             "speedup_vs_naive": None if naive is None else naive / sec,
             "flop_floor_fraction": None if flops is None else flops / peak / sec, "flops": flops, "note": note}
        rows.append(r)
        return r

    # train_step ---------------------------------------------------------------------------------
    model = create_model(args.arch, 10, 3, seed=0).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_step = timeit(step, device, args.repeat)
    row("train_step", t_step, B, count_flops(step), note=f"{args.arch}, batch {B}, fp32")

    # gm_step ------------------------------------------------------------------------------------
    params = matched_parameters(model)
    x_u = (x + 0.02 * torch.randn_like(x)).clamp(0, 1).requires_grad_()
    g_clean = clean_gradient(model, x, y, params)

    def gm_fast():  # backward(inputs=...) rather than autograd.grad: FlopCounterMode's hooks need it
        gradient_matching_loss(model, x, x_u, y, params, g_clean=g_clean).backward(inputs=[x_u])

    def gm_naive():
        naive_gm(model, x, x_u, y, params).backward(inputs=[x_u])

    t_fast, t_naive = timepair(gm_fast, gm_naive, device, args.repeat)
    row("gm_step", t_fast, B, count_flops(gm_fast), naive=t_naive,
        note=f"{t_fast / t_step:.1f}x a train step (naive {t_naive / t_step:.1f}x)")

    # gm_fwd_rev: the same ∂L_gm/∂x_u by forward-over-reverse; its reference column is double backward ----
    fwd_model = replace_all_batch_norm_modules_(copy.deepcopy(model))  # jvp cannot update running stats
    fwd_params = matched_parameters(fwd_model)

    def gm_fwd():
        return gradient_matching_input_grad(fwd_model, x_u, y, fwd_params, g_clean)[1]

    def gm_double():
        return torch.autograd.grad(gradient_matching_loss(model, x, x_u, y, params, g_clean=g_clean), x_u)[0]

    ref = gm_double()
    err = float((gm_fwd() - ref).norm() / ref.norm().clamp(min=1e-30))
    t_fwd, t_dbl = timepair(gm_fwd, gm_double, device, args.repeat)
    row("gm_fwd_rev", t_fwd, B, naive=t_dbl,
        note=f"∂L_gm/∂x_u by forward-over-reverse; 'naive' column = double backward (used: "
             f"{'forward-over-reverse would be faster' if t_fwd < t_dbl else 'it is faster'}); rel. diff {err:.1e}")

    # gen_step -----------------------------------------------------------------------------------
    cfg = ProtectConfig.from_dict({"authorized": [AuthorizedSpec(args.arch, 0)], "generator_width": args.width,
                                   "encoder_arch": args.encoder_arch})
    encoder = create_model(args.encoder_arch, 10, 3, seed=1)
    space = build_feature_space("encoder", classes=data.classes, train_set=data.subset(np.arange(min(500, len(data)))),
                                device=device, model=encoder, arch=args.encoder_arch).eval().requires_grad_(False)
    gm_models = [[create_model(args.arch, 10, 3, seed=0).to(device).train() for _ in range(cfg.trajectory_epochs)]]
    ud = [create_model(args.arch, 10, 3, seed=0).to(device).eval().requires_grad_(False)]
    hacker = create_model(args.arch, 10, 3, seed=5).to(device).eval().requires_grad_(False)
    gen = Generator(3, cfg.rho, width=args.width).to(device).train()
    gopt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    objectives = {"fast": UGEObjective(cfg, gm_models, ud, space, hacker),
                  "naive": UGEObjective(uncached(cfg), gm_models, ud, space, hacker)}
    rng = np.random.default_rng(0)

    def gen_step(kind):
        obj = objectives[kind]
        if kind == "naive":  # reference distance: swap the batched one for the loop
            import uge.protectors.uge.losses as L

            fast_fn, L.gradient_distance = L.gradient_distance, gradient_distance_reference
        try:
            terms = obj.terms(x, gen(x), y, rng, batch_id=0 if kind == "fast" else None)
            loss = sum(terms.values())
            gopt.zero_grad()
            loss.backward(inputs=list(gen.parameters()))
            gopt.step()
            if kind == "naive":
                [v.item() for v in terms.values()]  # the per-term host sync of the reference loop
        finally:
            if kind == "naive":
                L.gradient_distance = fast_fn

    t_gfast, t_gnaive = timepair(lambda: gen_step("fast"), lambda: gen_step("naive"), device, args.repeat)
    row("gen_step", t_gfast, B, count_flops(lambda: gen_step("fast")), naive=t_gnaive,
        note=f"all three losses, generator width {args.width}; {t_gfast / t_step:.1f}x a train step")

    # train_epoch --------------------------------------------------------------------------------
    tb = args.train_batch or B
    recipe = Recipe(epochs=1, batch_size=tb, lr=0.05)
    epoch_model = create_model(args.arch, 10, 3, seed=0)
    train(epoch_model, data, recipe, device=device, progress=False)  # warm-up (cudnn autotune, allocator)
    t0 = time.perf_counter()
    train(epoch_model, data, recipe, device=device, progress=False)
    sync(device)
    t_epoch = time.perf_counter() - t0
    naive_model = create_model(args.arch, 10, 3, seed=0).to(device)
    naive_epoch(naive_model, images, labels, tb)
    sync(device)
    t0 = time.perf_counter()
    naive_epoch(naive_model, images, labels, tb)
    sync(device)
    t_nepoch = time.perf_counter() - t0
    xb = images[:tb].float() / 255
    f_step = count_flops(lambda: F.cross_entropy(epoch_model.train()(xb), labels[:tb]).backward())
    row("train_epoch", t_epoch, len(data), f_step * (len(data) // tb), naive=t_nepoch,
        note=f"{args.arch}, {len(data)} images, batch {tb}")

    # protect ------------------------------------------------------------------------------------
    if args.protect_images:
        sub = data.subset(np.arange(min(args.protect_images, len(data))))
        pcfg = ProtectConfig.from_dict({
            "authorized": [AuthorizedSpec(args.arch, 0)], "generator_width": args.width,
            "generator_epochs": args.protect_epochs, "encoder_arch": args.encoder_arch,
            "recipe": Recipe(epochs=10, batch_size=tb), "encoder_recipe": Recipe(epochs=5, batch_size=tb)})
        kinds = ["fast"] + (["naive"] if args.naive_protect else [])
        times = {}
        for kind in kinds:
            c = pcfg if kind == "fast" else uncached(pcfg)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = protect(sub, c, device=device, progress=False)
                publish(res, sub, Path(tmp) / "pub", formats=("npz",))
                times[kind] = (time.perf_counter() - t0, res.seconds)
        sec, stages = times["fast"]
        row("protect", sec, len(sub), naive=times.get("naive", (None,))[0],
            note=f"{len(sub)} images, {args.protect_epochs} generator epochs; stages "
                 + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {device} ({machine}); torch {torch.__version__}; peak {peak / 1e12:.2f} TFLOP/s ({peak_src})")
    print(f"{'stage':<12} {'s/call':>9} {'images/s':>10} {'naive s':>9} {'speedup':>8} {'FLOP floor':>10}  note")
    for r in rows:
        naive = "" if r["naive_seconds"] is None else f"{r['naive_seconds']:.4f}"
        spd = "" if r["speedup_vs_naive"] is None else f"{r['speedup_vs_naive']:.2f}x"
        fl = "" if r["flop_floor_fraction"] is None else f"{100 * r['flop_floor_fraction']:.1f}%"
        print(f"{r['stage']:<12} {r['seconds']:>9.4f} {r['images_per_s']:>10.0f} {naive:>9} {spd:>8} {fl:>10}  {r['note']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "machine": machine, "torch": torch.__version__,
                                              "peak_flops": peak, "peak_source": peak_src, "args": vars(args),
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
