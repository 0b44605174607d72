"""Keyed protection (issue 11): a blind authorized network, a perturbation inside the subspace it cannot see.

Each test can fail: the authorized input stage must map the *saved* 8-bit files to the originals' output,
training must leave the input stage bit-identical, δ must lie in S, and a standard network must see δ.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_dataset

from uge.benchmark import parse_config, run_benchmark, write_report
from uge.countermeasures import adapt_model, parse_countermeasures
from uge.data import ImageDataset
from uge.data.loaders import save_npz
from uge.errors import ConfigError
from uge.models import create_model
from uge.protectors import build_protector
from uge.protectors.keyed import keyed_levels, tiled_patterns
from uge.published import input_stage_difference, publish, read_published, verify
from uge.training import Recipe, train


def _x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def rgb():
    """Synthetic RGB images with saturated pixels (0 and 255), so that the clipping inside S is exercised."""
    d = random_dataset(n=60, size=16, channels=3, num_classes=4, seed=3)
    images = d.images.copy()
    images[:, :4] = 0
    images[:, 4:8] = 255
    images[:, 8:] = 20 + (images[:, 8:].astype(np.int64) * 215 // 255)  # room for δ in every channel
    return ImageDataset(images, d.labels, d.classes)


@pytest.fixture(scope="module")
def published(rgb, tmp_path_factory):
    prot = build_protector("keyed", arch="cnn", size=4, block=2, recipe={"epochs": 1, "batch_size": 16, "lr": 0.05})
    out = tmp_path_factory.mktemp("keyed") / "set"
    publish(prot.protect(rgb, seed=0), rgb, out, formats=("npz", "png"))
    return prot, out


def test_authorized_input_stage_maps_saved_files_to_the_originals(rgb, published):
    _, out = published
    pub = read_published(out, prefer="png")  # the saved 8-bit files
    net = pub.authorized_network(0).eval()
    assert net.blind is not None and pub.manifest["authorized"][0]["arch"] == "blind-cnn"
    assert input_stage_difference(net, pub.data.images, rgb.images) <= 0.5 / 255
    with torch.no_grad():
        same = (net(_x(pub.data.images)) - net(_x(rgb.images))).abs().max()
        standard = create_model("cnn", 4, 3, seed=0).eval()
        seen = (standard(_x(pub.data.images)) - standard(_x(rgb.images))).abs().max()
    assert same < 1e-4 < seen  # the blind network sees the clean image, the standard one does not
    report = verify(out, rgb)
    assert report.ok and any(c.name == "input stage 0" for c in report.checks)


def test_verify_fails_when_the_perturbation_leaves_S(rgb, published, tmp_path):
    prot, _ = published
    result = prot.protect(rgb, seed=0)
    images = result.protected.images.copy()
    images[0, 10, 10, 0] = np.clip(int(rgb.images[0, 10, 10, 0]) + 5 * (1 if rgb.images[0, 10, 10, 0] < 128 else -1), 0, 255)
    images[0, 10, 10, 1:] = rgb.images[0, 10, 10, 1:]  # a δ with a component outside S
    result.protected = ImageDataset(images, rgb.labels, rgb.classes)
    publish(result, rgb, tmp_path / "bad")
    report = verify(tmp_path / "bad", rgb)
    assert not report.ok and [c.name for c in report.checks if not c.passed] == ["input stage 0"]


def test_delta_lies_in_S_within_budget_and_pixel_range(rgb, published):
    prot, out = published
    delta = read_published(out).data.images.astype(np.int64) - rgb.images.astype(np.int64)
    c = np.array(prot.direction)
    assert np.abs(np.cross(delta, c)).max() == 0  # every pixel's δ is a multiple of c
    assert np.abs(delta).max() <= int(255 * prot.rho + 1e-9) and np.abs(delta).max() == 2 * prot.max_step
    m = delta @ c // (c @ c)
    assert (m[:, :4] >= 0).all() and (m[:, 4:8] <= 0).all() and (m[:, :4] < 0).sum() == 0  # clipped, not wrapped
    assert (np.abs(m[:, 8:]) == prot.max_step).all()  # unsaturated pixels get the full amplitude


def test_pattern_is_classwise_and_tiled():
    p = tiled_patterns(3, 16, 16, size=4, block=2, seed=0)
    assert p.shape == (3, 16, 16) and set(np.unique(p)) == {-1, 1}
    assert (p[:, :4, :4] == p[:, 4:8, 8:12]).all()  # period 4
    assert (p[:, 0:2, 0:2] == p[:, 0:1, 0:1]).all()  # 2x2 cells
    assert not (p[0] == p[1]).all()
    m = keyed_levels(np.full((2, 16, 16, 3), 128, np.uint8), 5 * p[[0, 2]], [1, -2, 1])
    assert (m == 5 * p[[0, 2]]).all()


def test_training_keeps_the_input_stage_bit_identical(rgb):
    net = create_model("blind-cnn", 4, 3, seed=0)
    theta0 = copy.deepcopy(net.state_dict())
    train(net, rgb, Recipe(epochs=1, batch_size=16, lr=0.05), device="cpu", progress=False)
    after = net.state_dict()
    assert torch.equal(after["blind"], theta0["blind"])
    assert any(not torch.equal(after[k], theta0[k]) for k in theta0 if k != "blind")  # the rest did train


def test_blind_network_has_the_standard_weights_and_refuses_gray_images():
    a, b = create_model("cnn", 4, 3, seed=5).state_dict(), create_model("blind-cnn", 4, 3, seed=5).state_dict()
    assert set(b) - set(a) == {"blind"} and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="RGB"):
        create_model("blind-cnn", 4, 1)


@pytest.mark.parametrize("params, message", [
    ({"direction": [0, 0, 0]}, "direction"), ({"direction": [1, 2]}, "direction"),
    ({"direction": [20, 1, 1]}, "direction"), ({"block": 3}, "block"), ({"arch": "alexnet"}, "arch"),
    ({"arch": "blind-cnn"}, "arch"), ({"recipe": {"epochs": 0}}, "recipe"), ({"rho": 2.0}, "rho"),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_protector("keyed", **params)
    assert "\n" not in str(e.value)


def test_gray_data_is_refused():
    with pytest.raises(ConfigError, match="RGB"):
        build_protector("keyed").protect(random_dataset(channels=1))


def test_copy_input_gives_the_hacker_the_authorized_input_stage():
    (cm,) = parse_countermeasures("copy-input")
    blind = create_model("blind-cnn", 4, 3, seed=0).make_blind([2, -1, -1])
    hacker = adapt_model([cm], create_model("lenet", 4, 3, seed=1), [blind])
    assert torch.equal(hacker.blind, blind.blind)
    plain = adapt_model([cm], create_model("lenet", 4, 3, seed=1), [create_model("cnn", 4, 3)])
    assert plain.blind is None  # nothing to copy from a standard authorized network


def test_theta0_published_apart(rgb, published, tmp_path):
    prot, _ = published
    publish(prot.protect(rgb, seed=0), rgb, tmp_path / "set", theta0_apart=tmp_path / "keys")
    pub = read_published(tmp_path / "set")
    a = pub.manifest["authorized"][0]
    key = tmp_path / "keys" / "set-theta0_0.safetensors"
    assert a["theta0"] is None and not (tmp_path / "set" / "authorized").exists() and key.exists()
    with pytest.raises(ConfigError, match="published apart"):
        pub.authorized_network(0)
    assert torch.equal(pub.authorized_network(0, key).blind, prot.authorized_network(rgb).blind)
    other = tmp_path / "other.safetensors"
    from uge.weights import save_weights

    save_weights(other, create_model("blind-cnn", 4, 3, seed=9).state_dict())
    with pytest.raises(ConfigError, match="SHA-256"):
        pub.authorized_network(0, other)
    assert verify(tmp_path / "set", rgb).ok  # not checked without the file
    report = verify(tmp_path / "set", rgb, theta0=[key])
    assert report.ok and any(c.name == "input stage 0" for c in report.checks)
    assert not verify(tmp_path / "set", rgb, theta0=[other]).ok


def test_bench_evaluates_the_published_blind_network(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        labels = np.repeat(np.arange(4), n)
        images = rng.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8)
        save_npz(ImageDataset(images, labels, ["a", "b", "c", "d"]), tmp_path / f"{split}.npz")
    d = {"name": "keyed-tiny", "device": "cpu",
         "data": {"source": str(tmp_path / "train.npz"), "test_source": str(tmp_path / "test.npz")},
         "recipe": {"epochs": 1, "batch_size": 16, "lr": 0.05},
         "protect": {"authorized": ["lenet:0"], "trajectory_epochs": 1},
         "evaluate": {"hackers": ["lenet:normal:1"], "authorized_seeds": [3]},
         "variant": [{"name": "Clean", "protector": "clean"},
                     {"name": "Clean (blind)", "protector": "clean", "authorized": ["blind-lenet:0"], "hackers": []},
                     {"name": "Keyed", "protector": "keyed", "arch": "lenet", "size": 4, "block": 2}]}
    records = run_benchmark(parse_config(d), tmp_path / "run", progress=False)
    keyed = [r for r in records if r["variant"] == "Keyed"]
    assert {r["arch"] for r in keyed if r["role"] == "authorized"} == {"blind-lenet"}
    assert [r["role"] for r in records if r["variant"] == "Clean (blind)"] == ["authorized", "authorized"]
    pub = read_published(tmp_path / "run" / "variants" / "keyed" / "published")
    assert pub.recipe.epochs == 1  # the bench's recipe is the published one
    report = (write_report(tmp_path / "run") / "report.md").read_text()
    assert "vs standard arch" in report
    row = next(line for line in report.splitlines() if line.startswith("| Keyed | normal |"))
    assert "(" in row.split("|")[3]  # the published blind θ0 is compared with the clean blind network


def test_teacher_encoding_carries_the_reference_logits_linearly(tmp_path):
    from uge.protectors.keyed import hadamard_codes
    from uge.training import predict
    from uge.weights import save_weights

    d = random_dataset(n=60, size=16, channels=3, num_classes=4, seed=5)
    data = ImageDataset((20 + d.images.astype(np.int64) * 215 // 255).astype(np.uint8), d.labels, d.classes)
    ref = create_model("blind-cnn", 4, 3, seed=4)
    save_weights(tmp_path / "ref.safetensors", ref.state_dict())
    prot = build_protector("keyed", arch="cnn", size=16, block=4, encode="teacher",
                           reference=str(tmp_path / "ref.safetensors"))
    delta = prot.protect(data, seed=0).protected.images.astype(np.int64) - data.images.astype(np.int64)
    c = np.array(prot.direction)
    assert np.abs(np.cross(delta, c)).max() == 0 and np.abs(delta).max() <= 10  # still in S, within budget
    m = delta @ c // (c @ c)
    cells = m.reshape(len(m), 4, 4, 4, 4)[:, :, 0, :, 0].reshape(len(m), -1)  # one value per 4-px cell
    assert (m.reshape(len(m), 4, 4, 4, 4) == cells.reshape(len(m), 4, 1, 4, 1)).all()  # constant cells
    z = cells @ hadamard_codes(4, 16).T  # decode the code weights
    logits = predict(ref, torch.from_numpy(data.images).permute(0, 3, 1, 2)).numpy()
    t = logits - logits.mean(1, keepdims=True)
    target = t / t.std() + np.eye(4)[data.labels]
    assert np.corrcoef(z.ravel(), target.ravel())[0, 1] > 0.95


def test_hadamard_codes_are_orthogonal_and_need_enough_cells():
    from uge.protectors.keyed import hadamard_codes

    h = hadamard_codes(10, 16)
    assert (h @ h.T == 16 * np.eye(10)).all() and (h.sum(1) == 0).all()  # no uniform shift
    with pytest.raises(ConfigError, match="power-of-two"):
        hadamard_codes(10, 9)
