"""Publishing a protected set, reading it back, and verifying it (hashes, budget, labels, originals).

The Protection objects here are built by hand (original + a random perturbation of exactly the budget's
size in places), so these tests do not depend on a protect run and know exactly what must be on disk.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_dataset, rehash, tiny_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from uge.config import AuthorizedSpec
from uge.data import ImageDataset
from uge.errors import ConfigError, DataError, VerificationError
from uge.models import create_model
from uge.published import Published, publish, read_manifest, read_published, verify
from uge.result import Protection
from uge.utils import sha256_file

publish_mod = importlib.import_module("uge.published")
RHO = 0.04  # 10 levels (255 * 0.04 = 10.2)
LEVELS = 10


def make_protection(original: ImageDataset, rho=RHO, seeds=(0,), arch="cnn", seed=0) -> Protection:
    """``original`` + a random perturbation in [-levels, levels], with many pixels exactly at ±levels."""
    levels = math.floor(255 * rho + 1e-9)
    rng = np.random.default_rng(seed)
    delta = rng.choice([-levels, -1, 0, 1, levels], size=original.images.shape)
    prot = np.clip(original.images.astype(np.int16) + delta, 0, 255).astype(np.uint8)
    cfg = tiny_config(rho=rho, authorized=[AuthorizedSpec(arch, s) for s in seeds])
    theta0 = [create_model(arch, original.num_classes, original.channels, seed=s).state_dict() for s in seeds]
    params = cfg.to_dict()
    params.pop("seed")
    return Protection(ImageDataset(prot, original.labels.copy(), original.classes), "uge", params, rho, seed=0,
                      authorized=list(cfg.authorized), theta0=theta0, recipe=cfg.recipe, feature_space="encoder:test",
                      history=[{"epoch": 1, "fd": 0.25, "total": 0.25}], seconds={"generator": 1.5})


def _levels(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _check(report, name):
    matches = [c for c in report.checks if c.name == name]
    assert matches, f"no check named {name!r} in {[c.name for c in report.checks]}"
    return matches[0]


def _failed(report) -> set[str]:
    return {c.name for c in report.checks if not c.passed}


@pytest.fixture(scope="module")
def gray(digits_small):
    return digits_small, make_protection(digits_small)


@pytest.fixture(scope="module")
def published(gray, tmp_path_factory) -> Path:
    """A read-only published set in both formats (copy it before tampering)."""
    original, result = gray
    out = tmp_path_factory.mktemp("pub") / "set"
    return publish(result, original, out, formats=("npz", "png"), source={"data": "digits", "split": "train"})


@pytest.fixture
def scratch(published, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(published, dst)
    return dst


# ------------------------------------------------------------------------------ layout, read


def test_published_layout_and_manifest(published, gray):
    original, result = gray
    files = {str(p.relative_to(published)) for p in published.rglob("*") if p.is_file()}
    pngs = {f for f in files if f.startswith("images/")}
    assert len(pngs) == len(original)
    assert files - pngs == {"manifest.json", "checksums.sha256", "data.npz", "authorized/theta0_0.safetensors"}
    m = read_manifest(published)
    assert m["num_samples"] == len(original) and m["image_shape"] == [8, 8, 1]
    assert m["classes"] == original.classes and m["formats"] == ["npz", "png"]
    assert m["rho"] == RHO and m["rho_levels"] == LEVELS
    assert m["source"] == {"data": "digits", "split": "train"}
    assert m["history"] == result.history and m["feature_space"] == "encoder:test"
    assert m["authorized"] == [{"arch": "cnn", "seed": 0, "theta0": "authorized/theta0_0.safetensors",
                                "theta0_sha256": sha256_file(published / "authorized/theta0_0.safetensors"),
                                "num_classes": 10, "in_channels": 1}]
    assert m["params"] == result.params and "config" not in m  # the parameters once
    assert m["seeds"]["seed"] == 0 and m["seeds"]["streams"]["encoder"] == 10_000
    listed = [line.split("  ", 1)[1] for line in (published / "checksums.sha256").read_text().splitlines()]
    assert sorted(listed) == sorted(files - {"checksums.sha256"})  # the manifest is covered too


def test_read_published_npz_and_png_are_identical_to_the_protection(published, gray):
    _, result = gray
    npz = read_published(published, prefer="npz").data
    png = read_published(published, prefer="png").data
    for d in (npz, png):
        assert d.images.dtype == np.uint8
        assert np.array_equal(d.images, result.protected.images)
        assert np.array_equal(d.labels, result.protected.labels)
        assert d.classes == result.protected.classes


def test_saved_png_files_hold_the_protected_pixels_within_budget(published, gray):
    original, result = gray
    for i, (img, y) in enumerate(zip(original.images, original.labels)):
        f = published / "images" / original.classes[y] / f"{i:06d}.png"
        with Image.open(f) as im:
            assert im.mode == "L"
            saved = np.asarray(im)[..., None]
        assert np.array_equal(saved, result.protected.images[i])
        assert _levels(saved, img) <= LEVELS
    assert _levels(result.protected.images, original.images) == LEVELS  # the budget is used, not exceeded


def test_saved_npz_file_holds_the_protected_pixels(published, gray):
    original, result = gray
    with np.load(published / "data.npz", allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8
        assert np.array_equal(z["images"], result.protected.images)
        assert _levels(z["images"], original.images) <= LEVELS


def test_theta0_round_trips_bit_exactly(published):
    ref = create_model("cnn", 10, 1, seed=0).state_dict()
    saved = load_file(published / "authorized/theta0_0.safetensors")
    assert saved.keys() == ref.keys()
    assert all(torch.equal(saved[k], ref[k]) for k in ref)
    with safe_open(str(published / "authorized/theta0_0.safetensors"), "pt") as f:
        assert f.metadata() == {"arch": "cnn"}
    pub = read_published(published)
    assert isinstance(pub, Published)
    net = pub.authorized_network()
    assert all(torch.equal(net.state_dict()[k], ref[k]) for k in ref)
    assert not all(torch.equal(create_model("cnn", 10, 1, seed=1).state_dict()[k], ref[k]) for k in ref)


def test_published_recipe_is_the_authorized_recipe(published, gray):
    assert read_published(published).recipe == gray[1].recipe


def test_rgb_set_round_trips_through_png(tmp_path):
    original = random_dataset(n=12, size=9, channels=3, num_classes=3, seed=4)
    result = make_protection(original, arch="lenet", rho=3 / 255)
    out = publish(result, original, tmp_path / "rgb", formats=("png",))
    assert not (out / "data.npz").exists()
    with Image.open(next((out / "images").rglob("*.png"))) as im:
        assert im.mode == "RGB"
    back = read_published(out)  # prefers npz, falls back to the PNG tree
    assert np.array_equal(back.data.images, result.protected.images)
    assert np.array_equal(back.data.labels, original.labels)
    report = verify(out, original)
    assert report.ok, _failed(report)
    assert report.linf == pytest.approx(3 / 255)


def test_npz_only_set_reads_and_verifies(tmp_path, gray):
    original, result = gray
    out = publish(result, original, tmp_path / "npz", formats=("npz",))
    assert not (out / "images").exists()
    assert np.array_equal(read_published(out, prefer="png").data.images, result.protected.images)
    assert verify(out, original).ok


@pytest.mark.parametrize("formats", [(), ("jpeg",), ("npz", "tiff")])
def test_publish_rejects_unknown_formats(tmp_path, gray, formats):
    with pytest.raises(ConfigError, match="formats"):
        publish(gray[1], gray[0], tmp_path / "x", formats=formats)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------- verify: pass


def test_verify_passes_an_untouched_set_with_its_originals(published, gray):
    original, _ = gray
    report = verify(published, original)
    assert report.ok, [(c.name, c.detail) for c in report.checks if not c.passed]
    names = {c.name for c in report.checks}
    assert {"manifest", "file hashes", "no extra files", "npz = png", "labels", "originals",
            "labels unchanged", "budget", "θ0 authorized/theta0_0.safetensors"} <= names
    assert report.linf == pytest.approx(LEVELS / 255)
    report.raise_if_failed()  # does not raise


def test_verify_without_originals_checks_hashes_only(published):
    report = verify(published)
    assert report.ok and report.linf is None
    assert "not checked" in _check(report, "budget").detail
    assert "originals" not in {c.name for c in report.checks}


# ------------------------------------------------------------------------------- verify: fail


def test_verify_fails_when_one_png_pixel_changes(scratch, gray):
    original, _ = gray
    f = scratch / "images" / original.classes[original.labels[7]] / "000007.png"
    with Image.open(f) as im:
        px = np.asarray(im).copy()
    px[3, 4] ^= 1  # one level, well inside the budget: only the hashes can tell
    Image.fromarray(px).save(f)
    report = verify(scratch, original)
    assert not report.ok
    assert _failed(report) == {"file hashes"}
    assert "000007.png" in _check(report, "file hashes").detail
    with pytest.raises(VerificationError, match="file hashes"):
        report.raise_if_failed()


def test_verify_fails_when_data_npz_is_replaced(scratch, gray):
    original, result = gray
    images = result.protected.images.copy()
    images[0, 0, 0, 0] ^= 1
    np.savez(scratch / "data.npz", images=images, labels=result.protected.labels,
             classes=np.array(result.protected.classes))
    report = verify(scratch, original)
    assert "file hashes" in _failed(report) and not report.ok
    assert "data.npz" in _check(report, "file hashes").detail


def test_verify_fails_when_a_file_is_missing(scratch, gray):
    (scratch / "authorized/theta0_0.safetensors").unlink()
    report = verify(scratch, gray[0])
    assert "file hashes" in _failed(report)


def test_verify_fails_when_the_manifest_is_edited(scratch, gray):
    """A larger budget typed into the manifest fails the file hashes (format 2 lists the manifest)."""
    f = scratch / "manifest.json"
    m = json.loads(f.read_text())
    m["rho"], m["rho_levels"] = 0.1, 25
    f.write_text(json.dumps(m))
    report = verify(scratch, gray[0])
    assert _failed(report) == {"file hashes"}
    assert "manifest.json" in _check(report, "file hashes").detail


def test_verify_fails_when_checksums_no_longer_cover_the_manifest(scratch, gray):
    sums = scratch / "checksums.sha256"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "manifest.json" not in line))
    assert _failed(verify(scratch, gray[0])) == {"manifest"}


def test_verify_with_the_expected_budget_catches_a_rehashed_larger_budget(tmp_path, gray):
    """A careful forger rehashes everything; the user's own ρ still catches the larger budget."""
    original, result = gray
    out = publish(result, original, tmp_path / "forged", formats=("npz",))
    images = result.protected.images.copy()
    images[5, 2, 2, 0] = np.clip(int(original.images[5, 2, 2, 0]) + (20 if original.images[5, 2, 2, 0] < 128
                                                                       else -20), 0, 255)
    np.savez(out / "data.npz", images=images, labels=result.protected.labels,
             classes=np.array(result.protected.classes))
    f = out / "manifest.json"
    m = json.loads(f.read_text())
    m["rho"], m["rho_levels"] = 0.1, 25
    f.write_text(json.dumps(m))
    rehash(out)
    assert verify(out, original).ok  # consistent with its own (edited) manifest
    report = verify(out, original, rho=RHO)
    assert _failed(report) == {"stated budget", "budget"}
    assert "25 levels" in _check(report, "stated budget").detail
    honest = publish(result, original, tmp_path / "honest", formats=("npz",))
    assert verify(honest, original, rho=RHO).ok


