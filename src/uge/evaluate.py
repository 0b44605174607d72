"""The paper's threat model: the authorized network and hackers (normal or distilled) trained on a set.

Every trained network becomes one JSON record (numbers as numbers) written as soon as it finishes; a rerun
with the same output folder skips the records that already exist.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .data.dataset import ImageDataset
from .errors import ConfigError
from .models import create_model
from .models.registry import Classifier
from .publish import Published
from .training import DistillTask, Recipe, SupervisedTask, accuracy, train
from .utils import resolve_device, versions, write_json
from .weights import load_into, save_weights

log = logging.getLogger("uge")
TASKS = {"normal": lambda teacher, recipe: SupervisedTask(),
         "distill": lambda teacher, recipe: DistillTask(teacher, recipe.temperature)}


@dataclass(frozen=True)
class HackerSpec:
    """A hacker network: an architecture, a training mode ("normal" or "distill") and an init seed."""

    arch: str
    mode: str = "normal"
    seed: int = 1

    def __post_init__(self):
        if self.mode not in TASKS:
            raise ConfigError(f"unknown hacker mode {self.mode!r} in {self}; modes: {', '.join(TASKS)}")

    @classmethod
    def parse(cls, text: str) -> "HackerSpec":
        """Parse ``ARCH[:MODE[:SEED]]``, e.g. ``resnet18:distill:3``."""
        parts = text.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise ConfigError(f"bad hacker spec {text!r}; expected ARCH[:MODE[:SEED]], e.g. cnn:distill")
        try:
            seed = int(parts[2]) if len(parts) > 2 else 1
        except ValueError:
            raise ConfigError(f"bad seed in hacker spec {text!r}") from None
        return cls(parts[0], parts[1] if len(parts) > 1 else "normal", seed)

    @property
    def key(self) -> str:
        return f"{self.arch}_{self.mode}_s{self.seed}"


def _fit(model, train_set, test_set, recipe, task, device, seed, progress, desc) -> tuple[Classifier, dict]:
    start = time.perf_counter()
    train(model, train_set, recipe, task=task, device=device, seed=seed, progress=progress, desc=desc)
    return model, {"test_acc": accuracy(model, test_set), "train_acc": accuracy(model, train_set),
                   "seconds": round(time.perf_counter() - start, 2)}


def evaluate_set(train_set: ImageDataset, test_set: ImageDataset, authorized: list[tuple],
                 hackers: list[HackerSpec], recipe: Recipe, *, data_label: str, out_dir: str | Path | None = None,
                 device="auto", seed: int = 0, progress: bool = True, extra: dict | None = None,
                 recipes: dict[str, Recipe] | None = None) -> list[dict]:
    """Train the authorized networks (from their θ0) and the hackers on ``train_set``; test on ``test_set``.

    Args:
        authorized: (arch, network at θ0) or (arch, network, init label) tuples; the first one, once
            trained, is the distillation teacher.
        data_label: "clean" or "protected" (or any tag), stored in each record and its file name.
        out_dir: where records (and the trained authorized weights, for resuming) go; None keeps them in memory.
        recipes: per-architecture recipes for the hackers (the authorized networks always use ``recipe``).
    Returns:
        one record per trained network.
    """
    device = resolve_device(device)
    train_set.check_compatible(test_set)
    for h in hackers:  # fail on a bad name before any training
        create_model(h.arch, train_set.num_classes, train_set.channels)
    out = Path(out_dir) if out_dir is not None else None
    common = {"data": data_label, "n_train": len(train_set), "n_test": len(test_set), "recipe": recipe.to_dict(),
              "device": str(device), "versions": versions(), **(extra or {})}
    records, teacher = [], None
    for k, (name, model, *init) in enumerate(authorized):
        rec_file = out / f"{data_label}_authorized{k}_{name}.json" if out else None
        weights = rec_file.with_suffix(".safetensors") if rec_file else None
        if rec_file and rec_file.exists() and weights.exists():
            records.append(json.loads(rec_file.read_text()))
            load_into(model, weights).to(device).eval()
            log.info("skip %s (done)", rec_file.name)
        else:
            model, res = _fit(model, train_set, test_set, recipe, SupervisedTask(), device, seed, progress,
                              f"{data_label}: authorized {name}")
            rec = {**common, "role": "authorized", "index": k, "arch": name, "mode": "normal",
                   "init": init[0] if init else "theta0", **res}
            if out:
                save_weights(weights, model.state_dict())
                write_json(rec_file, rec)
            records.append(rec)
            log.info("%s  authorized %-12s test acc %.2f%%", data_label, name, res["test_acc"])
        if teacher is None:
            teacher = model
    for h in hackers:
        rec_file = out / f"{data_label}_hacker_{h.key}.json" if out else None
        if rec_file and rec_file.exists():
            records.append(json.loads(rec_file.read_text()))
            log.info("skip %s (done)", rec_file.name)
            continue
        model = create_model(h.arch, train_set.num_classes, train_set.channels, seed=h.seed)
        h_recipe = (recipes or {}).get(h.arch, recipe)
        _, res = _fit(model, train_set, test_set, h_recipe, TASKS[h.mode](teacher, h_recipe), device, seed, progress,
                      f"{data_label}: {h.arch} {h.mode}")
        rec = {**common, "recipe": h_recipe.to_dict(), "role": "hacker", "arch": h.arch, "mode": h.mode,
               "init": f"seed:{h.seed}", **res}
        if rec_file:
            write_json(rec_file, rec)
        records.append(rec)
        log.info("%s  hacker %-12s %-7s test acc %.2f%%", data_label, h.arch, h.mode, res["test_acc"])
    return records


def evaluate_published(pub: Published, test_set: ImageDataset, hackers: list[HackerSpec], *,
                       clean: ImageDataset | None = None, recipe: Recipe | None = None,
                       out_dir: str | Path | None = None, device="auto", seed: int = 0,
                       progress: bool = True) -> list[dict]:
    """The paper's evaluation of a published set, optionally beside the same grid on the clean originals.

    The authorized networks start from the published θ0 and train with the published recipe unless
    ``recipe`` overrides it; hackers train with the same recipe.
    """
    recipe = recipe or pub.recipe
    extra = {"published": str(pub.path), "checksums_sha256": pub.manifest.get("checksums_sha256")}
    records = []
    sets = ([("clean", clean)] if clean is not None else []) + [("protected", pub.data)]
    for label, data in sets:
        authorized = [(f"{a['arch']}", pub.authorized_network(k)) for k, a in enumerate(pub.manifest["authorized"])]
        records += evaluate_set(data, test_set, authorized, hackers, recipe, data_label=label, out_dir=out_dir,
                                device=device, seed=seed, progress=progress, extra=extra)
    return records


def format_table(records: list[dict]) -> str:
    """A markdown table: one row per network, test accuracy on clean and protected data, and the change."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["role"], r["arch"], r["mode"], r["init"])
        rows.setdefault(key, {})[r["data"]] = r["test_acc"]
    labels = [lab for lab in ("clean", "protected") if any(lab in v for v in rows.values())]
    head = "| network | mode | init | " + " | ".join(f"{lab} acc %" for lab in labels)
    head += " | change |" if len(labels) == 2 else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (role, arch, mode, init), accs in rows.items():
        cells = [f"{accs[lab]:.2f}" if lab in accs else "–" for lab in labels]
        if len(labels) == 2:
            cells.append(f"{accs['protected'] - accs['clean']:+.2f}" if len(accs) == 2 else "–")
        name = f"{arch} (authorized)" if role == "authorized" else arch
        lines.append(f"| {name} | {mode} | {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
