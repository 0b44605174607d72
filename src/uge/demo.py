"""``uge demo``: the story in one table, on the built-in synthetic ``shapes`` (no files, no network).

Three rows, each trained and tested on ``shapes``: the clean baseline; the default protection (what
``uge protect`` runs; no protection measured meets issue 20's goal over the attack battery; sealed, so key
holders unseal the originals, checked bit for bit); and UGE, the paper's method (``--method uge``).
Columns: the key holder's (authorized) accuracy, the hackers' plain, and the hackers' worst case over the
battery's strongest cheap countermeasures. Writes ``report.md``, ``demo.png`` and every network's record into
the out folder.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .config import AuthorizedSpec, FeatureDistance, GeneratorOpt, ProtectConfig
from .countermeasures import canonical_countermeasures
from .data import ImageDataset, load_splits
from .errors import UGEError
from .evaluate import HackerSpec, evaluate_set, failed_to_train
from .protectors import build_protector
from .protectors.uge import protect as uge_protect
from .published import open_sealed, publish, read_published, source_record, verify
from .records import AuthorizedNet
from .sealing import keygen
from .standing import STANDING
from .training import Recipe
from .weights import build_network

ARCH = "smallcnn"  # ~1/15 of cnn's work: every network of the demo trains in seconds on 2 cores
DEFAULT = STANDING["method"]  # what `uge protect` runs, with its defaults
# the battery's worst cheap countermeasures: ISS (the pixel patches, EM, CUDA), keeping only each 8x8 block's mean,
# and projecting out the patterns of the bases the default's code is made of (its worst case, results/battery-cpu)
ISS, BLANKET, KNOWN = "grayscale+jpeg:quality=10", "blockdct:k=192,ratio=0.95", "knownbasis"


@dataclasses.dataclass(frozen=True)
class DemoSizes:
    """How big the demo runs: the defaults take about 2 minutes on 2 idle cores (results/demo, docs/usage.md)."""

    per_class_train: int | None = None  # None: the whole split (200 per class)
    per_class_test: int | None = None  # None: the whole split (100 per class)
    epochs: int = 6
    trajectory_epochs: int = 1
    generator_epochs: int = 1
    encoder_epochs: int = 2
    countermeasures: tuple[str, ...] = (ISS, BLANKET, KNOWN)  # the hackers' worst case is the best of these


TINY = DemoSizes(per_class_train=6, per_class_test=3, epochs=1, trajectory_epochs=1, generator_epochs=1,
                 encoder_epochs=1)  # the tests'


def _recipe(sizes: DemoSizes) -> Recipe:
    return Recipe(epochs=sizes.epochs, batch_size=64, lr=0.05)


def _uge_config(sizes: DemoSizes) -> ProtectConfig:
    """UGE at demo size: the authorized network is the demo's, the offline feature space a small encoder."""
    recipe = _recipe(sizes)
    return ProtectConfig(
        authorized=[AuthorizedSpec(ARCH, seed=0)], recipe=recipe, trajectory_epochs=sizes.trajectory_epochs,
        batch_size=128, rho=0.04, generator=GeneratorOpt(epochs=sizes.generator_epochs, width=16), diagnostics=False,
        fd=FeatureDistance(encoder_arch=ARCH, encoder_recipe=dataclasses.replace(recipe, epochs=sizes.encoder_epochs)))


class _Clock:
    """Wall and CPU seconds per step of the demo, and the machine's load, for the report: on a shared machine
    the wall time says little, the CPU time bounds the time on idle cores (between CPU / cores and CPU)."""

    def __init__(self):
        self.steps: dict[str, list[float]] = {}
        self.start, self.cpu_start, self.load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def step(self, name: str, fn, *args, **kw):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        wall, cpu = self.steps.setdefault(name, [0.0, 0.0])
        self.steps[name] = [wall + time.perf_counter() - t, cpu + time.process_time() - c]
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu_start


def _publish_default(train: ImageDataset, out: Path, progress: bool) -> tuple[ImageDataset, ImageDataset]:
    """The default protection, sealed: (published images, the originals unsealed with a fresh key, checked bit for
    bit)."""
    key_file = out / "demo.key"
    key_file.unlink(missing_ok=True)  # a fresh key every run; keygen never overwrites
    key = keygen(key_file)
    result = build_protector(DEFAULT).protect(train, progress=progress, seed=0)
    publish(result, train, out / DEFAULT, formats=("npz", "png"), overwrite=True, source=source_record("shapes"),
            seal_key=key)
    verify(out / DEFAULT, train).raise_if_failed()
    unsealed, _ = open_sealed(out / DEFAULT, key)
    if not (np.array_equal(unsealed.images, train.images) and np.array_equal(unsealed.labels, train.labels)):
        raise UGEError("the unsealed images differ from the originals")  # never: sealing is exact by construction
    return read_published(out / DEFAULT).data, unsealed


