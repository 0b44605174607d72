"""Run an experiment grid: protect every variant, publish it, evaluate it; resumable at every level.

Run folder layout::

    RUN/config.json                       the resolved config (a rerun must use the same one)
    RUN/variants/<variant>/published[-i]  the published set(s) of a variant (npz), verified after writing
    RUN/variants/<variant>/protect.json   protection wall times, loss history, verify result
    RUN/variants/<variant>/samples.npz    a few clean and protected images for the report's pictures
    RUN/records/<variant>/*.json          one record per trained network (uge.evaluate)

Nothing finished is recomputed: a published set with a manifest is reused, a generator resumes from its
last epoch checkpoint, and a network with a record is skipped. Several workers may share a run folder
(:mod:`uge.workers`): work in progress is claimed (``RUN/variants/<variant>/protect.claim``,
``RUN/records/<variant>/<record>.claim``), and every file is written atomically.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..data import ImageDataset, load_dataset, load_splits
from ..diagnostics import perturbation_shares
from ..errors import ConfigError
from ..evaluate import evaluate_set
from ..protectors import build_protector
from ..published import publish, read_published, verify
from ..records import AuthorizedNet, read_record
from ..result import rho_levels
from ..seeds import derive
from ..utils import atomic_file, atomic_write_text, resolve_device, versions, write_json
from ..weights import build_network
from ..workers import Worker
from .config import BenchmarkConfig, Variant

log = logging.getLogger("uge")
SAMPLES_PER_CLASS = 1


def load_data(cfg: BenchmarkConfig, root=None) -> tuple[ImageDataset, ImageDataset]:
    """The benchmark's training and test sets (class-balanced subsets where the config asks)."""
    d = cfg.data
    if d.test_source is None:
        train, test = load_splits(d.source, root=root)
        if d.split != "train":
            train = load_dataset(d.source, d.split, root=root)
    else:
        train = load_dataset(d.source, d.split, root=root)
        test = load_dataset(d.test_source, d.test_split, root=root)
    if d.per_class:
        train = train.per_class(d.per_class, d.subset_seed)
    if d.test_per_class:
        test = test.per_class(d.test_per_class, d.subset_seed)
    train.check_compatible(test)
    return train, test


