"""Turn a run folder's records into the paper's tables (markdown, CSV, LaTeX) and figures (PNG).

Reads only what the runner wrote (records, protect.json, samples.npz, config.json); never trains.
Tables follow the paper's Table 1: one row per (variant, training mode), one column per network, each
number beside its change from the same network trained on the clean data.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..models.registry import BLIND
from .config import Variant
from .runner import read_records

log = logging.getLogger("uge")


def _column(r: dict, n_auth: int, hacker_archs: dict) -> str:
    """The table column of a record: "authorized" (or "authorized<k>") or the hacker's architecture."""
    if r["role"] == "authorized":
        col = "authorized" if n_auth == 1 else f"authorized{r.get('index', 0)}"
        return f"{col} seed {r['train_seed']}" if r.get("fresh") else col
    return r["arch"] if len(hacker_archs[(r["arch"], r["mode"])]) == 1 else f"{r['arch']}({r['init']})"


def _match_key(r: dict) -> tuple:
    """Which clean record a record is compared with: the same network (for an authorized one: the same index
    and architecture, whatever its θ0 is called — a keyed set's published θ0 is the seed's), mode, countermeasure
    and fresh seed."""
    init = r.get("index", 0) if r["role"] == "authorized" else r["init"]
    return (r["role"], r["arch"], r["mode"], init, r.get("countermeasures") or "",
            r.get("train_seed") if r.get("fresh") else None)


def _n_authorized(records: list[dict]) -> int:
    return 1 + max((r.get("index", 0) for r in records if r["role"] == "authorized"), default=0)


def build_rows(records: list[dict], cm_order: list[str] | None = None) -> tuple[list[str], list[dict]]:
    """Columns and rows of the main table; each row: variant, mode, and per column acc / clean / change.

    ``cm_order``: the countermeasure texts in the config's order ("" for none); default: as first seen."""
    if not records:
        raise ConfigError("no records found; run `uge benchmark` first")
    clean = {}
    for r in records:
        if r.get("protector") == "clean":
            clean.setdefault(_match_key(r), r["test_acc"])
    n_auth = _n_authorized(records)
    hacker_archs = defaultdict(set)
    for r in records:
        if r["role"] == "hacker":
            hacker_archs[(r["arch"], r["mode"])].add(r["init"])
    columns: list[str] = []
    rows: dict[tuple, dict] = {}
    for r in records:
        col = _column(r, n_auth, hacker_archs)
        if col not in columns:
            columns.append(col)
        cm = r.get("countermeasures") or ""
        row = rows.setdefault((r.get("variant", r["data"]), cm, r["mode"]),
                              {"variant": r.get("variant", r["data"]), "countermeasure": cm, "mode": r["mode"],
                               "rho": r.get("rho"), "protector": r.get("protector"), "cells": {}})
        base = clean.get(_match_key(r))
        row["cells"][col] = {"acc": r["test_acc"], "clean": base, "arch": r["arch"],
                             "change": None if base is None else r["test_acc"] - base}
    auth = sorted(c for c in columns if c.startswith("authorized"))
    columns = auth + [c for c in columns if c not in auth]
    seen = list(dict.fromkeys(row["countermeasure"] for row in rows.values()))
    cms = [c for c in cm_order or [] if c in seen] + [c for c in seen if c not in (cm_order or [])]
    ordered = sorted(rows.values(), key=lambda row: (cms.index(row["countermeasure"]), row["mode"] != "normal"))
    return columns, ordered  # stable sort: the variants keep their config order


def _header(columns, rows) -> list[str]:
    names = []
    for c in columns:
        archs = dict.fromkeys(row["cells"][c]["arch"] for row in rows if c in row["cells"])  # keyed: blind-<arch> too
        names.append(f"{c} ({' / '.join(archs)})" if c.startswith("authorized") else c)
    return names


def _fmt(cell: dict | None, clean_row: bool) -> str:
    if cell is None:
        return "–"
    if clean_row or cell["change"] is None:
        return f"{cell['acc']:.2f}"
    return f"{cell['acc']:.2f} ({cell['change']:+.2f})"


def _lead(row, has_cm: bool) -> list[str]:
    """The row's leading cells: data (variant), the countermeasure where any is used, the training mode."""
    return [row["variant"]] + ([row["countermeasure"] or "none"] if has_cm else []) + [row["mode"]]