def test_a_format_1_set_still_verifies(scratch, gray):
    """Sets written before the manifest was covered: the old pin of the checksums file is checked."""
    f = scratch / "manifest.json"
    m = json.loads(f.read_text())
    sums = scratch / "checksums.sha256"
    kept = "".join(line + "\n" for line in sums.read_text().splitlines() if "manifest.json" not in line)
    sums.write_text(kept)
    m["format_version"], m["checksums_sha256"] = 1, hashlib.sha256(kept.encode()).hexdigest()
    f.write_text(json.dumps(m))
    report = verify(scratch, gray[0])
    assert report.ok and "checksums file" in {c.name for c in report.checks}
    sums.write_text(kept + "\n")
    assert "checksums file" in _failed(verify(scratch, gray[0]))


def test_verify_fails_on_an_extra_file(scratch, gray):
    (scratch / "notes.txt").write_text("not part of the set")
    report = verify(scratch, gray[0])
    assert _failed(report) == {"no extra files"}
    assert "notes.txt" in _check(report, "no extra files").detail


@pytest.mark.parametrize("name", ["extra.png", "999999.png"])
def test_verify_reports_an_extra_png_in_the_image_tree(scratch, gray, name):
    shutil.copy(next((scratch / "images" / "0").glob("*.png")), scratch / "images" / "0" / name)
    report = verify(scratch, gray[0])
    assert "no extra files" in _failed(report)


