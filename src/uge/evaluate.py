"""The paper's threat model: the authorized network and hackers (normal or distilled) trained on a set.

Every trained network becomes one JSON record (numbers as numbers) written as soon as it finishes; a rerun
with the same output folder skips the records that already exist. Hackers (and, separately, the authorized
networks) may use countermeasures (:mod:`uge.countermeasures`); their canonical text is stored in each
record and, when there is one, appended to the record's file name (``..._s1__jpeg-quality10.json``), so
runs with different countermeasures share an output folder without overwriting each other.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from .config import HACKER_MODES, HACKER_SYNTAX, HackerSpec  # noqa: F401  (re-exported)
from .countermeasures import (
    Countermeasure,
    adapt_model,
    countermeasure_slug,
    format_countermeasures,
    make_batch_augment,
    parse_countermeasures,
    perturb_init,
    transform_data,
    wrap_task,
)
from .data.dataset import ImageDataset
from .distributed import on_main
from .errors import ConfigError
from .models.registry import Classifier
from .published import Published, given_theta0
from .records import AuthorizedNet, Record, read_record, write_record
from .training import DistillTask, Recipe, SupervisedTask, accuracy, train
from .utils import resolve_device, sha256_file, slug, versions
from .weights import build_network, load_into, save_weights
from .workers import Worker

log = logging.getLogger("uge")
TASKS = {"normal": lambda teacher, recipe: SupervisedTask(),  # one per HACKER_MODES entry
         "distill": lambda teacher, recipe: DistillTask(teacher, recipe.temperature)}
assert tuple(TASKS) == HACKER_MODES


class _Setting:
    """One side's countermeasures (hackers', or the authorized networks'), applied to the data once, when
    the first network of that side trains."""

    def __init__(self, cms: list[Countermeasure], train_set: ImageDataset, test_set: ImageDataset):
        self.cms = cms
        self.text = format_countermeasures(cms) or None
        self.suffix = f"__{countermeasure_slug(cms)}" if cms else ""  # "" keeps the historical file names
        self._train, self._test = train_set, test_set

    @cached_property
    def train_set(self) -> ImageDataset:
        # the adaptive countermeasures' clean images from elsewhere: the test split's pixels (never its labels)
        return transform_data(self.cms, self._train, reference=self._test)

    @cached_property
    def test_set(self) -> ImageDataset:
        self.train_set  # noqa: B018 — a transform fitted on the training set is applied to the test set as fitted
        return transform_data(self.cms, self._test, test=True)

    def fit(self, model, recipe, task, device, seed, progress, desc, curve: bool = False) -> tuple[Classifier, dict]:
        """Train ``model``; with ``curve`` the record also holds the test accuracy after every epoch."""
        start, accs = time.perf_counter(), []
        on_epoch = (lambda e, m: (accs.append(round(accuracy(m, self.test_set), 2)), m.train())) if curve else None
        train(model, self.train_set, recipe, task=wrap_task(self.cms, task), device=device, seed=seed,
              progress=progress, desc=desc, batch_augment=make_batch_augment(self.cms, self.train_set.num_classes),
              on_epoch=on_epoch)
        res = {"test_acc": accuracy(model, self.test_set), "train_acc": accuracy(model, self.train_set),
               "seconds": round(time.perf_counter() - start, 2), "countermeasures": self.text, "train_seed": seed}
        return model, {**res, "curve": accs} if curve else res


def _done(rec_file: Path, recipe: Recipe, countermeasures: str | None) -> dict:
    """The record of a finished network; a record made with other settings is refused, never reused."""
    rec = read_record(rec_file).to_dict()
    stored = rec.get("recipe", {})
    diff = [f"{k}={stored[k]!r} (now {v!r})" for k, v in recipe.to_dict().items() if k in stored and stored[k] != v]
    if rec.get("countermeasures") != countermeasures:
        diff.append(f"countermeasures={rec.get('countermeasures')!r} (now {countermeasures!r})")
    if diff:
        raise ConfigError(f"{rec_file} was made with other settings: {', '.join(diff)}; use another output "
                          "folder or delete the record")
    log.info("skip %s (done)", rec_file.name)
    return rec


def _claim(worker: Worker | None, rec_file: Path | None, **take):
    """A context to train a network in (a held claim, or nothing to hold), or None to skip it: another worker's.
    Without a worker or an output folder every network is this process's."""
    if worker is None or rec_file is None:
        return contextlib.nullcontext()
    return worker.take(rec_file, **take)