def _open_run(run_dir: Path, cfg: BenchmarkConfig) -> None:
    """Create the run folder, or check that an existing one holds the same experiment.

    The one change allowed is growth: *new* variants or *new* countermeasure settings, appended (everything
    already there unchanged, in the same order): an experiment grows by a hypothesis at a time, and the
    finished records stay valid.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    f = run_dir / "config.json"
    mine = cfg.to_dict()
    mine.pop("device")  # the same experiment may resume on another device
    theirs = None
    if f.exists():
        theirs = json.loads(f.read_text())
        theirs.pop("device", None)
        if theirs != mine:
            grown = _without_growth(mine, theirs)
            changed = sorted(k for k in set(grown) | set(theirs) if grown.get(k) != theirs.get(k))
            if changed:
                raise ConfigError(f"run folder {run_dir} holds another experiment (differs in: "
                                  f"{', '.join(changed)}); use another --out, or the same config (new variants "
                                  "and countermeasure settings may be appended) to resume")
            log.info("%s: the run grows by %d variant(s) and %d countermeasure setting(s)", run_dir,
                     len(mine["variant"]) - len(theirs["variant"]),
                     len(_cms(mine)) - len(_cms(theirs)))
    if theirs != mine:
        atomic_write_text(f, json.dumps(mine, indent=2))


def _cms(d: dict) -> list[str]:
    return d.get("evaluate", {}).get("countermeasures", [""])


def _without_growth(mine: dict, theirs: dict) -> dict:
    """``mine`` with what it appends to ``theirs`` (variants, countermeasure settings) cut off."""
    out = copy.deepcopy(mine)
    n = len(theirs.get("variant", []))
    if len(out["variant"]) >= n and all(map(_variant_grown, out["variant"][:n], theirs.get("variant", []))):
        out["variant"] = copy.deepcopy(theirs["variant"])
    old = _cms(theirs)
    if _cms(out)[:len(old)] == old and len(_cms(out)) > len(old):
        out["evaluate"] = {**out["evaluate"], "countermeasures": old}
        if old == [""]:  # the key is written only when countermeasures are used
            out["evaluate"].pop("countermeasures")
            if theirs.get("evaluate", {}).get("countermeasures_authorized") is None:
                out["evaluate"].pop("countermeasures_authorized", None)
    return out


def _variant_grown(mine: dict, theirs: dict) -> bool:
    """The same variant, or one whose screening list of countermeasures was extended (or lifted)."""
    a, b = dict(mine), dict(theirs)
    grown, old = a.pop("countermeasures", None), b.pop("countermeasures", None)
    return a == b and (grown == old or old is not None and (grown is None or grown[:len(old)] == old))


def _publish_checked(protect_fn, part: ImageDataset, pub_dir: Path, source: dict, what: str) -> tuple:
    """Protect and publish ``part`` into ``pub_dir`` unless it is already there; verify it; read it back."""
    if not (pub_dir / "manifest.json").is_file():
        log.info("[%s] protecting %d images", what, len(part))
        publish(protect_fn(part), part, pub_dir, formats=("npz",), overwrite=True, source=source)
    elif not (pub_dir / "data.npz").is_file():  # a run folder kept without its images (they are not committed)
        log.info("[%s] %s has a manifest but no images: protecting %d images again (same seed)", what, pub_dir,
                 len(part))
        publish(protect_fn(part), part, pub_dir, formats=("npz",), overwrite=True, source=source)
    else:
        log.info("[%s] reusing %s", what, pub_dir)
    report = verify(pub_dir, part)  # evaluation reads the saved files; check them first
    report.raise_if_failed()
    pub = read_published(pub_dir)
    m = pub.manifest
    budget = next((c.detail for c in report.checks if c.name in ("budget", "similarity")), "")
    # what the report shows beside the manifest's path; the parameters are in the manifest, written once
    return pub, {"n": len(part), "seconds": m.get("seconds"), "history": m.get("history"),
                 "feature_space": m.get("feature_space"), "similarity": m.get("similarity"), "verify_ok": report.ok,
                 "budget": budget}


def _protect_variant(cfg: BenchmarkConfig, v: Variant, prot, train: ImageDataset, vdir: Path, device,
                     progress: bool) -> tuple[ImageDataset, list[AuthorizedNet] | None]:
    """Protect (or reuse) a variant's published set(s) with its protector ``prot``; return what was published,
    in the original order, and the authorized networks the protector chose and published (keyed), None where
    it chose none (UGE takes them as a parameter, the baselines have none).

    A federated variant is the protector called on each server's class subset, the union evaluated.
    """
    source = {"benchmark": cfg.name, "variant": v.name}
    groups = v.federated or [list(range(train.num_classes))]
    if max(c for g in groups for c in g) >= train.num_classes:
        raise ConfigError(f"variant {v.name!r}: federated class index out of range for {train.num_classes} classes")
    images = train.images.copy()
    covered = np.zeros(len(train), bool)
    stats = []
    for i, group in enumerate(groups):
        idx = np.flatnonzero(np.isin(train.labels, group))
        pub_dir = vdir / ("published" if v.federated is None else f"published-{i}")
        what = v.name + (f", server {i} (classes {group})" if v.federated else "")
        classes = {"classes": group} if v.federated else {}  # a federated run's parts name their classes
        pub, st = _publish_checked(lambda part, i=i: prot.protect(part, device=device, work_dir=vdir / f".work-{i}",
                                                                  progress=progress, seed=cfg.seed),
                                   train.subset(idx), pub_dir, {**source, **classes}, what)
        images[idx] = pub.data.images
        covered[idx] = True
        stats.append({**classes, "manifest": str(pub_dir.relative_to(vdir) / "manifest.json"), **st})
    if not covered.all():  # classes no server holds stay clean, as they would in the published union
        log.warning("[%s] %d images belong to no federated group and stay clean", v.name, int((~covered).sum()))
    write_json(vdir / "protect.json", {"variant": v.name, "protector": v.protector, "parts": stats})
    if "authorized" in prot.parameter_names() or not pub.manifest["authorized"]:
        return ImageDataset(images, train.labels.copy(), list(train.classes)), None
    return pub.data, [AuthorizedNet(a["arch"], pub.authorized_network(k), f"theta0:published{k}")
                      for k, a in enumerate(pub.manifest["authorized"])]


def _save_samples(vdir: Path, clean: ImageDataset, used: ImageDataset, rho: float | None, protected: bool) -> None:
    """A few clean and published images (one per class) for the report's pictures."""
    f = vdir / "samples.npz"
    if f.exists():
        return
    idx = np.concatenate([np.flatnonzero(clean.labels == c)[:SAMPLES_PER_CLASS] for c in range(clean.num_classes)])
    with atomic_file(f) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, clean=clean.images[idx], protected=used.images[idx], labels=clean.labels[idx],
                 classes=np.array(clean.classes), rho=np.nan if rho is None else rho, is_protected=protected)