def markdown_table(columns, rows) -> str:
    has_cm = any(row["countermeasure"] for row in rows)
    lead = ["data"] + (["countermeasure"] if has_cm else []) + ["mode"]
    lines = ["| " + " | ".join(lead + _header(columns, rows)) + " |", "|" + "---|" * (len(lead) + len(columns))]
    for row in rows:
        cells = [_fmt(row["cells"].get(c), row["protector"] == "clean") for c in columns]
        lines.append("| " + " | ".join(_lead(row, has_cm) + cells) + " |")
    return "\n".join(lines)


def robustness_matrix(columns, rows) -> str:
    """Per network and mode: variants (rows) x countermeasures (columns), each beside its clean counterpart."""
    cms = list(dict.fromkeys(row["countermeasure"] for row in rows))
    if len(cms) < 2:
        return ""
    parts = []
    for mode in dict.fromkeys(row["mode"] for row in rows):
        for c in columns:
            variants = list(dict.fromkeys(row["variant"] for row in rows if row["mode"] == mode and c in row["cells"]))
            if not variants:
                continue
            cell = {(row["variant"], row["countermeasure"]): row for row in rows if row["mode"] == mode}
            lines = [f"**{c}** ({mode}):", "", "| data | " + " | ".join(cm or "none" for cm in cms) + " |",
                     "|---|" + "---|" * len(cms)]
            for v in variants:
                vals = [_fmt(cell[(v, cm)]["cells"].get(c), cell[(v, cm)]["protector"] == "clean")
                        if (v, cm) in cell else "–" for cm in cms]
                lines.append(f"| {v} | " + " | ".join(vals) + " |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _chance(run_dir: Path) -> float:
    """Chance accuracy (%): 100 / the number of classes (read off the samples the runner saved; 10 without)."""
    for f in sorted((run_dir / "variants").glob("*/samples.npz")):
        with np.load(f) as z:
            return 100 / len(z["classes"])
    return 10.0


def _kept(acc: float, clean: float | None, chance: float) -> float | None:
    """The fraction of clean learning ``acc`` keeps, (acc − chance) / (clean − chance); None without a clean
    baseline or when the clean network learnt nothing (within a point of chance)."""
    return None if clean is None or clean < chance + 1 else (acc - chance) / (clean - chance)


def _hacker_columns(columns, authorized: bool) -> list[str]:
    """``columns``, less the authorized ones when they trained without countermeasures (they have no worst case)."""
    return list(columns) if authorized else [c for c in columns if not c.startswith("authorized")]


def worst_case_table(columns, rows, chance: float, goal: float = 0.4, cms: list[str] | None = None,
                     authorized: bool = True) -> str:
    """Per protected variant, mode and network: the highest accuracy any countermeasure reaches (the worst case
    for the protection) and which one, beside the plain (no countermeasure) accuracy, the same network on the clean
    set, and the fraction of what it learns from clean data that the worst case keeps, (worst − chance) / (clean −
    chance); adversarial training (``adv``) is also left out in a column of its own. A network that was not
    trained under every countermeasure of the run (``cms``, the config's list; default: those in ``rows``) says
    how many it was (its worst case is over those only). ``authorized=False`` (the run's authorized networks
    trained without countermeasures: key holders) leaves their columns out: they have no worst case."""
    cms = list(dict.fromkeys(cms or [row["countermeasure"] for row in rows]))
    if len(cms) < 2:
        return ""
    clean = {(row["mode"], c): row["cells"][c]["acc"] for row in rows if row["protector"] == "clean"
             and not row["countermeasure"] for c in row["cells"]}
    lines = ["| data | mode | network | clean | plain | worst | by | fraction kept | worst without adv | by |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in dict.fromkeys(row["variant"] for row in rows if row["protector"] != "clean"):
        for mode in dict.fromkeys(row["mode"] for row in rows):
            mine = [row for row in rows if row["variant"] == v and row["mode"] == mode]
            for c in _hacker_columns(columns, authorized):
                got = [(row["cells"][c]["acc"], row["countermeasure"] or "none") for row in mine if c in row["cells"]]
                if not got:
                    continue
                plain = next((a for a, cm in got if cm == "none"), None)
                worst = max(got)
                soft = max(((a, cm) for a, cm in got if not cm.startswith("adv")), default=None)
                base = clean.get((mode, c))
                frac = _kept(worst[0], base, chance)
                partial = f" ({len(got)} of {len(cms)} run)" if len(got) < len(cms) else ""  # not a worst case yet
                cells = [v, mode, c, "–" if base is None else f"{base:.2f}", "–" if plain is None else f"{plain:.2f}",
                         f"{worst[0]:.2f}{partial}", worst[1],
                         # ✓ only over the whole battery: a screen's worst case is not one yet
                         "–" if frac is None else f"{frac:.2f}" + (" ✓" if frac <= goal and not partial else ""),
                         "–" if soft is None else f"{soft[0]:.2f}", "–" if soft is None else soft[1]]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def floor_table(columns, rows, chance: float, goal: float = 0.4, authorized: bool = True) -> str:
    """Each countermeasure on the clean set: the accuracy it leaves each network and the fraction of clean
    learning that is, (acc − chance) / (clean − chance). A protection that a countermeasure removes entirely keeps
    at least that fraction under it, so a protection meets ``goal`` only where it survives every countermeasure
    above it (marked ▲)."""
    cols = _hacker_columns(columns, authorized)
    mine = [row for row in rows if row["protector"] == "clean"]
    plain = {}  # per mode and network, the first clean variant's plain record (several clean variants may have one)
    for row in mine:
        if not row["countermeasure"]:
            for c, cell in row["cells"].items():
                plain.setdefault(row["mode"], {}).setdefault(c, cell)
    attacked = [row for row in mine if row["countermeasure"] and row["mode"] in plain]
    if not attacked:
        return ""
    lines = ["| countermeasure | mode | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in attacked:
        cells = []
        for c in cols:
            acc = row["cells"].get(c, {}).get("acc")
            frac = None if acc is None else _kept(acc, plain[row["mode"]].get(c, {}).get("acc"), chance)
            cells.append("–" if frac is None else f"{acc:.2f} ({frac:.2f}{' ▲' if frac > goal else ''})")
        lines.append(f"| {row['countermeasure']} | {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PUBLISHED = "published"


def recipe_sweep(records: list[dict], overrides: dict) -> tuple[list[str], list[str], dict]:
    """The authorized networks under other recipes than the published one (issue 4's recipe sweep).

    Returns recipe labels (the published one first), columns (variant, or "variant #k" for several
    authorized networks) and ``{(label, column): (acc, change from the clean variant under that recipe)}``;
    empty when the run has no sweep."""
    if not overrides:
        return [], [], {}
    auth = [r for r in records if r["role"] == "authorized" and not r.get("countermeasures")]
    n_auth = _n_authorized(auth)

    def col(r: dict) -> str:
        return r.get("variant", r["data"]) + (f" #{r.get('index', 0)}" if n_auth > 1 else "")

    def label(r: dict) -> str:
        return r.get("recipe_label") or PUBLISHED

    clean = {(label(r), r.get("index", 0)): r["test_acc"] for r in auth if r.get("protector") == "clean"}
    cells, columns = {}, []
    for r in auth:
        if col(r) not in columns:
            columns.append(col(r))
        base = clean.get((label(r), r.get("index", 0)))
        change = None if base is None or r.get("protector") == "clean" else r["test_acc"] - base
        cells[(label(r), col(r))] = (r["test_acc"], change)
    labels = [PUBLISHED] + [k for k in overrides if any((k, c) in cells for c in columns)]
    return labels, columns, cells


def recipe_table(labels, columns, cells, overrides: dict) -> str:
    """Markdown: one row per recipe, the authorized network's accuracy per variant (change from clean)."""
    lines = ["| recipe | changed from the published | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for lab in labels:
        what = ", ".join(f"{k} = {v}" for k, v in overrides.get(lab, {}).items()) or "–"
        vals = []
        for c in columns:
            acc, change = cells.get((lab, c), (None, None))
            vals.append("–" if acc is None else f"{acc:.2f}" + ("" if change is None else f" ({change:+.2f})"))
        lines.append(f"| {lab} | {what} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def latex_table(columns, rows) -> str:
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    has_cm = any(row["countermeasure"] for row in rows)
    lead = ["data"] + (["countermeasure"] if has_cm else []) + ["mode"]
    lines = [r"\begin{tabular}{" + "l" * len(lead) + "r" * len(columns) + "}", r"\toprule",
             " & ".join(esc(h) for h in lead + _header(columns, rows)) + r" \\", r"\midrule"]
    for row in rows:
        cells = [esc(_fmt(row["cells"].get(c), row["protector"] == "clean")) for c in columns]
        lines.append(" & ".join(esc(x) for x in _lead(row, has_cm) + cells) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def write_csv(path: Path, columns, rows, paper: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "countermeasure", "mode", "network", "arch", "test_acc", "clean_acc", "change",
                    "paper_acc"])
        for row in rows:
            for c in columns:
                cell = row["cells"].get(c)
                if cell is not None:
                    p = None if row["countermeasure"] else paper.get((row["variant"], row["mode"]), {}).get(c)
                    w.writerow([row["variant"], row["countermeasure"], row["mode"], c, cell["arch"], f"{cell['acc']:.2f}",
                                "" if cell["clean"] is None else f"{cell['clean']:.2f}",
                                "" if cell["change"] is None else f"{cell['change']:.2f}", "" if p is None else p])


def paper_numbers(cfg: dict) -> tuple[str, dict]:
    """The paper's rows from a config's ``[paper]`` table: (source, {(variant, mode): {column: acc}})."""
    paper = cfg.get("paper") or {}
    rows = {}
    for row in paper.get("row", []):
        row = dict(row)
        rows[(row.pop("variant"), row.pop("mode", "normal"))] = row
    return paper.get("source", "the paper"), rows


def paper_table(columns, rows, source: str, paper: dict) -> str:
    """Ours beside the paper's, as "ours / paper" with both changes from the clean row."""
    if not paper:
        return ""
    clean_paper = next((v for (name, mode), v in paper.items() if mode == "normal" and any(
        row["variant"] == name and row["protector"] == "clean" for row in rows)), {})
    lines = [f"Ours vs {source} (accuracy %, change from clean in brackets; ours / paper):", "",
             "| data | mode | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in rows:
        p = None if row["countermeasure"] else paper.get((row["variant"], row["mode"]))
        if p is None:
            continue
        cells = []
        for c in columns:
            ours = row["cells"].get(c)
            theirs = p.get(c)
            o = _fmt(ours, row["protector"] == "clean")
            if theirs is None:
                t = "–"
            elif row["protector"] == "clean" or c not in clean_paper:
                t = f"{theirs:.2f}"
            else:
                t = f"{theirs:.2f} ({theirs - clean_paper[c]:+.2f})"
            cells.append(f"{o} / {t}")
        lines.append(f"| {row['variant']} | {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protection_table(run_dir: Path) -> str:
    """Per protected variant: stage wall times, the last generator epoch's losses, the verified budget."""
    head = ("| variant | part | images | trajectory s | feature space s | generator s | generate s | "
            "last epoch losses | feature space | budget |")
    lines = [head, "|---" * 10 + "|"]
    for f in sorted((run_dir / "variants").glob("*/protect.json")):
        d = json.loads(f.read_text())
        for i, p in enumerate(d["parts"]):
            s = p.get("seconds") or {}
            last = (p.get("history") or [{}])[-1]
            losses = ", ".join(f"{k} {v:.3f}" for k, v in last.items()
                               if k not in ("epoch", "round") and not k.startswith("diag_"))
            lines.append(f"| {d['variant']} | {i} | {p['n']} | " + " | ".join(
                f"{s[k]:.1f}" if k in s else "–" for k in ("trajectory", "feature_space", "generator", "generate"))
                + f" | {losses} | {p.get('feature_space')} | {p.get('budget')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


# ---------------------------------------------------------------- selectivity (issue 10)

def _plain(records: list[dict]) -> list[dict]:
    """The records of the main grid: no countermeasure, no recipe sweep."""
    return [r for r in records if not r.get("countermeasures") and not r.get("recipe_label")]


def _net_key(r: dict) -> tuple:
    """Which network a record is, across variants: role, index, arch, mode, init and fresh training seed."""
    return (r["role"], r.get("index", 0), r["arch"], r["mode"], r["init"] if r["role"] == "hacker" else "",
            r.get("train_seed") if r.get("fresh") else None)


def noise_of_one_number(records: list[dict]) -> tuple[float | None, int]:
    """(σ, pairs): the standard deviation of one accuracy, from the clean variant's repeats.

    Each network of repeat 0 is paired with its counterpart of repeat r (the same position in the grid,
    other training seed and hacker init); σ = sqrt(mean(d²) / 2) over all pairs' differences d."""
    clean = [r for r in _plain(records) if r.get("protector") == "clean" and not r.get("fresh")]
    by_rep = defaultdict(list)
    for r in clean:
        by_rep[r.get("repeat", 0)].append(r)
    if len(by_rep) < 2:
        return None, 0
    base = {(r["role"], r.get("index", 0), r["arch"], r["mode"]): r["test_acc"] for r in by_rep[0]}
    diffs = [r["test_acc"] - base[k] for rep, rs in by_rep.items() if rep for r in rs
             if (k := (r["role"], r.get("index", 0), r["arch"], r["mode"])) in base]
    if not diffs:
        return None, 0
    return math.sqrt(float(np.mean(np.square(diffs))) / 2), len(diffs)


def selectivity_rows(records: list[dict]) -> tuple[list[str], list[dict]]:
    """Per protected variant: the authorized network's change (replay and fresh seeds), every hacker's change,
    the mean hacker change and the selectivity (authorized fresh − mean hacker; replay where no fresh seed).

    Returns the hacker columns and one dict per variant (changes in points, None where no clean baseline)."""
    plain = [r for r in _plain(records) if not r.get("repeat")]
    clean = {_net_key(r): r["test_acc"] for r in plain if r.get("protector") == "clean"}
    hackers, out = [], {}
    for r in plain:
        if r.get("protector") == "clean":
            continue
        row = out.setdefault(r.get("variant", r["data"]), {"variant": r.get("variant", r["data"]), "replay": [],
                                                            "fresh": [], "hackers": {}, "standard": []})
        base = clean.get(_net_key(r))
        change = None if base is None else r["test_acc"] - base
        if r["role"] == "authorized":
            row["fresh" if r.get("fresh") else "replay"].append(change)
            if r["arch"].startswith(BLIND) and r.get("fresh"):  # keyed: also against the standard architecture
                std = clean.get(_net_key({**r, "arch": r["arch"].removeprefix(BLIND)}))
                row["standard"].append(None if std is None else r["test_acc"] - std)
        else:
            col = f"{r['arch']} {r['mode']} ({r['init']})"
            if col not in hackers:
                hackers.append(col)
            row["hackers"][col] = change
    rows = []
    for row in out.values():
        mean = lambda xs: None if not xs or None in xs else float(np.mean(xs))  # noqa: E731
        h = list(row["hackers"].values())
        auth = mean(row["fresh"]) if row["fresh"] else mean(row["replay"])
        row.update(replay=mean(row["replay"]), fresh=mean(row["fresh"]), standard=mean(row["standard"]), mean_hacker=mean(h),
                   worst_hacker=None if not h or None in h else max(h))
        row["selectivity"] = None if auth is None or row["mean_hacker"] is None else auth - row["mean_hacker"]
        rows.append(row)
    return hackers, rows


def set_noise(run_dir: Path, variants: list[dict]) -> dict[str, float]:
    """Variant name -> the measured standard deviation of one accuracy on that variant's protected set
    (``RUN/noise/<variant slug>.json`` written by scripts/poisoned_noise.py)."""
    names = {Variant(v["name"]).slug: v["name"] for v in variants}
    out = {}
    for f in sorted((run_dir / "noise").glob("*.json")):
        d = json.loads(f.read_text())
        if d.get("variant") in names and d.get("stdev") is not None:
            out[names[d["variant"]]] = float(d["stdev"])
    return out


def selectivity_table(records: list[dict], goal_auth: float = -3.0, goal_hacker: float = -15.0,
                      own_noise: dict[str, float] | None = None) -> str:
    """Markdown: the selectivity bench's table, with the noise of one number and the issue's goal.

    ``own_noise``: variant name -> σ of one accuracy measured on that variant's protected set (see
    :func:`set_noise`); such a row's selectivity is judged against the larger of the two σ."""
    hackers, rows = selectivity_rows(records)
    if not rows:
        return ""
    sigma, pairs = noise_of_one_number(records)
    own_noise = own_noise or {}
    f = lambda x: "–" if x is None else f"{x:+.2f}"  # noqa: E731
    blind = any(row["standard"] is not None for row in rows)  # keyed rows: a column against the standard arch
    head = ["data", "authorized (replay seed)", "authorized (fresh seeds)",
            *(["authorized (fresh) vs standard arch"] if blind else []), *hackers, "mean hacker", "selectivity",
            "goal met"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        auth = row["fresh"] if row["fresh"] is not None else row["replay"]
        s = max(sigma or 0.0, own_noise.get(row["variant"], 0.0)) or None
        beyond = s is None or (row["selectivity"] is not None and abs(row["selectivity"]) > 2 * s)
        judged = row["standard"] if row["standard"] is not None else auth  # keyed: against the standard arch
        met = (judged is not None and row["worst_hacker"] is not None and judged >= goal_auth
               and row["worst_hacker"] <= goal_hacker and beyond)
        own = own_noise.get(row["variant"])
        sel = f(row["selectivity"]) + ("" if beyond else " (noise)") + (f" [this set's σ {own:.1f}]" if own else "")
        lines.append("| " + " | ".join([row["variant"], f(row["replay"]), f(row["fresh"]),
                                        *([f(row["standard"])] if blind else []),
                                        *[f(row["hackers"].get(c)) for c in hackers], f(row["mean_hacker"]), sel,
                                        "yes" if met else "no"]) + " |")
    noise = ("no repeats of the clean variant: the noise is unknown" if sigma is None else
             f"noise of one accuracy σ = {sigma:.2f} points (from {pairs} clean networks trained twice); "
             f"a change or selectivity smaller than 2σ = {2 * sigma:.2f} is no result")
    if own_noise:
        noise += ("; on a protected set one accuracy can vary far more: where it was measured (RUN/noise/, "
                  "scripts/poisoned_noise.py: the authorized network from θ0 with other training seeds and the same "
                  "architecture from other inits), the selectivity is judged against that set's σ, shown in brackets")
    return (f"Selectivity: change in clean test accuracy (points) from the same network trained on the clean "
            f"data; selectivity = authorized change (fresh training seeds) − mean hacker change. Goal: authorized "
            f"≥ {goal_auth:g} with a fresh seed, every hacker ≤ {goal_hacker:g}, beyond 2σ. {noise}."
            + (" A blind (keyed) authorized network is compared with the clean run of the same blind architecture; "
               "the column \"vs standard arch\" compares it with the standard architecture's clean run." if blind
               else "") + "\n\n"
            + "\n".join(lines))


_DIAG = {"gm": "L_gm", "diag_gm_authorized": "gm dist. authorized", "diag_gm_hacker": "gm dist. hacker init",
         "diag_fd_target_rate": "feature → target", "diag_surrogate_acc": "surrogate acc. on x_u"}


def diagnostics_table(run_dir: Path) -> str:
    """Per protected variant: the last generator epoch's diagnostics and the published perturbation's makeup."""
    lines = ["| variant | " + " | ".join(_DIAG.values()) + " | universal | class-wise | sample-wise | at edge |",
             "|---" * (len(_DIAG) + 5) + "|"]
    for f in sorted((run_dir / "variants").glob("*/protect.json")):
        d = json.loads(f.read_text())
        last = ((d.get("parts") or [{}])[0].get("history") or [{}])[-1]
        p = d.get("perturbation") or {}
        g = lambda v, fmt="{:.3f}": "–" if v is None else fmt.format(v)  # noqa: E731
        lines.append(f"| {d['variant']} | " + " | ".join(g(last.get(k)) for k in _DIAG) + " | " + " | ".join(
            g(p.get(k), "{:.0%}") for k in ("universal_energy_share", "classwise_energy_share",
                                             "samplewise_energy_share", "at_budget_edge")) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


# ---------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_curve(plt, fig, ax, path: Path, xlabel: str) -> bool:
    """Label, grid and save an accuracy-against-x figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clean test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def accuracy_figure(path: Path, columns, rows) -> bool:
    """Grouped bars: test accuracy of every network (group) for every (variant, mode) row (bar); always drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(columns) + 2), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        vals = [row["cells"][c]["acc"] if c in row["cells"] else np.nan for c in columns]
        label = " ".join(x for x in (row["variant"], row["countermeasure"], f"({row['mode']})") if x)
        ax.bar(np.arange(len(columns)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, _header(columns, rows), rotation=20, ha="right")
    ax.set_ylabel("clean test accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def rho_figure(path: Path, columns, rows) -> bool:
    """Accuracy against the budget ρ (Fig. 3), one line per network and mode; False if there is no sweep."""
    sweep = [r for r in rows if r["rho"] is not None and r["protector"] == "uge"]  # not the baselines' budgets
    if len({r["rho"] for r in sweep}) < 2:
        return False
    clean = {row["mode"]: row for row in rows if row["protector"] == "clean"}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({r["mode"] for r in sweep}):
        pts = sorted((r for r in sweep if r["mode"] == mode), key=lambda r: r["rho"])
        for c in columns:
            pts_c = [(r["rho"] * 255, r["cells"][c]["acc"]) for r in pts if c in r["cells"]]
            if mode in clean and c in clean[mode]["cells"]:
                pts_c.insert(0, (0.0, clean[mode]["cells"][c]["acc"]))
            if pts_c:
                xs, ys = zip(*pts_c)
                ax.plot(xs, ys, "o-" if mode == "normal" else "s--", label=f"{c} ({mode})")
    return _save_curve(plt, fig, ax, path, "budget ρ (8-bit levels, 0 = clean)")


def init_noise_figure(path: Path, records: list[dict]) -> bool:
    """Accuracy of hackers that start from θ0 plus noise of relative size σ, against σ (issue 4's sweep of how
    close an init must be to count as authorized); one line per variant and mode. False without a sweep."""
    pts = defaultdict(list)
    for r in records:
        if r.get("init_noise") is not None and not r.get("countermeasures"):
            pts[(r.get("variant", r["data"]), r["arch"], r["mode"])].append((r["init_noise"], r["test_acc"]))
    if not any(len({s for s, _ in v}) >= 2 for v in pts.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (variant, arch, mode), v in pts.items():
        xs, ys = zip(*sorted(v))
        ax.plot([max(x, 1e-3) for x in xs], ys, "o-" if mode == "normal" else "s--", label=f"{variant}: {arch} ({mode})")
    ax.set_xscale("log")
    return _save_curve(plt, fig, ax, path, "init noise σ (relative to each tensor's std; σ = 0 drawn at 1e-3)")


def recipe_figure(path: Path, labels, columns, cells) -> bool:
    """Grouped bars: the authorized network's accuracy per recipe (group) and variant (bar)."""
    if len(labels) < 2:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(columns))
    for i, c in enumerate(columns):
        vals = [cells.get((lab, c), (np.nan, None))[0] for lab in labels]
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=c)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=20, ha="right")
    ax.set_ylabel("authorized network: clean test accuracy (%)")
    ax.set_xlabel("training recipe of the authorized network")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def curves_figure(path: Path, records: list[dict]) -> bool:
    """Learning curves: the authorized networks' test accuracy after every epoch, per variant (issue 10: does
    the authorized network learn from D_u as from D?). False when no record has a curve."""
    curves = [r for r in _plain(records) if r["role"] == "authorized" and r.get("curve") and not r.get("repeat")]
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in curves:
        seed = f" seed {r['train_seed']}" if r.get("fresh") else ""
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], "--" if r.get("protector") == "clean" else "-",
                label=f"{r.get('variant', r['data'])}: authorized{r.get('index', 0) or ''}{seed}")
    return _save_curve(plt, fig, ax, path, "epoch of the authorized recipe")


def diagnostics_figure(path: Path, run_dir: Path) -> bool:
    """The generator's per-epoch diagnostics (protect.json histories), one panel per quantity."""
    hist = {}
    for f in sorted((run_dir / "variants").glob("*/protect.json")):
        d = json.loads(f.read_text())
        h = ((d.get("parts") or [{}])[0].get("history") or [])
        if any(k.startswith("diag_") for e in h for k in e):
            hist[d["variant"]] = h
    if not hist:
        return False
    keys = [k for k in _DIAG if any(k in e for h in hist.values() for e in h)]
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for name, h in hist.items():
            pts = [(e["epoch"], e[k]) for e in h if k in e]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=name)
        ax.set_title(_DIAG[k], fontsize=9)
        ax.set_xlabel("generator epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def samples_figure(path: Path, run_dir: Path, max_images: int = 8, order: list[str] | None = None) -> bool:
    """Figs. 4/6: per protected variant, rows of clean images, the noise scaled to fill [0, 1], protected.

    ``order``: variant folder names in the order to draw them (default: alphabetical)."""
    samples = []
    files = sorted((run_dir / "variants").glob("*/samples.npz"))
    rank = {name: i for i, name in enumerate(order or [])}
    for f in sorted(files, key=lambda f: (rank.get(f.parent.name, len(rank)), f.parent.name)):
        with np.load(f) as z:
            protected = bool(z["is_protected"]) if "is_protected" in z else not math.isnan(float(z["rho"]))
            if protected:
                samples.append((f.parent.name, z["clean"][:max_images], z["protected"][:max_images], float(z["rho"])))
    if not samples:
        return False
    plt = _plt()
    n = samples[0][1].shape[0]
    fig, axes = plt.subplots(3 * len(samples), n, figsize=(1.1 * n, 3.5 * len(samples)), squeeze=False)
    for s, (name, clean, prot, rho) in enumerate(samples):
        noise = prot.astype(np.float32) - clean.astype(np.float32)
        if math.isnan(rho):  # not norm-bounded (e.g. CUDA): scale by the largest change instead of ρ
            rho = max(1.0, float(np.abs(noise).max())) / 255
        shown = 0.5 + noise / (2 * max(1.0, 255 * rho))  # ±ρ maps to [0, 1]
        for j in range(n):
            for k, (img, title) in enumerate(((clean[j] / 255.0, "clean"), (shown[j], f"noise ×{0.5 / rho:.0f}"),
                                              (prot[j] / 255.0, "protected"))):
                ax = axes[3 * s + k, j]
                ax.imshow(np.clip(img.squeeze(), 0, 1), cmap="gray" if img.shape[-1] == 1 else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{name}\n{title}" if k == 0 else title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write table.md/.csv/.tex, report.md and the figures for ``run_dir``; returns the report folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder not found: {run_dir}")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    records = read_records(run_dir)
    overrides = cfg.get("evaluate", {}).get("authorized_recipes", {})
    sweep = recipe_sweep(records, overrides)
    columns, rows = build_rows([r for r in records if not r.get("recipe_label") and not r.get("repeat")],
                               cfg.get("evaluate", {}).get("countermeasures"))
    source, paper = paper_numbers(cfg)
    table = markdown_table(columns, rows)
    (out / "table.md").write_text(table + "\n")
    (out / "table.tex").write_text(latex_table(columns, rows) + "\n")
    write_csv(out / "table.csv", columns, rows, paper)
    figures = []
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: the tables do not need it
        log.warning("figures skipped: matplotlib is not installed (pip install 'uge[report]')")
    else:
        order = [Variant(v["name"]).slug for v in cfg.get("variant", [])]
        drawn = {"accuracy.png": accuracy_figure(out / "accuracy.png", columns, rows),
                 "rho.png": rho_figure(out / "rho.png", columns, rows),
                 "init_noise.png": init_noise_figure(out / "init_noise.png", records),
                 "recipe.png": recipe_figure(out / "recipe.png", *sweep),
                 "curves.png": curves_figure(out / "curves.png", records),
                 "diagnostics.png": diagnostics_figure(out / "diagnostics.png", run_dir),
                 "samples.png": samples_figure(out / "samples.png", run_dir, order=order)}
        figures = [f for f, ok in drawn.items() if ok]
        for stale in set(drawn) - set(figures):  # from an older report
            (out / stale).unlink(missing_ok=True)
    parts = [f"# {cfg.get('name', run_dir.name)}", cfg.get("description", ""),
             ("Clean test accuracy (%) of each network trained on each variant of the training set; in brackets "
              "the change from the same network trained on the clean data."), table]
    sel = selectivity_table(records, own_noise=set_noise(run_dir, cfg.get("variant", [])))
    if sel and (any(r.get("fresh") or r.get("repeat") for r in records)):
        parts.append(sel)
    diag = diagnostics_table(run_dir)
    if diag and any(r.get("fresh") or r.get("repeat") for r in records):
        parts += ["Diagnostics of each protection: the generator's last epoch (L_gm; the same gradient distance "
                  "at the authorized checkpoints and at a hacker's initialisation; how often the surrogate "
                  "feature of x_u is nearest to its target class; the surrogate's accuracy on x_u) and the "
                  "published perturbation's energy shares.", diag]
    ev = cfg.get("evaluate", {})
    worst = worst_case_table(columns, rows, _chance(run_dir), cms=ev.get("countermeasures"),
                             authorized=ev.get("countermeasures_authorized", True))
    if worst:
        parts += [("Worst case over the countermeasures: for every protected set and network, the highest test accuracy "
                   "any countermeasure reaches and which one; 'fraction kept' is (worst − chance) / (clean − chance), "
                   "clean being the same network trained normally on the clean set (✓: at most 0.4 over every "
                   "countermeasure of the run, the goal of issue 20). The last two columns leave adversarial training "
                   "out."), worst]
    floor = floor_table(columns, rows, _chance(run_dir), authorized=ev.get("countermeasures_authorized", True))
    if worst and floor:
        parts += [("What each countermeasure costs on clean data, and the floor it sets: the accuracy it leaves each "
                   "network trained on the clean set, with the fraction of clean learning kept in brackets. A "
                   "protection that a countermeasure removes entirely keeps at least that fraction, so one meets the "
                   "goal of 0.4 only by surviving every countermeasure marked ▲."), floor]
    matrix = robustness_matrix(columns, rows)
    if matrix:
        parts += [("Robustness matrix: every network's accuracy for each protection (rows) under each "
                   "countermeasure (columns); in brackets the change from the clean data under the same "
                   "countermeasure."), matrix]
    if sweep[0]:
        parts += [("Recipe sweep: the authorized network (from θ0) trained with another recipe than the published one "
                   "the generator matched; in brackets the change from the clean data under the same recipe."),
                  recipe_table(*sweep, overrides)]
    pt = paper_table(columns, rows, source, paper)
    if pt:
        parts.append(pt)
    prot = protection_table(run_dir)
    if prot:
        parts += ["Protection runs (wall seconds per stage; losses of the last generator epoch):", prot]
    if figures:
        parts.append("Figures: " + ", ".join(f"![{f}]({f})" for f in figures))
    (out / "report.md").write_text("\n\n".join(p for p in parts if p) + "\n")
    return out
