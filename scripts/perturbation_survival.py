"""How much of a published perturbation survives each input-transform countermeasure? (issue 20 part 3)

Usage: python scripts/perturbation_survival.py CONFIG RUN_DIR [--countermeasures A B ...] [--out FILE.json]

For every protected variant of the benchmark run: δ = published − clean, and for each countermeasure T (an
input transform, fitted on the published set as the hacker would) the part of T(published) − T(clean) that is
still δ: the amplitude of δ in it (``along_delta``, the projection on δ over δ's energy: 1 = all of δ survives),
its energy relative to δ's (``kept_energy``, which counts the transform's own artefacts too) and its
correlation with δ (``corr``). A transform that
keeps little of δ (and little harm to clean images) is the attack to expect; a pattern that keeps most of its
energy under every transform is a candidate worth training networks on. Fitted transforms (``pca``) are fitted
once on the published set and applied as fitted to the clean set. Also, per variant, the published set's power
per 8×8-block DCT coefficient (u, v; the mean over channels) over the clean set's own (``power_vs_clean``) and over
the reference's (the test split: ``power_vs_reference``, beside the clean set's ``clean_vs_reference``): what the
excess-power attacks compare; and the same in the Fourier basis of the whole image (``fourier_power``: the largest
ratio and the bins over 1.5 and 1.2, what ``spectral`` compares). ``--lowpass BAND ...``: also what ``tap``'s
``lowpass`` view keeps of δ (a stand-in for an attack, for choosing its band). Writes JSON with the command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from uge.benchmark import load_config
from uge.benchmark.runner import load_data
from uge.countermeasures import parse_countermeasures
from uge.countermeasures.adaptive import OrthogonalProjection
from uge.countermeasures.registry import InputTransform
from uge.data.dataset import ImageDataset
from uge.protectors.tap import low_passed
from uge.published import read_published
from uge.utils import write_json

DEFAULT = ["grayscale+jpeg:quality=10", "grayscale+jpeg-grid:quality=10,offset=4", "jpeg:quality=10", "grayscale", "pca:patch=8,k=64,ratio=1.2",
           "pca:patch=8,k=16", "pca", "orthogonal", "classmean", "spectral", "spectral:k=256,ratio=1.5,zero=1"]


def survival(clean, published, test, spec: str) -> dict:
    cms = [c for c in parse_countermeasures(spec) if isinstance(c, InputTransform)]
    a, b = published, clean
    for c in cms:
        if isinstance(c, OrthogonalProjection):  # the published set's projection, out of both
            q = c.basis(a)
            a, b = (ImageDataset(c.project_out(d.images, q), d.labels, d.classes) for d in (a, b))
            continue
        a = c(a, test, False)  # fitted on the published set (a hacker has nothing else) ...
        # ... and applied as fitted to the clean images (pca); per-set transforms (classmean, JPEG) run on each
        b = c(b, test, True) if getattr(c, "at_test", False) and getattr(c, "_basis", None) is not None \
            else c(b, test, False)
    found = [getattr(c, "found", None) for c in cms if getattr(c, "found", None) is not None]
    return {**kept(clean, published, a, b), **({"pca_ratios": found[0]} if found else {})}


def kept(clean, published, a, b) -> dict:
    """How much of δ = published − clean is in a − b (the two sets transformed): its amplitude along δ, its energy
    relative to δ's, its correlation with δ."""
    d0 = published.images.astype(np.float64) - clean.images.astype(np.float64)
    d1 = a.images.astype(np.float64) - b.images.astype(np.float64)
    e0, e1 = float((d0 ** 2).sum()), float((d1 ** 2).sum())
    corr = float((d0 * d1).sum() / np.sqrt(e0 * e1)) if e0 and e1 else 0.0
    along = float((d0 * d1).sum() / e0) if e0 else 0.0  # the amplitude of δ still in the difference
    return {"along_delta": round(along, 4), "kept_energy": round(e1 / e0, 4), "corr": round(corr, 4)}