def evaluate_set(train_set: ImageDataset, test_set: ImageDataset, authorized: list[AuthorizedNet],
                 hackers: list[HackerSpec], recipe: Recipe, *, data_label: str, out_dir: str | Path | None = None,
                 device="auto", seed: int = 0, progress: bool = True, extra: dict | None = None,
                 recipes: dict[str, Recipe] | None = None,
                 countermeasures: str | list[Countermeasure] | None = None,
                 authorized_countermeasures: str | list[Countermeasure] | None = None,
                 recipe_label: str | None = None, authorized_seeds: Sequence[int] = (),
                 repeat: int = 0, authorized_data: ImageDataset | None = None,
                 authorized_label: str = "unsealed", worker: Worker | None = None,
                 plan: list | None = None) -> list[dict]:
    """Train the authorized networks (from their θ0) and the hackers on ``train_set``; test on ``test_set``.

    Args:
        authorized: :class:`~uge.records.AuthorizedNet` (arch, network at θ0, init label); the networks
            given are left at θ0 (a copy is trained), so one list serves several calls. The first one, once
            trained, is the distillation teacher.
        hackers: hacker networks; one with ``init_noise`` starts from the θ0 of the first authorized
            network of its architecture plus noise and trains with ``recipe``.
        recipe: the authorized networks' recipe (to train them with another recipe than the published one,
            pass it here), and the hackers' unless ``recipes`` names their architecture.
        data_label: "clean" or "protected" (or any tag), stored in each record and its file name.
        out_dir: where records (and the trained authorized weights, for resuming) go; None keeps them in memory.
        recipes: per-architecture recipes for the hackers (the authorized networks always use ``recipe``).
        countermeasures: the hackers' countermeasures (text such as ``"jpeg:quality=10+cutout:size=8"`` or
            a parsed list); input transforms are applied to ``train_set`` once (and, where they say so, to
            ``test_set``), batch augmentations and adversarial training inside the training loop.
        authorized_countermeasures: the same for the authorized networks (none by default): "the
            authorized user trains with countermeasure X". The distillation teacher is the authorized
            network as trained here.
        recipe_label: names a ``recipe`` other than the published one (a recipe sweep); stored in each
            record and appended to its file name (``..._cnn__recipe-batch-32.json``).
        authorized_seeds: further training seeds (batch order, augmentation) for each authorized network:
            ``seed`` may replay the protector's own trajectory run, these are a user's fresh runs of the
            published recipe. Their records have ``"fresh": true`` and file names ending ``__seed<S>``.
        repeat: a repeat of the whole grid (the caller varies ``seed`` and the hackers' seeds); stored in each
            record and, when not 0, appended to its file name (``__rep1``), so repeats share a folder.
        authorized_data: the set the authorized networks train on instead of ``train_set`` (the same images
            in the same order before protection: the unsealed originals of a sealed set, ``uge evaluate
            --key``); their records are labelled ``authorized_label`` instead of ``data_label``. The hackers
            still train on ``train_set``.
        worker: with ``out_dir`` shared by several processes (:class:`uge.workers.Worker`): each network is
            trained under a claim, and only if it is in this worker's shard; the others are skipped (left out
            of the returned records), for another worker or a later call.
        plan: a list: train nothing; the record file of every network not finished yet is appended to it (the
            finished ones are returned as usual). A resumed benchmark skips a finished variant's protection.
    Returns:
        one record per trained network (:class:`~uge.records.Record` fields as a dict, as written); each
        stores its ``countermeasures`` text (None for none).
    """
    authorized = [AuthorizedNet(*a) for a in authorized]
    device = resolve_device(device)
    train_set.check_compatible(test_set)
    if authorized_data is not None:
        authorized_data.check_compatible(test_set)
    auth_label = data_label if authorized_data is None else authorized_label
    hacker_cms = parse_countermeasures(countermeasures)  # fail on a bad spec or name before any training
    auth_cms = parse_countermeasures(authorized_countermeasures)
    for h in hackers:  # a bad architecture or init file fails here, before any training
        build_network(h.arch, train_set.num_classes, train_set.channels, weights=h.theta0)
    theta0 = {}  # arch -> (θ0 network, init label) for the hackers that start near an authorized θ0
    for h in hackers:
        if h.init_noise is not None and h.arch not in theta0:
            match = [(a.net, a.init) for a in authorized if a.arch == h.arch]
            if not match:
                raise ConfigError(f"hacker {h.spec} starts from an authorized θ0, but no authorized network is a "
                                  f"{h.arch}; authorized: {', '.join(a.arch for a in authorized) or 'none'}")
            theta0[h.arch] = match[0]
    out = Path(out_dir) if out_dir is not None else None
    tag = (f"__recipe-{slug(recipe_label)}" if recipe_label else "") + (f"__rep{repeat}" if repeat else "")
    common = {"data": data_label, "n_train": len(train_set), "n_test": len(test_set), "recipe": recipe.to_dict(),
              "device": str(device), "versions": versions(), **(extra or {}),
              **({"recipe_label": recipe_label} if recipe_label else {}), **({"repeat": repeat} if repeat else {})}
    auth = _Setting(auth_cms, train_set if authorized_data is None else authorized_data, test_set)
    auth_common = {**common, "data": auth_label, "n_train": len(auth._train)}
    theta0_nets = [a.net for a in authorized]  # what a model countermeasure (copy-input) may copy
    records, teacher, teacher_file = [], None, None
    for k, (name, theta0_net, init) in enumerate(authorized):
        for s in dict.fromkeys([seed, *authorized_seeds]):
            fresh = s != seed
            rec_file = (out / f"{auth_label}_authorized{k}_{name}{f'__seed{s}' if fresh else ''}{auth.suffix}{tag}.json"
                        if out else None)
            weights = rec_file.with_suffix(".safetensors") if rec_file else None
            is_teacher = k == 0 and not fresh  # the distillation teacher: the first authorized network, with ``seed``
            teacher_file = rec_file if is_teacher else teacher_file
            # train a copy: the caller's θ0 network is reused (one grid per setting)
            model = adapt_model(auth.cms, copy.deepcopy(theta0_net), theta0_nets)
            # a record without its weights is kept unless the network must teach a distilled hacker
            needed = is_teacher and any(h.mode == "distill" for h in hackers)

            def done(rec_file=rec_file, weights=weights, needed=needed) -> bool:
                return rec_file.exists() and (weights.exists() or not needed)

            if rec_file and done():
                rec = _done(rec_file, recipe, auth.text)
                if weights.exists():
                    load_into(model, weights).to(device).eval()
            elif plan is not None:
                plan.append(rec_file)
                continue
            else:
                claim = _claim(worker, rec_file, done=done)
                if claim is None:  # another worker's
                    continue
                with claim:
                    desc = f"{auth_label}: authorized {name}" + (f" (seed {s})" if fresh else "")
                    model, res = auth.fit(model, recipe, SupervisedTask(), device, s, progress, desc, curve=True)
                    record = Record(**auth_common, role="authorized", index=k, arch=name, mode="normal", init=init,
                                    fresh=fresh, **res)
                    rec = record.to_dict()
                    if rec_file:  # under torchrun by rank 0, and there for every rank afterwards
                        on_main(save_weights, weights, model.state_dict())
                        on_main(write_record, rec_file, record)
                log.info("%s  authorized %-12s seed %d  test acc %.2f%%", auth_label, name, s, rec["test_acc"])
            records.append(rec)
            if is_teacher:
                teacher = model
    hack = _Setting(hacker_cms, train_set, test_set)
    for h in hackers:
        # a hacker that uses the authorized network (its teacher or its θ0) names the data that network learnt
        taught = f"__by-{slug(auth_label)}" if auth_label != data_label and (h.mode == "distill" or
                                                                             h.init_noise is not None) else ""
        rec_file = out / f"{data_label}_hacker_{h.key}{hack.suffix}{taught}{tag}.json" if out else None
        h_recipe = recipe if h.init_noise is not None else (recipes or {}).get(h.arch, recipe)
        if rec_file and rec_file.exists():
            records.append(_done(rec_file, h_recipe, hack.text))
            continue
        if plan is not None:
            plan.append(rec_file)
            continue
        # a distilled hacker goes with its teacher: the worker that trains one trains the other
        claim = _claim(worker, rec_file, done=rec_file.exists if rec_file else None,
                       group=teacher_file if h.mode == "distill" else None,
                       ready=h.mode != "distill" or teacher is not None or teacher_file is None)
        if claim is None:  # another worker's, or its teacher is (and is waited for)
            continue
        with claim:
            model = build_network(h.arch, train_set.num_classes, train_set.channels, seed=h.seed, weights=h.theta0)
            init = {"init": f"seed:{h.seed}" if h.theta0 is None else f"file:{Path(h.theta0).name}"}
            if h.init_noise is not None:
                net, label = theta0[h.arch]
                model.load_state_dict(net.state_dict())
                perturb_init(model, h.init_noise, seed=h.seed)
                init = {"init": f"{label}+noise{h.init_noise!r}:seed{h.seed}", "init_noise": h.init_noise}
            model = adapt_model(hack.cms, model, theta0_nets)
            _, res = hack.fit(model, h_recipe, TASKS[h.mode](teacher, h_recipe), device, seed, progress,
                              f"{data_label}: {h.arch} {h.mode}")
            record = Record(**{**common, "recipe": h_recipe.to_dict()}, role="hacker", arch=h.arch, mode=h.mode,
                            **init, **res)
            rec = record.to_dict()
            if rec_file:
                on_main(write_record, rec_file, record)
        records.append(rec)
        log.info("%s  hacker %-12s %-7s test acc %.2f%%", data_label, h.arch, h.mode, res["test_acc"])
    return records


