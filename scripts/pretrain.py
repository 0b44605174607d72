"""A θ0 past the stability point: a network pretrained on another data set, with a fresh head for the task.

Issue 10's stop-13 hypothesis. From a *random* θ0, two runs of the same recipe with different training seeds
(batch order, augmentation) end in different basins (Frankle et al. 2020, "Linear mode connectivity and the
lottery ticket hypothesis": ResNet-20 on CIFAR-10 is unstable to SGD noise at init), so a fixed random θ0 says
little about where a user's run goes. From *pretrained* weights, fine-tuning runs stay in one basin (Neyshabur
et al. 2020, "What is being transferred in transfer learning?"). This script writes such a θ0: ``ARCH`` trained
with ``--epochs`` of SGD on ``--per-class`` images per class of ``--source`` (CIFAR-100 by default: no class or
image shared with the CIFAR-10 task), then its head replaced by a fresh ``--classes``-way head from ``--seed``.

    python scripts/pretrain.py --arch resnetc20 --seed 0 --out runs/pretrained/resnetc20-c100-s0.safetensors

The file is a θ0 for ``authorized = ["resnetc20:FILE"]`` and, with another seed, for a hacker with its own
pretraining (``resnetc20:normal:@FILE``).
"""
from __future__ import annotations

import argparse
import time

from uge.config import Recipe
from uge.data import load_splits
from uge.models import create_model
from uge.training import accuracy, train
from uge.weights import save_weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="../shared/datasets/cifar100-jpeg.tar.gz")
    ap.add_argument("--arch", default="resnetc20")
    ap.add_argument("--seed", type=int, default=0, help="init, training order and the new head")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--classes", type=int, default=10, help="classes of the task the θ0 is for")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    t0 = time.time()
    train_set, test_set = load_splits(a.source, per_class_train=a.per_class, per_class_test=20, seed=a.seed)
    model = create_model(a.arch, train_set.num_classes, train_set.channels, seed=a.seed)
    train(model, train_set, Recipe(epochs=a.epochs), device="cpu", seed=a.seed, progress=False, desc="pretrain")
    acc = accuracy(model, test_set)
    fresh = create_model(a.arch, a.classes, train_set.channels, seed=a.seed)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("body.head.")}
    missing = fresh.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith("body.head.") for k in missing), missing
    save_weights(a.out, fresh.state_dict(), metadata={
        "arch": a.arch, "pretrained_on": str(a.source), "per_class": str(a.per_class), "epochs": str(a.epochs),
        "seed": str(a.seed), "pretrain_test_accuracy": f"{acc:.2f}"})
    print(f"{a.out}: {a.arch} pretrained on {train_set.num_classes} classes x {a.per_class} images, {a.epochs} "
          f"epochs, test accuracy {acc:.2f} %; head reset to {a.classes} classes ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
