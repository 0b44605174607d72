"""Protect a benchmark's variants ahead of its evaluation, in a second process (two cores, two jobs).

`uge benchmark` protects and evaluates each variant in turn. On a 2-core machine the protections of later
variants can run beside the evaluations of earlier ones: this script publishes (and verifies) the sets of the
named variants into the run folder, exactly as the runner would, and the runner then reuses them. Start it
after the runner, on variants the runner will not reach before they are done (they share a work folder).

    python scripts/protect_ahead.py configs/selectivity-cpu.toml results/selectivity-cpu "UGE (paper reading)" ...
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from uge.benchmark import load_config
from uge.benchmark.runner import _protect_variant, load_data
from uge.protectors import build_protector
from uge.utils import resolve_device


def main(config: str, run_dir: str, *names: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(config)
    train, _ = load_data(cfg)
    device = resolve_device(cfg.device)
    for v in cfg.variants:
        if v.name not in names or v.protector == "clean":
            continue
        vdir = Path(run_dir) / "variants" / v.slug
        vdir.mkdir(parents=True, exist_ok=True)
        prot = build_protector(v.protector, **cfg.params(v))
        start = time.perf_counter()
        _protect_variant(cfg, v, prot, train, vdir, device, progress=False)
        logging.info("[%s] protected ahead in %.1f s", v.name, time.perf_counter() - start)


if __name__ == "__main__":
    main(*sys.argv[1:])
