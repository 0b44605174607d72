"""The README's table of measured results, written from committed benchmark records (issue 21).

Usage: python scripts/readme_results.py [--check]

For each protection in ROWS (a run folder under results/ and a variant of it): the key holder's accuracy
(a sealed set's key holder trains on the originals, bit for bit: the hacker's network on the clean set; keyed
protection's is the authorized blind network on the published set), the hacker's accuracy without a countermeasure, and the
worst case over the run's countermeasures with the fraction of clean learning it keeps, (worst − chance) /
(clean − chance). Replaces the lines between the README's results-table markers; ``--check`` only compares
(exit 1 when the README is out of date).

It also writes ``src/uge/standing.py``: the same numbers for the default protection (``DEFAULT``, the battery's
variant that ``grating`` publishes the same images as), which ``uge protect`` prints beside the method's name.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from uge.benchmark import read_records

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
# (label, run folder, variant, key holder[, hacker]): "sealed" = trains on the unsealed originals, "authorized" =
# the run's authorized network on the published set; hacker: the records' "init" (e.g. "seed:1") where the run has
# several hackers (without it, the run's hacker records are taken as one)
DEFAULT = ("grating", "battery-cpu", "Grating code mixed with secret weights, sign per block, power-matched", "sealed")
FULL = ("battery-gpu", DEFAULT[2], "sealed")  # the default at full size (one GPU), printed beside it too
CUBIC = "TAP against the owner's pretrained features, linear probe, ISS in half its steps, cubic rounding gradient"
VOTE = ("TAP, owner's features and a block-mean probe, every step a vote of the plain, ISS (cubic) and block-mean "
        "views")
JPEG_VOTE = ("TAP, owner's features and a block-mean probe, every step a vote of the plain, ISS (cubic), colour JPEG "
             "(cubic) and block-mean views")
FIVE = "TAP, owner's features, a block-mean probe and a source from random init, every step a vote of five views"
RANGE = ("TAP, owner's features, a block-mean probe and a source from random init, five views, ISS at qualities 10 "
         "to 50")
O12 = "O12: O11 in the luminance of the block-DCT band v + u <= 4, power-matched"
O13 = "O13: O11 with a sixth view, the low block-DCT frequencies against a source trained on such"
O14 = "O14: O11 at rho = 16/255 (a larger budget, labelled)"
O17 = "O17: O14 with the views' gradients summed, each scaled per image, instead of their signs voted"
O18 = "O18: O13 with the views' gradients summed, each scaled per image, instead of their signs voted"
ROWS = [
    ("Keyed (blind network; key in one colour direction)", "battery-cpu", "Keyed (4×4 cells along (1,−2,1))",
     "authorized"),
    ("JPEG-basis grating code (a basis per class), sign per block, sealed", "battery-cpu",
     "JPEG-basis grating code, sign per block", "sealed"),
    ("Low-frequency JPEG-basis mix, sign per block, sealed", "ladder-grating-blocks-cpu",
     "Low-frequency JPEG-basis mix, sign per block", "sealed"),
    ("The same grating, the set's block-DCT power matched to clean, sealed", "battery-cpu",
     "Grating code, sign per block, power-matched, whole budget", "sealed"),
    ("**`grating`, the default**: the same, each class's pattern a secret mix of the bases", *DEFAULT[1:]),
    ("**`grating`, the default, at full size** (50,000 images, 15 epochs, one GPU)", *FULL),
    ("Tiled 2-px luminance patch, shifted per image, sealed", "ladder-attacks-cpu",
     "Shifted tiled luminance patch, 2-px cells", "sealed"),
    ("EM (Huang et al. 2021) to its stop criterion, sealed", "battery-cpu", "EM, to its stop criterion", "sealed"),
    ("EM in 8-px cell means, luminance (ours), sealed", "battery-cpu", "EM in 8-px cell means, luminance", "sealed"),
    ("CUDA (Sadasivan et al. 2023; not norm-bounded), sealed", "battery-cpu", "CUDA (not norm-bounded)", "sealed"),
    ("TAP (Fowl et al. 2021; 50 PGD steps), sealed", "battery-tap-cpu", "TAP (targeted adversarial poisoning)",
     "sealed"),
    ("TAP in 8-px cell means, luminance (ours), sealed", "ladder-tap-band-cpu", "TAP in 8-px cell means, luminance",
     "sealed"),
    ("REM (Fu et al. 2022; ρ_a 4/255, 6 rounds, not converged), sealed", "battery-rem-cpu",
     "REM (robust error-minimizing noise)", "sealed"),
    ("TAP against the owner's pretrained features, ISS (cubic gradient) in half its steps (ours), sealed",
     "battery-tap-cubic-cpu", CUBIC, "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-cubic-cpu", CUBIC, "sealed", "seed:1"),
    ("TAP against the owner's features and a block-mean probe, each step a vote of plain, ISS and block-mean views "
     "(ours), sealed", "battery-tap-vote-cpu", VOTE, "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-vote-cpu", VOTE, "sealed", "seed:1"),
    ("the same with a colour JPEG 10 view in the vote (ours), sealed", "battery-tap-vote-cpu", JPEG_VOTE, "sealed",
     "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-vote-cpu", JPEG_VOTE, "sealed", "seed:1"),
    ("the same with a fifth view against a source from random init (ours), sealed", "battery-tap-vote-cpu", FIVE,
     "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-vote-cpu", FIVE, "sealed", "seed:1"),
    ("the same with the ISS view's quality drawn from 10 to 50 (ours), sealed", "battery-tap-final-cpu", RANGE,
     "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-final-cpu", RANGE, "sealed", "seed:1"),
    ("the same in the luminance of low block-DCT frequencies, the set's block-DCT power matched to clean (ours), "
     "sealed", "battery-tap-final-cpu", O12, "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-final-cpu", O12, "sealed", "seed:1"),
    ("the TAP with the ISS view's quality drawn from 10 to 50 (above) with a sixth view, the low block-DCT "
     "frequencies against a source trained on such (ours), sealed",
     "battery-tap-final-cpu", O13, "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-final-cpu", O13, "sealed", "seed:1"),
    ("the TAP with the ISS view's quality drawn from 10 to 50 (above) **at ρ = 16/255, a larger budget** (ours), "
     "sealed", "battery-tap-final-cpu", O14, "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-final-cpu", O14, "sealed", "seed:1"),
    ("the same at ρ = 16/255 with the views' gradients summed, each scaled per image, instead of their signs voted "
     "(ours), sealed", "battery-tap-final-cpu", O17, "sealed", "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-final-cpu", O17, "sealed", "seed:1"),
    ("the TAP with a sixth view (above, ρ = 10/255) with the views' gradients summed, each scaled per image, instead "
     "of their signs voted (ours), sealed", "battery-tap-final-cpu", O18, "sealed",
     "file:resnetc20-c100-250-s1.safetensors"),
    ("the same, against a hacker from random init", "battery-tap-final-cpu", O18, "sealed", "seed:1"),
    ("UGE's generator, batch mean removed (its strongest poison), sealed", "battery-uge-cpu",
     "UGE (paper reading), batch mean removed", "sealed"),
    ("UGE, the paper's method (key: θ0)", "robustness-cpu", "UGE", "authorized"),
]


@functools.lru_cache(maxsize=None)
def numbers(run: str, variant: str, key: str, hacker: str | None = None) -> dict:
    """A variant's measured standing: the key holder's and the (ResNetC-20) hacker's accuracy, plain and at worst
    (once per variant: the table and the standing both ask); ``hacker``: only the records of that init."""
    recs = _records(run)
    plain = [r for r in recs if not r.get("countermeasures")]
    mine = [r for r in recs if r["variant"] == variant]
    hack = [r for r in mine if r["role"] == "hacker" and r["mode"] == "normal"
            and (hacker is None or r.get("init") == hacker)]
    if not hack:
        raise SystemExit(f"results/{run}: no hacker records of variant {variant!r}"
                         + (f" with init {hacker!r}" if hacker else ""))
    arch, seed = hack[0]["arch"], hack[0].get("init")
    clean_hack = next(r["test_acc"] for r in plain if r["role"] == "hacker" and r["protector"] == "clean"
                      and r["arch"] == arch and r["mode"] == "normal" and r.get("init") == seed)
    clean_auth = next((r["test_acc"] for r in plain if r["role"] == "authorized" and r["protector"] == "clean"),
                      clean_hack)
    chance = 100 / 10  # CIFAR-10
    worst = max(hack, key=lambda r: r["test_acc"])
    soft = max((r for r in hack if not (r.get("countermeasures") or "").startswith("adv")), key=lambda r: r["test_acc"])
    # a sealed set's key holder trains on the unsealed originals: the hacker's network on clean data, the same
    # number in every run (some runs trained an authorized network from another seed, some none)
    holder = clean_hack if key == "sealed" else next(
        r["test_acc"] for r in mine if r["role"] == "authorized" and not r.get("countermeasures"))
    return {"run": f"results/{run}", "network": arch, "rho": hack[0].get("rho"), "key_holder": round(holder, 1),
            "clean_key_holder": round(clean_auth, 1), "clean": round(clean_hack, 1),
            "plain": round(next(r["test_acc"] for r in hack if not r.get("countermeasures")), 1),
            "worst": round(worst["test_acc"], 1), "by": worst.get("countermeasures") or "none",
            "fraction": round((worst["test_acc"] - chance) / (clean_hack - chance), 2), "attacks": len(hack) - 1,
            "worst_without_adv": round(soft["test_acc"], 1), "by_without_adv": soft.get("countermeasures") or "none",
            "fraction_without_adv": round((soft["test_acc"] - chance) / (clean_hack - chance), 2)}


@functools.lru_cache(maxsize=None)
def _records(run: str) -> list[dict]:
    return read_records(ROOT / "results" / run)  # read once per run, not once per row


def _row(label: str, run: str, variant: str, key: str, hacker: str | None = None) -> str:
    n = numbers(run, variant, key, hacker)
    holder = (f"{n['key_holder']:.1f} (= clean, unsealed)" if key == "sealed"
              else f"{n['key_holder']:.1f} (clean {n['clean_key_holder']:.1f})")
    network = NETWORKS.get(n["network"], n["network"]) + (", pretrained" if _pretrained(hacker) else "")
    return (f"| {label} | {holder} | {network} | {n['plain']:.1f} "
            f"(clean {n['clean']:.1f}) | {n['worst']:.1f} by `{n['by']}`: "
            f"keeps {n['fraction']:.2f} of clean learning ({n['attacks']} attacks) | "
            f"[{run}](results/{run}/report/report.md) |")


NETWORKS = {"resnetc20": "ResNetC-20", "resnet18": "ResNet-18"}


def _pretrained(hacker: str | None) -> bool:
    """A row's hacker (the records' init) starts from a weights file: another hacker than the default's."""
    return (hacker or "").startswith("file:")