def test_verify_fails_when_the_originals_labels_differ(published, gray):
    original, _ = gray
    labels = original.labels.copy()
    labels[[0, 1]] = labels[[1, 0]] if labels[0] != labels[1] else (labels[[0, 1]] + 1) % 10
    report = verify(published, ImageDataset(original.images, labels, original.classes))
    assert _failed(report) == {"labels unchanged"}


def test_verify_fails_when_originals_are_perturbed_beyond_rho(published, gray):
    original, result = gray
    images = original.images.copy()
    # a pixel where the published value is >= the original: +20 there puts it > 10 levels away
    i, y, x, c = np.argwhere(result.protected.images.astype(int) - images.astype(int) >= 0)[0]
    images[i, y, x, c] = min(255, int(result.protected.images[i, y, x, c]) + 20)
    report = verify(published, ImageDataset(images, original.labels, original.classes))
    assert {"budget", "originals"} <= _failed(report)
    assert "labels unchanged" not in _failed(report)
    assert report.linf > RHO


def test_verify_budget_check_catches_a_rehashed_forgery(tmp_path, gray):
    """Hashes only pin the files; the budget against the originals is an independent check."""
    original, result = gray
    out = publish(result, original, tmp_path / "forged", formats=("npz",))
    images = result.protected.images.copy()
    images[5, 2, 2, 0] = 255 if original.images[5, 2, 2, 0] < 128 else 0  # far beyond 10 levels
    np.savez(out / "data.npz", images=images, labels=result.protected.labels,
             classes=np.array(result.protected.classes))
    rehash(out)
    report = verify(out, original)
    assert _failed(report) == {"budget"}
    assert report.linf > 0.4


