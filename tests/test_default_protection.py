"""Issue 21, item 1: ``uge protect`` without ``--method`` runs the measured default (``grating``: the battery's
variant of that name, whose worst case is within noise of the lowest), says so with the numbers, and publishes
it sealed."""
from __future__ import annotations

import contextlib
import io
import stat
from pathlib import Path

import numpy as np
import pytest

from uge.benchmark import load_config
from uge.cli import build_parser, main
from uge.data import ImageDataset
from uge.data.loaders import load_dataset
from uge.errors import ConfigError
from uge.protectors import build_protector
from uge.published import read_published
from uge.standing import STANDING

ROOT = Path(__file__).resolve().parents[1]
MEASURED = "Grating code mixed with secret weights, sign per block, power-matched"  # the battery's variant


def _rgb(n_classes: int, per_class: int = 2, size: int = 16) -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_classes * per_class, size, size, 3), dtype=np.uint8)
    return ImageDataset(images, np.repeat(np.arange(n_classes), per_class), [str(c) for c in range(n_classes)])


def test_the_default_method_is_the_measured_one():
    """The standing printed is the numbers of the battery's variant, and ``grating``'s defaults are that variant's
    settings: it publishes the same images."""
    assert build_parser().parse_args(["protect", "--data", "digits", "--out", "x"]).method == STANDING["method"]
    variant = next(v for v in load_config(ROOT / "configs" / "battery-cpu.toml").variants if v.name == MEASURED)
    assert STANDING["run"] == "results/battery-cpu"
    data = _rgb(10)
    ours = build_protector(STANDING["method"]).protect(data, progress=False, seed=0)
    theirs = build_protector(variant.protector, **variant.overrides).protect(data, progress=False, seed=0)
    assert np.array_equal(ours.protected.images, theirs.protected.images)
    other = build_protector(STANDING["method"], mix=False)
    assert not np.array_equal(other.protect(data, progress=False, seed=0).protected.images, ours.protected.images)


def test_grating_codes_any_number_of_classes_and_one_basis_each_up_to_63():
    many = build_protector("grating").protect(_rgb(100, per_class=1, size=8), progress=False, seed=0).protected
    blocks = many.images.astype(float) - 128  # a secret mix per class: 100 classes, 100 distinct patterns
    assert len(np.unique(np.sign(blocks[:, :, :, 0]).reshape(100, -1), axis=0)) > 90
    result = build_protector("grating", mix=False).protect(_rgb(12, per_class=1, size=8), progress=False, seed=0)
    assert len(result.params["freqs"]) == 12 and result.params["freqs"][10:] == ["2,0", "0,2"]
    with pytest.raises(ConfigError, match="at most 63 classes"):
        build_protector("grating", mix=False).protect(_rgb(64, per_class=1, size=8), progress=False, seed=0)


def _protect(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["protect", "--data", "digits", "--per-class", "5", "--device", "cpu", *argv])
    return rc, out.getvalue()


def test_uge_protect_without_a_method_says_what_it_runs_and_seals_with_a_new_key(tmp_path):
    pub = tmp_path / "pub"
    rc, out = _protect(["--out", str(pub)])
    assert rc == 0
    assert f"{STANDING['method']}, the default (results/battery-cpu" in out
    assert f"the lowest of the other {STANDING['protections'] - 1} protections measured at its budget" in out
    assert f"reaches {STANDING['plain']:.1f} % test accuracy plainly and {STANDING['worst']:.1f} % at worst" in out
    full = STANDING["full_size"]  # and at full size, on one GPU, with and without adversarial training
    assert f"at full size ({full['run']}, one GPU)" in out and full["run"] == "results/battery-gpu"
    assert f"{full['fraction']:.2f} kept, {full['fraction_without_adv']:.2f} without adversarial training" in out
    key = tmp_path / "pub.key"
    assert f"new key, written to {key}" in out and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (pub / "sealed").is_dir() and not list(pub.rglob("*.key"))  # the key never lies in the published set
    assert main(["unseal", str(pub), "--key", str(key), "--out", str(tmp_path / "orig")]) == 0
    source = load_dataset("digits", "train", per_class=5)
    restored = load_dataset(str(tmp_path / "orig"))
    assert np.array_equal(restored.images, source.images) and np.array_equal(restored.labels, source.labels)
    assert not np.array_equal(read_published(pub).data.images, source.images)  # what was published is perturbed
    # a rerun keeps the key file (never overwritten) and says so
    before = key.read_bytes()
    rc, out = _protect(["--out", str(pub), "--overwrite"])
    assert rc == 0 and f"existing key {key}" in out and key.read_bytes() == before