def _publish_uge(train: ImageDataset, out: Path, sizes: DemoSizes, device, progress: bool):
    result = uge_protect(train, _uge_config(sizes), device=device, progress=progress, work_dir=out / ".work")
    publish(result, train, out / "uge", formats=("npz", "png"), overwrite=True, source=source_record("shapes"))
    verify(out / "uge", train).raise_if_failed()
    return read_published(out / "uge")


def run_demo(out: str | Path = "uge-demo", device="auto", progress: bool = True,
             sizes: DemoSizes = DemoSizes()) -> tuple[str, float]:
    """Protect ``shapes`` two ways, train every network, write report.md and demo.png; return (table, seconds)."""
    out, clock = Path(out), _Clock()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "records", ignore_errors=True)  # a demo always trains afresh
    train, test = clock.step("load shapes", load_splits, "shapes", per_class_train=sizes.per_class_train,
                             per_class_test=sizes.per_class_test)
    protected, unsealed = clock.step(f"{DEFAULT}: protect, seal, verify, unseal", _publish_default, train, out,
                                     progress)
    pub = clock.step("UGE: protect, verify", _publish_uge, train, out, sizes, device, progress)
    recipe, hacker = _recipe(sizes), [HackerSpec(ARCH, "normal", seed=1)]

    def nets(data, label, authorized=(), cms=None, **kw):
        return clock.step(f"networks: {label}" + (f" ({cms})" if cms else ""), evaluate_set, data, test,
                          list(authorized), hacker, recipe, data_label=label, out_dir=out / "records",
                          device=device, progress=progress, countermeasures=cms, **kw)

    key_holder = AuthorizedNet(ARCH, build_network(ARCH, train.num_classes, train.channels, seed=0), "seed:0")
    # the key holder trains on the unsealed originals: the clean set's bytes, so it is the clean baseline too
    clean = nets(train, "clean", [key_holder], authorized_data=unsealed)
    default = [r for r in clean if r["role"] == "authorized"] + nets(protected, DEFAULT)  # its key holder unseals
    uge = nets(pub.data, "uge", [AuthorizedNet(ARCH, pub.authorized_network(0))])
    for cm in sizes.countermeasures:
        clean += nets(train, "clean", cms=cm)
        default += nets(protected, DEFAULT, cms=cm)
        uge += nets(pub.data, "uge", cms=cm)
    rows = {"clean (no protection)": clean,
            f"{DEFAULT} (the default: `uge protect`), sealed": default,
            "UGE, the paper's method (`--method uge`)": uge}
    table = format_demo_table(rows, train.num_classes, sizes.countermeasures)
    clock.step("figure", _figure, out / "demo.png", train, protected, pub.data, rows, sizes.countermeasures)
    _write_report(out, table, clock, rows, sizes)
    return table, clock.total


# ---------------------------------------------------------------- the table


def _cell(rec: dict | None, ref: float | None, k: int, name: str = "") -> str:
    """One accuracy with its change against ``ref``; a network that failed to train says so, with no change."""
    if rec is None:
        return "–"
    acc = f"{rec['test_acc']:.1f}" + (f" by `{name}`" if name else "")
    if failed_to_train(rec, k):
        return f"{acc} (failed to train: not protection)"
    return acc if ref is None else f"{acc} ({rec['test_acc'] - ref:+.1f})"


def _pick(recs: list[dict], role: str, cms: tuple[str, ...] | None = None) -> dict | None:
    """The record of ``role`` without a countermeasure, or, with ``cms``, the best hacker over them (a record
    holds a countermeasure's canonical text: every parameter, ``knownbasis:bases=10,dct=0``)."""
    wanted = tuple(canonical_countermeasures(c) for c in cms) if cms else (None,)
    found = [r for r in recs if r["role"] == role and (r.get("countermeasures") or None) in wanted]
    return max(found, key=lambda r: r["test_acc"], default=None)