def table() -> str:
    head = ["| protection | key holder | hacker | hacker, plain | hacker, worst case over the attacks run | run |",
            "|---|---|---|---|---|---|"]
    return "\n".join(head + [_row(*r) for r in ROWS])


def standing() -> str:
    """The text of src/uge/standing.py: the default protection's numbers, and the lowest worst case (fraction of
    clean learning kept) of every other protection in the README's table, against the same hacker, at its budget."""
    method, *row = DEFAULT
    rho = numbers(*row)["rho"]
    # against the default's hacker (ResNetC-20 from random init): a pretrained hacker's row is another hacker; and
    # at the default's budget: a larger one is a separate, labelled row (issue 20), not a rival
    rivals = [numbers(*r[1:]) for r in ROWS if tuple(r[1:]) not in (tuple(row), FULL)
              and not _pretrained(r[4] if len(r) > 4 else None)]
    others = [n["fraction"] for n in rivals if n["rho"] is None or n["rho"] <= rho]
    values = {"method": method, **numbers(*row), "lowest_other": min(others), "protections": len(others) + 1,
              "full_size": numbers(*FULL)}
    return (f'"""The default protection\'s measured standing, which ``uge protect`` prints: written by '
            f'scripts/readme_results.py\nfrom the committed records of {row[0]} (do not edit by hand)."""\n\n'
            "STANDING = {\n" + "".join(_item(k, v, "    ") for k, v in values.items()) + "}\n")


def _item(key, value, indent: str) -> str:
    """One ``key: value,`` line of the standing module (a dict's items on lines of their own)."""
    if isinstance(value, dict):
        return (f"{indent}{key!r}: {{\n" + "".join(_item(k, v, indent + "    ") for k, v in value.items())
                + f"{indent}}},\n")
    return f"{indent}{key!r}: {value!r},\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if the README is out of date")
    args = p.parse_args(argv)
    readme, module = ROOT / "README.md", ROOT / "src" / "uge" / "standing.py"
    text = readme.read_text()
    i, j = text.index(START) + len(START), text.index(END)
    new = text[:i] + "\n" + table() + "\n" + text[j:]
    if args.check:
        stale = [f.name for f, want in ((readme, new), (module, standing()))
                 if not f.exists() or f.read_text() != want]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python scripts/readme_results.py")
            return 1
        return 0
    readme.write_text(new)
    module.write_text(standing())
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