def test_an_explicit_key_is_used_and_no_key_file_is_made(tmp_path):
    key = tmp_path / "mine.key"
    assert main(["keygen", str(key)]) == 0
    rc, out = _protect(["--out", str(tmp_path / "pub"), "--seal", str(key)])
    assert rc == 0 and "new key" not in out and not (tmp_path / "pub.key").exists()
    assert main(["unseal", str(tmp_path / "pub"), "--key", str(key), "--out", str(tmp_path / "orig")]) == 0


def test_other_methods_are_not_sealed_unasked(tmp_path):
    rc, out = _protect(["--method", "random", "--out", str(tmp_path / "pub")])
    assert rc == 0 and not (tmp_path / "pub" / "sealed").exists() and not (tmp_path / "pub.key").exists()
    assert "attack battery" not in out


def test_the_standing_module_is_written_from_the_records():
    """src/uge/standing.py holds what scripts/readme_results.py computes from the committed records."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "src" / "uge" / "standing.py").read_text() == mod.standing()


def test_a_failed_default_protection_leaves_no_key_behind(tmp_path, capsys):
    data = _rgb(64, per_class=1, size=8)
    np.savez(tmp_path / "many.npz", images=data.images, labels=data.labels, classes=np.array(data.classes))
    rc = main(["protect", "--data", str(tmp_path / "many.npz"), "--out", str(tmp_path / "pub"), "--device", "cpu",
               "--param", "mix=false"])
    assert rc == 2 and "at most 63 classes" in capsys.readouterr().err
    assert not (tmp_path / "pub.key").exists() and not (tmp_path / "pub").exists()


def _explained(pub: Path, seed: int) -> float:
    """The hacker who reads the manifest: draw the method's code again from ``seed`` (on grey images of the
    published labels, unmatched) and measure how much of the published perturbation it is (1: all of it)."""
    import json

    manifest = json.loads((pub / "manifest.json").read_text())
    published = read_published(pub).data
    grey = ImageDataset(np.full_like(published.images, 128), published.labels, published.classes)
    params = {**manifest["params"], "matched": False}
    code = build_protector(manifest["method"], **params).protect(grey, progress=False, seed=seed)
    code = code.protected.images.astype(float) - 128
    source = load_dataset("digits", "train", per_class=5)
    delta = published.images.astype(float) - source.images
    return float((delta * code).sum() / (delta ** 2).sum())


def test_a_sealed_sets_seed_comes_from_the_key_and_is_not_published(tmp_path):
    """A published seed gives the code away: anyone draws it again and subtracts it. Sealed without --seed, the
    seed is the key's (uge.sealing.key_seed), and the manifest says only that."""
    from uge.sealing import key_seed, load_key
    from uge.seeds import SECRET

    import json

    assert _protect(["--out", str(tmp_path / "open"), "--seed", "0"])[0] == 0  # a seed given is published
    assert json.loads((tmp_path / "open" / "manifest.json").read_text())["seeds"]["seed"] == 0
    assert _explained(tmp_path / "open", 0) > 0.9  # ... and the code is drawn again from it
    rc, out = _protect(["--out", str(tmp_path / "pub")])
    assert rc == 0 and "seed derived from the key (secret, not in the manifest)" in out
    seeds = json.loads((tmp_path / "pub" / "manifest.json").read_text())["seeds"]
    assert seeds == {"seed": SECRET, "version": seeds["version"]}
    assert abs(_explained(tmp_path / "pub", 0)) < 0.2  # the default seed draws another code
    assert _explained(tmp_path / "pub", key_seed(load_key(tmp_path / "pub.key"))) > 0.9  # the key's draws this one


def test_a_failed_run_removes_the_key_it_made_but_never_one_it_found(tmp_path, monkeypatch):
    import uge.published

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(uge.published, "publish", broken)
    with pytest.raises(OSError):
        main(["protect", "--data", "digits", "--per-class", "2", "--out", str(tmp_path / "pub"), "--device", "cpu"])
    assert not (tmp_path / "pub.key").exists()
    assert main(["keygen", str(tmp_path / "pub.key")]) == 0
    with pytest.raises(OSError):
        main(["protect", "--data", "digits", "--per-class", "2", "--out", str(tmp_path / "pub"), "--device", "cpu"])
    assert (tmp_path / "pub.key").exists()


@pytest.mark.parametrize("method, distinct", [("grating", False), ("jpeg-patch", True)])
def test_distinct_is_refused_where_a_mix_would_ignore_it(method, distinct):
    with pytest.raises(ConfigError, match="distinct=.* does nothing with mix"):
        build_protector(method, mix=True, distinct=distinct)
    build_protector(method, mix=False, distinct=distinct)  # where it means something