def evaluate_published(pub: Published, test_set: ImageDataset, hackers: list[HackerSpec], *,
                       clean: ImageDataset | None = None, recipe: Recipe | None = None,
                       out_dir: str | Path | None = None, device="auto", seed: int = 0,
                       progress: bool = True, countermeasures: str | list[Countermeasure] | None = None,
                       authorized_countermeasures: str | list[Countermeasure] | None = None,
                       theta0: list | None = None, authorized: list[AuthorizedNet] | None = None,
                       unsealed: ImageDataset | None = None) -> list[dict]:
    """The paper's evaluation of a published set, optionally beside the same grid on the clean originals.

    The authorized networks start from the published θ0 and train with the published recipe unless
    ``recipe`` overrides it (e.g. ``dataclasses.replace(pub.recipe, batch_size=64)``: the authorized user
    trains differently from the recipe the generator matched); hackers train with the same recipe.
    ``countermeasures`` apply to the hackers and ``authorized_countermeasures`` to the authorized networks
    (see :func:`evaluate_set`), on the clean and the protected set alike. ``theta0``: files of θ0s that
    were published apart from the set, in the order of the manifest's authorized networks.

    A sealed set's key holder (``uge evaluate --key``) passes ``authorized``, networks of their choice at
    their own initialization, and ``unsealed``, the originals restored with the key
    (:func:`uge.published.open_sealed`): the authorized networks then train on the originals (records
    ``"unsealed"``) while the hackers train on the published images as always.
    """
    recipe = recipe or pub.recipe
    sums = pub.path / "checksums.sha256"  # identifies every file of the set, the manifest included (format 2)
    extra = {"published": str(pub.path), "checksums_sha256": sha256_file(sums) if sums.is_file() else None}
    records = []
    sets = ([("clean", clean)] if clean is not None else []) + [("protected", pub.data)]
    for label, data in sets:
        nets = authorized if authorized is not None else [
            AuthorizedNet(a["arch"], pub.authorized_network(k, given_theta0(theta0, k)))
            for k, a in enumerate(pub.manifest["authorized"])]
        records += evaluate_set(data, test_set, nets, hackers, recipe, data_label=label, out_dir=out_dir,
                                device=device, seed=seed, progress=progress, extra=extra,
                                countermeasures=countermeasures, authorized_countermeasures=authorized_countermeasures,
                                authorized_data=unsealed if label == "protected" else None)
    return records