def test_verify_fails_on_originals_of_another_shape(published, gray):
    original, _ = gray
    report = verify(published, original.subset(range(50)))
    assert _failed(report) == {"originals"}


# ----------------------------------------------------------------------- atomic, overwrite


def test_publish_is_atomic_when_writing_fails_midway(tmp_path, gray, monkeypatch):
    original, result = gray
    seen = {}

    def fail(path, *a, **kw):
        seen["npz_written"] = (Path(path).parents[1] / "data.npz").is_file()
        raise RuntimeError("disk full")

    monkeypatch.setattr(publish_mod, "save_weights", fail)  # runs after data.npz and the PNGs are written
    with pytest.raises(RuntimeError, match="disk full"):
        publish(result, original, tmp_path / "out", formats=("npz", "png"))
    assert seen == {"npz_written": True}
    assert list(tmp_path.iterdir()) == []  # neither "out" nor a ".out.tmp-*" folder


def test_failed_overwrite_keeps_the_old_set(scratch, gray, monkeypatch):
    original = gray[0]
    before = (scratch / "manifest.json").read_text()
    monkeypatch.setattr(publish_mod, "save_weights", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        publish(make_protection(original, seed=1), original, scratch, overwrite=True)
    assert (scratch / "manifest.json").read_text() == before
    assert sorted(p.name for p in scratch.parent.iterdir()) == ["copy"]
    assert verify(scratch, original).ok


def test_publish_to_an_existing_folder_needs_overwrite(scratch, gray):
    original, _ = gray
    before = (scratch / "manifest.json").read_text()
    with pytest.raises(ConfigError, match="already exists"):
        publish(make_protection(original, seed=1), original, scratch)
    assert (scratch / "manifest.json").read_text() == before

    other = make_protection(original, seed=1)
    publish(other, original, scratch, formats=("npz",), overwrite=True)
    assert sorted(p.name for p in scratch.parent.iterdir()) == ["copy"]  # no .old-* or .tmp-* left
    assert not (scratch / "images").exists()  # the old PNG tree is gone, not merged
    assert np.array_equal(read_published(scratch).data.images, other.protected.images)
    assert verify(scratch, original).ok


# ----------------------------------------------------------------------------- read errors


def test_read_published_without_manifest_is_a_data_error(scratch, tmp_path):
    (scratch / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json is missing"):
        read_published(scratch)
    with pytest.raises(DataError, match="not found"):
        read_published(tmp_path / "nowhere")


@pytest.mark.parametrize("edit, match", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: json.dumps({**m, "format": "something-else"}), "not a uge"),
    (lambda m: json.dumps({**m, "format_version": 99}), "newer"),
])
def test_read_published_rejects_bad_manifests(scratch, edit, match):
    f = scratch / "manifest.json"
    f.write_text(edit(json.loads(f.read_text())))
    with pytest.raises(DataError, match=match):
        read_published(scratch)


def test_read_published_missing_png_is_a_data_error(tmp_path, gray):
    original, result = gray
    out = publish(result, original, tmp_path / "p", formats=("png",))
    next((out / "images").rglob("*.png")).unlink()
    with pytest.raises(DataError, match="missing"):
        read_published(out)


@pytest.mark.parametrize("over", [0, 1])
def test_verify_budget_is_pinned_at_its_boundary(tmp_path, gray, over):
    """Exactly ρ (10 levels) passes; one level more, on one pixel, fails (a check that allowed one level more
    would pass every other test here)."""
    original, result = gray
    out = publish(result, original, tmp_path / "edge", formats=("npz",))
    images = result.protected.images.copy()
    i, y, x, c = np.argwhere(original.images < 200)[0]
    images[i, y, x, c] = original.images[i, y, x, c] + LEVELS + over
    np.savez(out / "data.npz", images=images, labels=result.protected.labels,
             classes=np.array(result.protected.classes))
    rehash(out)
    report = verify(out, original)
    assert _check(report, "budget").passed == (over == 0)
    assert report.linf == pytest.approx((LEVELS + over) / 255)
    assert verify(out, original, rho=RHO).ok == (over == 0)  # the user's own ρ: the same boundary