def block_power(images: np.ndarray) -> np.ndarray:
    """Mean power per 8×8-block DCT coefficient, (v, u, channel)."""
    from uge.countermeasures.adaptive import BlockDCTExcess
    return (BlockDCTExcess._coefficients(images)[0] ** 2).mean(0)


def power_ratios(clean, published, test) -> dict:
    """Published / clean, published / reference and clean / reference power per block-DCT coefficient (v rows, u
    columns; the mean over channels), rounded."""
    pub, own, ref = block_power(published.images), block_power(clean.images), block_power(test.images)
    r = lambda a, b: np.round((a / np.maximum(b, 1e-12)).mean(-1), 4).tolist()  # noqa: E731
    return {"power_vs_clean": r(pub, own), "power_vs_reference": r(pub, ref), "clean_vs_reference": r(own, ref)}


def fourier_reference(clean, test) -> tuple[np.ndarray, float]:
    """The reference's (the test split's) mean Fourier power per (row frequency, column frequency, channel), and the
    clean set's own largest ratio over it (sampling noise): computed once, shared by every variant."""
    from uge.countermeasures.adaptive import SpectralExcess
    ref = SpectralExcess._power(test.images)
    own = SpectralExcess._power(clean.images) / ref
    own[0, 0] = 0  # the mean colour: never touched by the attack
    return ref, round(float(own.max()), 4)


def fourier_ratios(clean, published, reference: tuple[np.ndarray, float]) -> dict:
    """What ``spectral`` compares: the published set's mean Fourier power over the reference's
    (:func:`fourier_reference`), its largest value and how many bins exceed 1.5 and 1.2, beside the clean set's own
    largest ratio; and δ's rms over its largest |δ|."""
    from uge.countermeasures.adaptive import SpectralExcess
    ref, clean_max = reference
    pub = SpectralExcess._power(published.images) / ref
    pub[0, 0] = 0  # the mean colour: never touched by the attack
    d = published.images.astype(np.float64) - clean.images.astype(np.float64)
    return {"max_ratio": round(float(pub.max()), 4), "bins_over_1.5": int((pub > 1.5).sum()),
            "bins_over_1.2": int((pub > 1.2).sum()), "clean_max_ratio": clean_max,
            "delta_rms_over_max": round(float(np.sqrt((d ** 2).mean()) / np.abs(d).max()), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("run")
    p.add_argument("--countermeasures", nargs="+", default=DEFAULT)
    p.add_argument("--lowpass", nargs="*", type=int, default=[],
                   help="also what tap's lowpass view (tap.low_pass) keeps of δ at these bands")
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    clean, test = load_data(cfg)
    out = {"command": "python scripts/perturbation_survival.py " + " ".join(argv or sys.argv[1:]), "variants": {}}
    reference = fourier_reference(clean, test)
    clean_low = {band: low_passed(clean, band) for band in args.lowpass}  # once, not once per variant
    for v in cfg.variants:
        pub_dir = Path(args.run) / "variants" / v.slug / "published"
        if v.protector == "clean" or not (pub_dir / "data.npz").is_file():
            continue
        pub = read_published(pub_dir).data
        res = {spec: survival(clean, pub, test, spec) for spec in args.countermeasures}
        res.update({f"tap lowpass view, band {band}": kept(clean, pub, low_passed(pub, band), clean_low[band])
                    for band in args.lowpass})
        out["variants"][v.name] = res
        out.setdefault("block_dct_power", {})[v.name] = power_ratios(clean, pub, test)
        out.setdefault("fourier_power", {})[v.name] = fourier = fourier_ratios(clean, pub, reference)
        print(f"{v.name:45s} Fourier power over the reference: {fourier}")
        for spec, r in res.items():
            print(f"{v.name:45s} {spec:32s} along δ {r['along_delta']:+.3f}  energy {r['kept_energy']:.3f}  "
                  f"corr {r['corr']:+.3f}")
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