def failed_to_train(record: dict, num_classes: int) -> bool:
    """A network that did not even fit its own training data (training accuracy within 5 points of chance):
    its low test accuracy is a failure of training, not the protection's doing (a network that learns a
    protection's shortcut fits its training data)."""
    train_acc = record.get("train_acc")
    return train_acc is not None and train_acc < 100 / num_classes + 5


def format_table(records: list[dict], num_classes: int | None = None) -> str:
    """A markdown table: one row per network, test accuracy on clean and protected data, and the change
    (authorized networks trained on a sealed set's unsealed originals, ``uge evaluate --key``, in their own
    column). With ``num_classes``, a network that failed to train (:func:`failed_to_train`) is marked, and
    its change is not given."""
    rows: dict[tuple, dict] = {}
    failed: set[tuple] = set()
    for r in records:
        key = (r["role"], r["arch"], r["mode"], r["init"], r.get("countermeasures") or "")
        rows.setdefault(key, {})[r["data"]] = r["test_acc"]
        if num_classes and failed_to_train(r, num_classes):
            failed.add((key, r["data"]))
    labels = [lab for lab in ("clean", "unsealed", "protected") if any(lab in v for v in rows.values())]
    change = "clean" in labels and "protected" in labels
    with_cm = any(k[4] for k in rows)  # the countermeasure column only when one was used
    head = "| network | mode | init | " + ("countermeasures | " if with_cm else "")
    head += " | ".join(f"{lab} acc %" for lab in labels) + (" | change |" if change else " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, accs in rows.items():
        role, arch, mode, init, cm = key
        bad = {lab for lab in labels if (key, lab) in failed}
        cells = [("–" if lab not in accs else f"{accs[lab]:.2f}" + (" (failed to train)" if lab in bad else ""))
                 for lab in labels]
        if change:
            ok = "clean" in accs and "protected" in accs and not bad & {"clean", "protected"}
            cells.append(f"{accs['protected'] - accs['clean']:+.2f}" if ok else "–")
        name = f"{arch} (authorized)" if role == "authorized" else arch
        cm_cell = f"{cm or '–'} | " if with_cm else ""
        lines.append(f"| {name} | {mode} | {init} | {cm_cell}" + " | ".join(cells) + " |")
    return "\n".join(lines)
