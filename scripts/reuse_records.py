"""Reuse finished networks of earlier benchmark runs in a new run folder, only where they are the same experiment.

A network's record is the same cell of the new grid when its run had the same data, recipe and seed, its
variant the same protector and parameters, and its file name is one the new config would write (the same
network, training mode, seed and countermeasure). Those records (and their weights) are copied into the new
run folder before ``uge benchmark`` runs it, which then skips them; every copy is listed in ``RUN/reused.json``
with its source. ``--check`` afterwards compares the perturbation statistics of every variant the new run
protected again (``variants/*/protect.json``) with the source run's: equal statistics mean the same images.

    python scripts/reuse_records.py configs/battery-cpu.toml results/battery-cpu --from results/ladder-cpu ...
    python scripts/reuse_records.py configs/battery-cpu.toml results/battery-cpu --check
    python scripts/reuse_records.py configs/battery-gpu-tap.toml results/battery-gpu-tap --from results/battery-gpu \
        --data .data/cifar10-jpeg.tar.gz       # the data as the GPU machine's run names it (`benchmark --data`)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from uge.benchmark import load_config
from uge.benchmark.config import parse_config
from uge.countermeasures import countermeasure_slug, parse_countermeasures

SAME = ("data", "recipe", "seed")  # what a source run must share with the new one
# and, per variant, the protector's resolved parameters: the [protect] table counts only where the protector has
# the key (UGE's generator settings and authorized networks do not change a grating or REM)


def _variant(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "countermeasures"}  # the screen is not the experiment


def _params(cfg, v) -> dict:
    return {} if v.protector == "clean" else cfg.params(v)


def wanted(cfg, v):
    """Whether a record file name (without .json) is one the runner writes for variant ``v`` of ``cfg``."""
    cms = cfg.countermeasures if v.countermeasures is None else v.countermeasures
    hackers = cfg.hackers if v.hackers is None else v.hackers
    suffixes = {f"__{countermeasure_slug(parse_countermeasures(c))}" if c else "" for c in cms}
    names = {f"{v.slug}_hacker_{h.key}{s}" for h in hackers for s in suffixes}  # the runner's names
    auth = suffixes if cfg.countermeasures_authorized else {""}
    # the authorized networks this config trains (none where key holders unseal: `authorized = []`)
    authorized = {f"{v.slug}_authorized{k}_{a.arch}" for k, a in enumerate(cfg.authorized(v))}

    def ok(stem: str) -> bool:
        if stem in names:
            return True
        name, _, suffix = stem.partition("__")  # a fresh seed (__seed1) or a recipe is another cell
        return name in authorized and (f"__{suffix}" if suffix else "") in auth
    return ok


def reuse(cfg, run: Path, sources: list[Path]) -> list[dict]:
    """Copy into ``run`` the records of ``sources`` that are cells of ``cfg`` (a BenchmarkConfig); list them."""
    mine = cfg.to_dict()
    listed = run / "reused.json"  # an earlier reuse into the same run stays listed
    copied = {Path(r["record"]).name: r for r in json.loads(listed.read_text())} if listed.exists() else {}
    for src in sources:
        theirs = json.loads((src / "config.json").read_text())
        if any(theirs.get(k) != mine.get(k) for k in SAME):
            print(f"skipped {src}: another {', '.join(k for k in SAME if theirs.get(k) != mine.get(k))}")
            continue
        their_cfg = parse_config(theirs, str(src / "config.json"))
        variants = {v["name"]: (_variant(v), _params(their_cfg, tv))
                    for v, tv in zip(theirs["variant"], their_cfg.variants)}
        for v, d in zip(cfg.variants, mine["variant"]):
            if variants.get(v.name) != (_variant(d), _params(cfg, v)):
                continue  # not in that run, or another protection under the same name
            ok = wanted(cfg, v)
            for f in sorted((src / "records" / v.slug).glob("*.json")):
                if not ok(f.stem):
                    continue
                acc = json.loads(f.read_text())["test_acc"]
                if f.name in copied:
                    if copied[f.name]["test_acc"] != acc:
                        sys.exit(f"{f.name}: {copied[f.name]['source']} and {src} disagree ({acc} against "
                                 f"{copied[f.name]['test_acc']}); reuse one of them only")
                    continue
                dst = run / "records" / v.slug / f.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    shutil.copy2(f, dst)
                    if f.with_suffix(".safetensors").exists():
                        shutil.copy2(f.with_suffix(".safetensors"), dst.with_suffix(".safetensors"))
                copied[f.name] = {"record": f"{v.slug}/{f.name}", "source": str(src), "test_acc": acc}
    out = sorted(copied.values(), key=lambda r: r["record"])
    run.mkdir(parents=True, exist_ok=True)
    listed.write_text(json.dumps(out, indent=1) + "\n")
    return out


def check(run: Path) -> int:
    """Every reused variant's perturbation statistics in the new run against its sources' (0: all equal); and
    how many of the run's networks were reused and how many trained in it (with their training time)."""
    reused = {r["record"] for r in json.loads((run / "reused.json").read_text())}
    own = [json.loads(f.read_text()) for f in sorted((run / "records").glob("*/*.json"))
           if f"{f.parent.name}/{f.name}" not in reused]
    print(f"{len(reused)} networks reused, {len(own)} trained in this run ({sum(r['seconds'] for r in own):.0f} s "
          "of training, the records' seconds)")
    bad = 0
    for slug, srcs in _sources(run).items():
        new = run / "variants" / slug / "protect.json"
        if not new.exists():
            continue  # a clean variant, or not protected yet
        stats = json.loads(new.read_text())["perturbation"]
        for src in srcs:
            old = json.loads((Path(src) / "variants" / slug / "protect.json").read_text())["perturbation"]
            same = old.keys() == stats.keys() and all(abs(old[k] - stats[k]) <= 1e-9 * max(1, abs(old[k]))
                                                      for k in old)
            bad += not same
            print(f"{'same' if same else 'DIFFERENT'} perturbation: {slug} against {src}")
    return bad


def _sources(run: Path) -> dict[str, set]:
    out: dict[str, set] = {}
    for r in json.loads((run / "reused.json").read_text()):
        out.setdefault(r["record"].split("/")[0], set()).add(r["source"])
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("run", type=Path)
    p.add_argument("--from", dest="sources", type=Path, nargs="+", default=[])
    p.add_argument("--check", action="store_true", help="compare the re-protected variants with their sources")
    p.add_argument("--data", help="the config's data source as the run will have it (`uge benchmark --data`)")
    a = p.parse_args()
    if a.check and (a.data or a.sources):  # --check reads only the run folder: neither would be used
        p.error("--check takes no --data or --from")
    if a.check:
        sys.exit(1 if check(a.run) else 0)
    cfg = load_config(a.config)
    if a.data:  # the same experiment on data stored elsewhere (e.g. a copy on a GPU machine)
        cfg.data.source = a.data
    for r in reuse(cfg, a.run, a.sources):
        print(f"{r['record']:110s} {r['test_acc']:6.2f}  {r['source']}")