def _record_perturbation(vdir: Path, clean: ImageDataset, used: ImageDataset, rho: float | None) -> None:
    """Add the published perturbation's universal / class-wise / sample-wise energy shares to protect.json."""
    f = vdir / "protect.json"
    d = json.loads(f.read_text())
    if "perturbation" not in d:
        delta = used.images.astype(np.int16) - clean.images.astype(np.int16)
        levels = None if rho is None else rho_levels(rho)
        d["perturbation"] = perturbation_shares(delta, clean.labels, levels)
        write_json(f, d)


def run_benchmark(cfg: BenchmarkConfig, run_dir: str | Path, *, device=None, root=None, progress: bool = True,
                  worker: Worker | None = None) -> list[dict]:
    """Run (or resume) every variant of ``cfg`` into ``run_dir``; returns all records.

    Several processes may share ``run_dir``, plain ones or a job array's shards (``worker``: this process's
    share and claim timeout; default the whole grid). Each piece of work (a variant's protection, a network) is
    claimed by one of them; a worker skips what another holds, then waits for the pieces of its part that
    another holds and goes over the grid again, until its part is finished. ``finished.json`` is written once
    the whole grid is (``worker.complete``); the records returned are the grid's finished ones as of the last
    pass (all of them then).
    """
    run_dir = Path(run_dir)
    worker = worker or Worker()
    device = resolve_device(device or cfg.device)
    _open_run(run_dir, cfg)
    train, test = load_data(cfg, root)
    log.info("%s: %d training and %d test images, %d variants, %d hackers, device %s", cfg.name, len(train),
             len(test), len(cfg.variants), len(cfg.hackers), device)
    while True:
        worker.start_pass()
        records = _grid_pass(cfg, run_dir, train, test, device, progress, worker)
        if not worker.waiting:
            break
        worker.wait()
    if worker.complete:
        write_json(run_dir / "finished.json", {"versions": versions(), "device": str(device),
                                               "records": len(records), "machine": _machine(device)})
    return records


def _grid_pass(cfg: BenchmarkConfig, run_dir: Path, train: ImageDataset, test: ImageDataset, device,
               progress: bool, worker: Worker) -> list[dict]:
    """One pass over the grid: every variant's protection and networks that are finished, or this worker's
    and free (trained now); returns their records."""
    records = []
    for v in cfg.variants:
        vdir = run_dir / "variants" / v.slug
        vdir.mkdir(parents=True, exist_ok=True)
        prot = None if v.protector == "clean" else build_protector(v.protector, **cfg.params(v))
        rho = None if prot is None else prot.rho
        start = time.perf_counter()
        grid = _VariantGrid(cfg, v, run_dir, test, device, progress, worker, prot)
        if _protected_before(vdir, prot):  # every network finished? then the published set is not needed
            plan = []
            done = grid.evaluate(train, None, plan)
            if not plan:
                records += done
                continue
        claim = worker.take(vdir / "protect.json", shared=True)  # one worker at a time protects (or rereads) it
        if claim is None:  # another worker is protecting this variant: come back to it on the next pass
            continue
        with claim:
            used, published = (train, None) if v.protector == "clean" else _protect_variant(
                cfg, v, prot, train, vdir, device, progress)
            _save_samples(vdir, train, used, rho, v.protector != "clean")
            if v.protector != "clean":
                _record_perturbation(vdir, train, used, rho)
        records += grid.evaluate(used, published)
        log.info("[%s] done in %.1f s", v.name, time.perf_counter() - start)
    return records


