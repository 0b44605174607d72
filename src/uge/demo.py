"""``uge demo``: the whole flow on scikit-learn's digits, which ship with the package (no files, no network)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .config import AuthorizedSpec, FeatureDistance, GeneratorOpt, ProtectConfig
from .data import load_splits
from .evaluate import HackerSpec, evaluate_published, format_table
from .protectors.uge import protect
from .published import publish, read_published, source_record, verify
from .training import Recipe

# Sized for 2 CPU cores: small networks, few epochs; 8x8 digits must not be flipped.
DEMO_RECIPE = Recipe(epochs=20, batch_size=64, lr=0.05, flip=False)
DEMO_CONFIG = ProtectConfig(
    authorized=[AuthorizedSpec("cnn", seed=0)], recipe=DEMO_RECIPE, trajectory_epochs=4, batch_size=64, rho=0.04,
    generator=GeneratorOpt(epochs=8, width=16),
    fd=FeatureDistance(encoder_arch="resnetc20", encoder_recipe=Recipe(epochs=8, batch_size=64, lr=0.05, flip=False)))
DEMO_HACKERS = [HackerSpec("cnn", "normal", seed=1), HackerSpec("lenet", "normal"), HackerSpec("resnetc20", "normal"),
                HackerSpec("lenet", "distill"), HackerSpec("resnetc20", "distill")]


def run_demo(out: str | Path = "uge-demo", device="auto", progress: bool = True) -> tuple[str, float]:
    """Protect digits, verify the published files, evaluate clean vs protected; return (table, seconds)."""
    start = time.perf_counter()
    out = Path(out)
    shutil.rmtree(out / "records", ignore_errors=True)  # a demo always trains afresh
    train, test = load_splits("digits")
    result = protect(train, DEMO_CONFIG, device=device, progress=progress, work_dir=out / ".work")
    publish(result, train, out / "published", formats=("npz", "png"), overwrite=True,
            source=source_record("digits"))
    verify(out / "published", train).raise_if_failed()
    records = evaluate_published(read_published(out / "published"), test, DEMO_HACKERS, clean=train,
                                 out_dir=out / "records", device=device, progress=progress)
    return format_table(records, num_classes=train.num_classes), time.perf_counter() - start
