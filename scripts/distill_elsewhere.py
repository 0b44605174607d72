"""Does a distilled student need the protected images at all? (issue 11)

The keyed mode's authorized network sees the clean image (f(x + δ) = f(x)), so its soft labels on the
protected set are its soft labels on the clean set. A student distilled from it learns what the teacher knows,
whatever images carry the queries. This script distils the bench's student (ResNetC-20, init seed 1, the
bench recipe, KL at τ = 4, labels unused) from a trained authorized network on CIFAR-10 training images that
are *not* in the bench's subset (no protection, no labels: query access only) and prints its test accuracy
beside the teacher's. If it matches the bench's distilled student on the protected set, no perturbation of
the training images can stop distillation from a teacher that sees them clean.

    python scripts/distill_elsewhere.py configs/selectivity-cpu.toml \
        results/selectivity-cpu/records/keyed-4-4-cells-along-1-2-1/keyed-4-4-cells-along-1-2-1_authorized0_blind-resnetc20.safetensors \
        --arch blind-resnetc20 --out results/keyed-probe/distill_elsewhere.json
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from uge.benchmark import load_config
from uge.benchmark.runner import load_data
from uge.data import load_dataset
from uge.models import create_model
from uge.training import DistillTask, accuracy, train
from uge.utils import write_json
from uge.weights import build_network


def other_images(full, per_class: int, bench_per_class: int, subset_seed: int, seed: int):
    """``per_class`` images of every class outside the bench's subset, and the bench subset's indices."""
    bench = full.per_class_indices(bench_per_class, subset_seed)
    return full.subset(np.setdiff1d(np.arange(len(full)), bench)).per_class(per_class, seed), bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("teacher", help="weights of the trained authorized network (a bench record's .safetensors)")
    p.add_argument("--arch", default="blind-resnetc20", help="the teacher's architecture")
    p.add_argument("--student", default="resnetc20")
    p.add_argument("--student-seed", type=int, default=1)
    p.add_argument("--per-class", type=int, default=None, help="default: the bench's per_class")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    t0 = time.perf_counter()
    cfg = load_config(a.config)
    d = cfg.data
    bench_train, test = load_data(cfg)
    full = load_dataset(d.source, d.split)
    queries, bench_idx = other_images(full, a.per_class or d.per_class, d.per_class, d.subset_seed, seed=12345)
    if not np.array_equal(full.subset(bench_idx).images, bench_train.images):  # the exclusion is the bench's
        raise SystemExit("could not reproduce the bench's training subset")
    n_bench = len(bench_idx)
    teacher = build_network(a.arch, full.num_classes, full.channels, weights=a.teacher)
    student = create_model(a.student, full.num_classes, full.channels, seed=a.student_seed)
    train(student, queries, cfg.recipe, task=DistillTask(teacher, cfg.recipe.temperature), device=cfg.device,
          seed=a.student_seed, progress=False, desc="distil")
    res = {"command": "python scripts/distill_elsewhere.py " + " ".join(
        [a.config, a.teacher, "--arch", a.arch, "--student", a.student, "--out", a.out]),
        "teacher": a.teacher, "teacher_arch": a.arch, "teacher_test_acc": accuracy(teacher, test),
        "student": a.student, "student_init_seed": a.student_seed, "recipe": cfg.recipe.to_dict(),
        "query_images": len(queries), "bench_images_excluded": n_bench,
        "student_test_acc": accuracy(student, test), "test_images": len(test),
        "seconds": time.perf_counter() - t0}
    print(f"teacher {res['teacher_test_acc']:.2f} %  student distilled on {len(queries)} other images "
          f"{res['student_test_acc']:.2f} %")
    write_json(a.out, res)


if __name__ == "__main__":
    main()