def _protected_before(vdir: Path, prot) -> bool:
    """Whether an earlier run protected this variant and left what the report reads (its samples and statistics),
    and the authorized networks come from the config (not from the published set, as keyed protection's do)."""
    if prot is None:
        return (vdir / "samples.npz").exists()
    manifest = vdir / "published" / "manifest.json"
    return ((vdir / "samples.npz").exists() and (vdir / "protect.json").exists() and manifest.exists()
            and not json.loads(manifest.read_text()).get("authorized"))


@dataclasses.dataclass
class _VariantGrid:
    """One variant's networks: every countermeasure setting, repeat and recipe of the config."""
    cfg: BenchmarkConfig
    v: Variant
    run_dir: Path
    test: ImageDataset
    device: object
    progress: bool
    worker: Worker
    prot: object  # the variant's protector (None: the clean set)

    def evaluate(self, used: ImageDataset, published, plan: list | None = None) -> list[dict]:
        """Train (or read) the variant's networks on ``used``; with ``plan`` train none, list those left in it."""
        cfg, v, prot = self.cfg, self.v, self.prot
        # the authorized networks a protector published (keyed), else the config's, for every protector
        authorized = published or [AuthorizedNet(a.arch, build_network(a.arch, used.num_classes, used.channels,
                                                                       a.seed, a.theta0),
                                                 f"theta0:{a.theta0 or f'seed{a.seed}'}") for a in cfg.authorized(v)]
        hackers = cfg.hackers if v.hackers is None else v.hackers
        extra = {"variant": v.name, "protector": v.protector, "rho": None if prot is None else prot.rho,
                 "losses": None if prot is None else prot.params().get("losses"), "federated": v.federated,
                 "benchmark": cfg.name}
        same = {"data_label": v.slug, "out_dir": self.run_dir / "records" / v.slug, "device": self.device,
                "seed": cfg.seed, "progress": self.progress, "extra": extra, "worker": self.worker, "plan": plan}
        records = []
        # one evaluation grid per countermeasure setting ("" = none); a screened variant runs only its own
        for cm in cfg.countermeasures if v.countermeasures is None else v.countermeasures:
            for r in range(v.repeats):  # repeat r: other training seeds and hacker inits (the noise of one number)
                records += evaluate_set(used, self.test, authorized, [dataclasses.replace(h, seed=h.seed + r)
                                                                      for h in hackers],  # hacker r: its own init
                                        cfg.recipe, recipes=cfg.recipes, countermeasures=cm,
                                        authorized_countermeasures=cm if cfg.countermeasures_authorized else None,
                                        authorized_seeds=[] if r else cfg.authorized_seeds, repeat=r,
                                        **{**same, "seed": derive(cfg.seed, "repeat", r)})
        for label, recipe in cfg.recipe_sweep():  # the authorized networks again, with other recipes
            records += evaluate_set(used, self.test, authorized, [], recipe, recipe_label=label, **same)
        return records


def _machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch threads {torch.get_num_threads()}"


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record of a run folder, in variant order of its config."""
    run_dir = Path(run_dir)
    order = {}
    cfg_file = run_dir / "config.json"
    if cfg_file.exists():
        order = {v["name"]: i for i, v in enumerate(json.loads(cfg_file.read_text()).get("variant", []))}
    records = [read_record(f).to_dict() for f in sorted((run_dir / "records").glob("*/*.json"))]
    return sorted(records, key=lambda r: order.get(r.get("variant"), len(order)))