def format_demo_table(rows: dict[str, list[dict]], k: int, cms: tuple[str, ...]) -> str:
    """The demo's one table: per protection, the key holder's and the hackers' accuracy (plain and the worst
    case over ``cms``), each with its change against the clean row; the clean seeds' spread below."""
    clean = rows[next(iter(rows))]
    ref_key, ref_hack = _pick(clean, "authorized"), _pick(clean, "hacker")
    # a change against a clean network that failed to train means nothing: then none is given
    key_acc, hack_acc = (r["test_acc"] if r and not failed_to_train(r, k) else None for r in (ref_key, ref_hack))
    worst = f"hackers, worst of `{'`, `'.join(cms)}`" if len(cms) > 1 else f"hackers with `{cms[0]}`"
    lines = [f"| protection | key holder | hackers, plain | {worst} |", "|---|---|---|---|"]
    for i, (label, recs) in enumerate(rows.items()):
        refs = (None, None) if i == 0 else (key_acc, hack_acc)
        auth = _pick(recs, "authorized")
        holder = _cell(auth, refs[0], k) + (" (trained on the unsealed originals, bit for bit)"
                                            if i and auth and auth["data"] == "unsealed" else "")
        best = _pick(recs, "hacker", cms)
        name = (best.get("countermeasures") or "") if best and len(cms) > 1 else ""
        lines.append(f"| {label} | {holder} | {_cell(_pick(recs, 'hacker'), refs[1], k)} | "
                     f"{_cell(best, hack_acc, k, name)} |")
    spread = abs(ref_key["test_acc"] - ref_hack["test_acc"])
    lines.append(f"\nTest accuracy (%) of {ARCH} networks; in brackets the change in points against the clean row "
                 f"(hackers against the clean hacker without a countermeasure). Noise of one number: the clean "
                 f"network from two seeds, {ref_key['test_acc']:.1f} and {ref_hack['test_acc']:.1f} "
                 f"({spread:.1f} points apart).")
    return "\n".join(lines)


def _write_report(out: Path, table: str, clock: _Clock, rows: dict, sizes: DemoSizes) -> None:
    recs = [r for recs in rows.values() for r in recs]
    n_train, n_test = recs[0]["n_train"], recs[0]["n_test"]
    steps = "\n".join(f"| {name} | {wall:.1f} | {cpu:.1f} |" for name, (wall, cpu) in clock.steps.items())
    (out / "report.md").write_text(
        f"# uge demo\n\nOn the synthetic `shapes` set ({n_train} training and {n_test} test images, 32×32 RGB, drawn "
        "in code; real-data numbers: `results/`). ρ = 0.04 for both protections; every network trains "
        f"{sizes.epochs} epochs.\n\n{table}\n\n![clean, protected, perturbation ×{_SCALE:g}, accuracy](demo.png)\n\n"
        f"| step | wall s | CPU s |\n|---|---|---|\n{steps}\n| **total** | {clock.total:.1f} | {clock.cpu:.1f} |\n\n"
        f"{os.cpu_count()} cores; load average {clock.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        "end. On idle cores the demo takes between its CPU time divided by the cores and its CPU time.\n")


# ---------------------------------------------------------------- the figure

_SCALE = 5.0  # the perturbation scaled up to be seen: 0.5 + 5δ
_SHOW = 6  # images per row of the figure


def _figure(path: Path, clean: ImageDataset, protected: ImageDataset, uge: ImageDataset, rows: dict,
            cms: tuple[str, ...]) -> None:
    """Clean and protected images, the perturbations scaled up, and the accuracy bars (skipped without
    matplotlib, which `pip install -e ".[report]"` adds)."""
    try:
        import matplotlib
    except ImportError:
        path.with_suffix(".txt").write_text("no figure: matplotlib is not installed (pip install -e \".[report]\")\n")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [int(np.flatnonzero(clean.labels == c)[0]) for c in range(min(_SHOW, clean.num_classes))]
    strips = {"clean": clean.images[idx] / 255.0}
    for name, data in ((DEFAULT, protected), ("UGE", uge)):
        delta = (data.images[idx].astype(float) - clean.images[idx]) / 255.0
        strips[name] = data.images[idx] / 255.0
        strips[f"{name} δ ×{_SCALE:g}"] = np.clip(0.5 + _SCALE * delta, 0, 1)
    fig = plt.figure(figsize=(11, 5))
    grid = fig.add_gridspec(len(strips), len(idx) + 1, width_ratios=[1] * len(idx) + [0.9 * len(idx)],
                            wspace=0.08, hspace=0.08)
    for r, (name, imgs) in enumerate(strips.items()):
        for c, img in enumerate(imgs):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    _bars(fig.add_subplot(grid[:, len(idx)]), rows, cms, clean.num_classes)
    fig.subplots_adjust(left=0.04, right=0.94, top=0.97, bottom=0.07)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, rows: dict, cms: tuple[str, ...], k: int) -> None:
    picks = {"key holder": lambda recs: _pick(recs, "authorized"), "hackers, plain": lambda recs: _pick(recs, "hacker"),
             "hackers, worst case": lambda recs: _pick(recs, "hacker", cms)}
    short = ("clean", f"{DEFAULT}, sealed", "UGE")
    width = 0.8 / len(picks)
    for j, (lab, pick) in enumerate(picks.items()):
        vals = [rec["test_acc"] if (rec := pick(recs)) else np.nan for recs in rows.values()]
        ax.bar(np.arange(len(vals)) + (j - 1) * width, vals, width, label=lab)
    ax.axhline(100 / k, color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(range(len(short)), short, fontsize=8)
    ax.yaxis.tick_right(), ax.yaxis.set_label_position("right")  # clear of the images on its left
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2, loc="upper center")  # above the bars
    ax.grid(axis="y", alpha=0.3)
