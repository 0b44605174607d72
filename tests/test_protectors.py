"""The protector registry: one contract for UGE and every baseline (budget on the saved files, uint8, shapes,
labels, determinism, parameter validation), plus one cheap behavioural check per method.

Every protector runs with tiny parameters on 100 8x8 digits, about a second or less on a CPU.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RECIPE, random_dataset, rehash

from uge.data import ImageDataset
from uge.errors import ConfigError
from uge.models import create_model
from uge.protectors import Protector, build_protector, list_protectors, protector_class
from uge.pgd import cell_means, pgd, uniform_start
from uge.published import publish, read_published, verify
from uge.result import Protection
from uge.similarity import PSNR_CAP, psnr, similarity, ssim
from uge.training import Recipe, predict, train
from uge.weights import load_into, save_weights

UGE_TINY = {"authorized": ["cnn:0"], "recipe": TINY_RECIPE, "trajectory_epochs": 2, "generator_epochs": 1,
            "generator_width": 4, "generator_batch_size": 32, "encoder_arch": "lenet",
            "encoder_recipe": {"epochs": 1, "batch_size": 32, "flip": False}}
TINY = {  # parameters that make every protector run in well under a second on 100 digits
    "uge": UGE_TINY,
    "fd": UGE_TINY,
    "random": {},
    "patch": {"size": 4},
    "jpeg-patch": {"size": 8},
    "smooth": {"size": 8},
    "grating": {},
    "em": {"arch": "lenet", "train_steps": 2, "pgd_steps": 2, "max_rounds": 2, "batch_size": 32},
    "rem": {"arch": "lenet", "train_steps": 2, "pgd_steps": 2, "max_rounds": 2, "batch_size": 32, "adv_steps": 2},
    "tap": {"arch": "lenet", "epochs": 1, "steps": 3, "batch_size": 32},
    "cuda": {},
    "keyed": {"arch": "lenet", "size": 8, "block": 2, "recipe": {"epochs": 1}},
    "ntga": {"block_size": 32, "held_out": 64, "steps": 3},
}
# A wrong type and an out-of-range value for each protector (the parameter named must be in the message).
BAD = {
    "uge": [("generator_epochs", "3"), ("rho", 2.0)],
    "fd": [("generator_epochs", 1.5), ("rho", 0.0)],
    "random": [("rho", "8/255"), ("rho", 0.0)],
    "patch": [("size", 2.0), ("block", 3)],
    "jpeg-patch": [("size", 12), ("freqs", ["8,0"])],
    "smooth": [("fmax", 1.5), ("fmax", 0)],
    "grating": [("matched", "yes"), ("size", 16)],
    "em": [("pgd_steps", 2.0), ("stop_acc", 120.0), ("arch", "resnet1000")],
    "rem": [("adv_steps", True), ("adv_rho", -0.1)],
    "tap": [("augment", "yes"), ("steps", 0)],
    "cuda": [("kernel_size", "3"), ("kernel_size", 4)],
    "keyed": [("size", "8"), ("block", 3)],
    "ntga": [("block_size", 32.0), ("kernel", "ntk")],
}
RGB = {"keyed"}  # protectors that need colour images: they run on 16×16 RGB images instead of digits


def _data(name, digits_small):
    return random_dataset(n=40, size=16, channels=3, num_classes=4, seed=0) if name in RGB else digits_small


def test_every_protector_has_tiny_parameters_and_bad_values():
    assert set(TINY) == set(BAD) == set(list_protectors())
    assert {"uge", "fd", "random", "patch", "em", "tap", "rem", "cuda", "keyed", "ntga"} <= set(list_protectors())


@pytest.fixture(scope="module")
def runs(digits_small, tmp_path_factory):
    """name -> (protection, published folder) of every protector, seed 0, both formats."""
    out = {}
    for name in list_protectors():
        data = _data(name, digits_small)
        result = build_protector(name, **TINY[name]).protect(data, device="cpu", progress=False, seed=0)
        folder = publish(result, data, tmp_path_factory.mktemp(name) / "set", formats=("npz", "png"))
        out[name] = (result, folder)
    return out


# ----------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", list_protectors())
def test_protector_attributes(name):
    p = build_protector(name)
    assert isinstance(p, Protector) and p.name == name and protector_class(name) is type(p)
    assert isinstance(p.norm_bounded, bool) and p.title
    if p.norm_bounded:
        assert 1 / 255 <= p.rho < 1
    else:
        assert p.rho is None
    json.dumps(p.params())  # plain values, as config files and manifests hold them


@pytest.mark.parametrize("name", list_protectors())
def test_protection_keeps_shapes_labels_and_dtype(name, runs, digits_small):
    result, _ = runs[name]
    digits_small = _data(name, digits_small)
    assert isinstance(result, Protection) and result.method == name
    prot = result.protected
    assert prot.images.dtype == np.uint8 and prot.images.shape == digits_small.images.shape
    assert np.array_equal(prot.labels, digits_small.labels) and prot.classes == digits_small.classes
    assert not np.array_equal(prot.images, digits_small.images)


@pytest.mark.parametrize("name", list_protectors())
def test_budget_holds_on_the_saved_files_and_verify_passes(name, runs, digits_small):
    result, folder = runs[name]
    digits_small = _data(name, digits_small)
    for fmt in ("npz", "png"):
        saved = read_published(folder, prefer=fmt)
        assert np.array_equal(saved.data.images, result.protected.images)
        assert np.array_equal(saved.data.labels, digits_small.labels)
    levels = int(np.abs(saved.data.images.astype(int) - digits_small.images.astype(int)).max())
    m = saved.manifest
    assert m["method"] == name and m["norm_bounded"] == result.norm_bounded
    assert set(m["similarity"]) == {"psnr", "ssim"}
    report = verify(folder, digits_small)
    assert report.ok, [(c.name, c.detail) for c in report.checks if not c.passed]
    names = {c.name for c in report.checks}
    if result.norm_bounded:
        assert m["rho"] == pytest.approx(result.rho) and m["rho_levels"] == math.floor(255 * result.rho + 1e-9)
        assert levels <= m["rho_levels"] and "budget" in names and "similarity" not in names
    else:
        assert m["rho"] is None and m["rho_levels"] is None
        assert "similarity" in names and "budget" not in names
        assert math.isfinite(report.similarity["psnr"]) and report.similarity == m["similarity"]


@pytest.mark.parametrize("name", list_protectors())
def test_manifest_records_method_params_and_authorized_networks(name, runs):
    result, folder = runs[name]
    m = read_published(folder).manifest
    assert m["params"] == json.loads(json.dumps(result.params))
    if name in ("uge", "fd"):
        assert len(m["authorized"]) == 1 and m["params"]["losses"] == (["fd"] if name == "fd" else ["gm", "fd", "ud"])
    elif name == "keyed":  # a baseline that chooses its authorized network: blind θ0 and the published recipe
        assert [a["arch"] for a in m["authorized"]] == ["blind-lenet"]
        assert read_published(folder).recipe == Recipe(epochs=1)
    else:
        assert m["authorized"] == [] and m["recipe"] is None
        assert read_published(folder).recipe == Recipe()  # evaluation falls back to the default recipe
    assert "config" not in m and "seed" not in m["params"] and m["seeds"]["seed"] == 0


@pytest.mark.parametrize("name", list_protectors())
def test_same_seed_same_output_other_seed_other_output(name, runs, digits_small):
    digits_small = _data(name, digits_small)
    p = build_protector(name, **TINY[name])
    again = p.protect(digits_small, device="cpu", progress=False, seed=0).protected.images
    assert np.array_equal(again, runs[name][0].protected.images)
    other = p.protect(digits_small, device="cpu", progress=False, seed=1).protected.images
    assert not np.array_equal(other, again)


def test_unknown_protector_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown protector 'nope'.*cuda.*em"):
        build_protector("nope")


@pytest.mark.parametrize("name", list_protectors())
def test_unknown_parameter_names_it_and_the_allowed_ones(name):
    with pytest.raises(ConfigError) as e:
        build_protector(name, not_a_param=1)
    msg = str(e.value)
    assert "not_a_param" in msg and "allowed" in msg and "\n" not in msg
    assert all(k in msg for k in list(TINY[name])[:3])


@pytest.mark.parametrize("name, key, value", [(n, k, v) for n, bad in BAD.items() for k, v in bad])
def test_bad_parameter_values_are_config_errors_naming_the_parameter(name, key, value):
    with pytest.raises(ConfigError, match=key) as e:
        build_protector(name, **{key: value})
    assert "\n" not in str(e.value) and name in str(e.value)


def test_fd_pins_its_losses():
    assert build_protector("fd").params()["losses"] == ["fd"]
    assert build_protector("fd").rho == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="losses"):
        build_protector("fd", losses=["gm"])


def test_uge_takes_protect_config_values_and_the_run_seed_from_protect(digits_small, runs):
    p = build_protector("uge", **UGE_TINY)
    assert p.config.authorized[0].arch == "cnn" and "seed" not in p.params()
    with pytest.raises(ConfigError, match="seed"):  # one meaning of seed: protect()'s, as for every method
        build_protector("uge", **{**UGE_TINY, "seed": 3})
    assert runs["uge"][0].seed == 0
    assert p.protect(digits_small, device="cpu", progress=False, seed=2).seed == 2


def test_tap_rejects_a_shift_that_keeps_the_labels():
    data = random_dataset(n=8, num_classes=4)
    with pytest.raises(ConfigError, match="shift"):
        build_protector("tap", **{**TINY["tap"], "shift": 4}).protect(data, device="cpu", progress=False)


# ---------------------------------------------------------------------------------- the PGD loop


def test_pgd_stays_in_the_ball_and_the_pixel_range():
    x = torch.rand(6, 1, 8, 8)
    x[0] = 0.0
    x[1] = 1.0
    w = torch.randn(1, 1, 8, 8)
    for minimize in (True, False):
        d = pgd(lambda xu: (xu * w).sum(), x, uniform_start(x.shape, 0.1, 0, "cpu"), 0.1, 7, 0.05,
                minimize=minimize)
        assert d.abs().max() <= 0.1 + 1e-7 and (x + d).min() >= 0 and (x + d).max() <= 1
        assert (x + d)[0].min() >= 0 and (x + d)[1].max() <= 1


def test_pgd_descends_or_ascends_a_loss():
    x, w = torch.full((4, 1, 8, 8), 0.5), torch.randn(1, 1, 8, 8)
    loss = lambda xu: (xu * w).sum()
    start = torch.zeros_like(x)
    assert loss(x + pgd(loss, x, start, 0.1, 5, 0.03, minimize=True)) < loss(x) < \
        loss(x + pgd(loss, x, start, 0.1, 5, 0.03, minimize=False))


# ------------------------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def source_net(digits_small):
    """A CNN trained on the clean digits (about 98 % training accuracy), then fixed."""
    model = create_model("cnn", 10, 1, seed=0)
    return train(model, digits_small, Recipe(epochs=5, batch_size=20, lr=0.05, flip=False), device="cpu",
                 progress=False).requires_grad_(False)


def _loss(model, images, labels, delta):
    return F.cross_entropy(predict(model, (images.float() / 255 + delta).clamp(0, 1)), labels).item()


def test_em_noise_lowers_a_fixed_networks_loss_below_random_noise(digits_small, source_net):
    em = build_protector("em", **{**TINY["em"], "pgd_steps": 20})  # the paper's 20 steps of 0.8/255
    images, labels = digits_small.tensors()
    random = uniform_start(images.shape, em.rho, 0, "cpu")
    delta = em.minimize_noise(source_net, images, labels, random)
    assert delta.abs().max() <= em.rho + 1e-6
    assert _loss(source_net, images, labels, delta) < 0.75 * _loss(source_net, images, labels, random)


def test_em_against_a_linear_probe_on_pretrained_features_keeps_them_fixed(digits_small, source_net, tmp_path):
    """``init`` + ``probe``: the source starts from a weights file and only its head learns; fitting the noise
    leaves the features frozen (the source trains on between rounds), and a missing file is a one-line error."""
    save_weights(tmp_path / "pre.safetensors", source_net.state_dict())
    em = build_protector("em", **{**TINY["em"], "arch": "cnn", "init": str(tmp_path / "pre.safetensors"),
                                  "probe": True})
    net = load_into(create_model("cnn", 10, 1, seed=5), tmp_path / "pre.safetensors").freeze_features()
    images, labels = digits_small.tensors()
    random = uniform_start(images.shape, em.rho, 0, "cpu")
    delta = em.minimize_noise(net, images, labels, random)
    assert _loss(net, images, labels, delta) < _loss(net, images, labels, random)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["body.head.weight", "body.head.bias"]
    result = em.protect(digits_small, device="cpu", progress=False, seed=0)
    assert result.history and np.abs(result.protected.images.astype(int) - digits_small.images).max() <= 8
    with pytest.raises(ConfigError, match="weights file not found"):
        build_protector("em", **{**TINY["em"], "init": str(tmp_path / "none.safetensors")}).protect(
            digits_small, device="cpu", progress=False)


def test_cell_means_make_a_perturbation_constant_over_cells_and_channels_within_the_ball():
    d = (torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.04
    c = cell_means(d, 4)
    assert torch.allclose(c[..., :4, :4], d[..., :4, :4].mean((-2, -1), keepdim=True).expand(-1, -1, 4, 4))
    assert torch.allclose(c[..., 8:, 8:], d[..., 8:, 8:].mean((-2, -1), keepdim=True).expand(-1, -1, 2, 2))
    assert c.abs().max() <= 0.04 and not torch.allclose(c, d)
    lum = cell_means(d, 1, luminance=True)
    assert torch.equal(lum[:, 0], lum[:, 2]) and torch.allclose(lum[:, 1], d.mean(1))
    assert torch.equal(cell_means(d), d)


def test_em_in_cells_of_luminance_publishes_a_perturbation_of_that_shape_that_still_fits(source_net):
    """EM restricted to the means of 4-px cells, one value for every channel: the published perturbation is
    that (up to 8-bit rounding, ±1 level), and it still lowers the source network's loss below random noise of
    the same shape."""
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(40, 216, (24, 16, 16, 3), dtype=np.uint8), np.arange(24) % 4,
                        ["a", "b", "c", "d"])  # no pixel near 0 or 255: nothing is clipped
    em = build_protector("em", arch="cnn", rho=8 / 255, train_steps=2, pgd_steps=5, max_rounds=2, batch_size=8,
                         cell=4, luminance=True)
    pub = em.protect(data, device="cpu", progress=False, seed=0).protected.images.astype(int)
    d = torch.from_numpy(pub - data.images.astype(int)).permute(0, 3, 1, 2).float()
    spread = d.unfold(2, 4, 4).unfold(3, 4, 4).flatten(-2)  # (N, C, 4, 4, 16): the pixels of every cell
    assert (spread.amax(-1) - spread.amin(-1)).max() <= 1 and (d.amax(1) - d.amin(1)).max() <= 1
    assert d.abs().max() <= 8 and d.abs().mean() > 2  # in the ball, and not nothing
    net = create_model("cnn", 4, 3, seed=0)
    images, labels = data.tensors()
    start = cell_means(uniform_start(images.shape, em.rho, 1, "cpu"), 4, True)
    fitted = em.minimize_noise(net, images, labels, start)
    assert torch.allclose(fitted, cell_means(fitted, 4, True), atol=1e-7)  # nothing clipped: in the subspace
    assert _loss(net, images, labels, fitted) < _loss(net, images, labels, start)


def test_rem_noise_lowers_the_worst_case_loss_below_random_noise(digits_small, source_net):
    rem = build_protector("rem", **{**TINY["rem"], "pgd_steps": 5, "adv_steps": 3})
    images, labels = digits_small.tensors()
    random = uniform_start(images.shape, rem.rho, 0, "cpu")
    delta = rem.minimize_noise(source_net, images, labels, random)
    x = images.float() / 255
    worst = lambda d: rem.noise_loss(source_net, x + d, labels).item()
    assert worst(delta) < worst(random)


def test_tap_moves_the_source_networks_predictions_to_the_target_class(digits_small):
    tap = build_protector("tap", arch="cnn", epochs=5, batch_size=20, lr=0.05, steps=10, augment=False)
    result = tap.protect(digits_small, device="cpu", progress=False, seed=0)
    net = tap.source_network(digits_small, device="cpu", seed=0)  # the same network protect attacked
    targets = tap.targets(torch.from_numpy(digits_small.labels), 10)
    random = build_protector("random").protect(digits_small, seed=0).protected

    def toward_target(d):  # (cross-entropy to the target class, fraction predicted as the target)
        logits = predict(net, d.tensors()[0])
        return F.cross_entropy(logits, targets).item(), (logits.argmax(1) == targets).float().mean().item()

    (ce_clean, hit_clean), (ce_random, _), (ce_tap, hit_tap) = map(toward_target, (digits_small, random,
                                                                                    result.protected))
    # 8x8 digits are hard to flip within 8/255 (a few % flip), but the pull toward the target is clear
    assert ce_tap < 0.85 * min(ce_clean, ce_random) and hit_tap > hit_clean
    assert result.history == [{"source_at_target": round(hit_tap * 100, 2)}]  # what protect.json reports


def test_tap_against_a_linear_probe_trains_only_the_sources_head(digits_small, source_net, tmp_path):
    """``init`` + ``probe`` (shared with EM): TAP's source starts from the weights file, and training it on the
    clean set moves its head and nothing else; the noise still pulls that source toward the target class."""
    save_weights(tmp_path / "pre.safetensors", source_net.state_dict())
    tap = build_protector("tap", arch="cnn", epochs=2, batch_size=20, lr=0.05, steps=10, augment=False,
                          init=str(tmp_path / "pre.safetensors"), probe=True)
    net = tap.source_network(digits_small, device="cpu", seed=3)
    before, after = source_net.state_dict(), net.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"body.head.weight", "body.head.bias"}
    result = tap.protect(digits_small, device="cpu", progress=False, seed=3)
    targets = tap.targets(torch.from_numpy(digits_small.labels), 10)
    ce = lambda d: F.cross_entropy(predict(net, d.tensors()[0]), targets).item()
    assert ce(result.protected) < 0.9 * ce(digits_small)
    assert np.abs(result.protected.images.astype(int) - digits_small.images).max() <= 8


def _smooth_rgb_through(countermeasure: str):
    """16 smooth 32×32 RGB images with a little noise: (uint8 NHWC, the same in [0, 1] NCHW with a gradient, what
    the countermeasure makes of them as floats)."""
    from uge.countermeasures import parse_countermeasures, transform_data
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(16, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.randn(16, 3, 32, 32, generator=g)).clamp(0, 1)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    real = transform_data(parse_countermeasures(countermeasure),
                          ImageDataset(u8, np.zeros(16, np.int64), list("ab"))).images.astype(float)
    return u8, torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255).requires_grad_(True), real


def test_soft_iss_is_isss_grayscale_and_jpeg_and_passes_a_gradient():
    """TAP's ``iss`` view: within a level or two of the countermeasure ``grayscale+jpeg:quality=10`` on smooth
    RGB images (it removes ten times that), and differentiable in the image."""
    from uge.protectors.noise import soft_iss
    u8, x, real = _smooth_rgb_through("grayscale+jpeg:quality=10")
    soft = soft_iss(x)
    diff = np.abs(soft.detach().permute(0, 2, 3, 1).numpy() * 255 - real).mean()
    assert diff < 2 and np.abs(real - u8).mean() > 10 * diff
    (grad,) = torch.autograd.grad(soft.sum(), x)
    assert grad.abs().sum() > 0
    cubic = soft_iss(x, grad="cubic")
    assert torch.allclose(cubic, soft, atol=1e-5)  # the same forward pass (up to float error), another gradient
    (grad_cubic,) = torch.autograd.grad(cubic.sum(), x)
    assert grad_cubic.abs().sum() > 0 and not torch.allclose(grad_cubic, grad)


@pytest.mark.parametrize("quality", [10, 30])
def test_soft_jpeg_is_colour_jpeg_and_passes_a_gradient(quality):
    """TAP's ``jpeg`` view: within about a level of the countermeasure ``jpeg`` (Pillow, 4:2:0) on smooth RGB
    images, where that countermeasure changes ten times as much, and differentiable in the image."""
    from uge.protectors.noise import soft_jpeg
    u8, x, real = _smooth_rgb_through(f"jpeg:quality={quality}")
    soft = soft_jpeg(x, quality, grad="cubic")
    diff = np.abs(soft.detach().permute(0, 2, 3, 1).numpy() * 255 - real).mean()
    assert diff < 2 and np.abs(real - u8).mean() > 10 * diff
    assert not np.allclose(real[..., 0], real[..., 1])  # colour is kept (ISS's grayscale would make them equal)
    (grad,) = torch.autograd.grad(soft.sum(), x)
    assert grad.abs().sum() > 0


def test_tap_jpeg_view_is_drawn_and_needs_colour(digits_small):
    from uge.protectors.noise import soft_jpeg
    tap = build_protector("tap", **TINY["tap"], jpeg=1.0)
    x = torch.rand(2, 3, 16, 16)
    seen, source = tap.squeeze(x)
    assert torch.equal(seen, soft_jpeg(x)) and source == "full"
    with pytest.raises(ConfigError, match="needs RGB images"):
        tap.protect(digits_small, device="cpu", progress=False)
    against_scratch = build_protector("tap", **TINY["tap"], scratch_jpeg=1.0, init="unused.safetensors")
    seen, source = against_scratch.squeeze(x)  # the same view, against the source from random init
    assert torch.equal(seen, soft_jpeg(x)) and source == "scratch"
    with pytest.raises(ConfigError, match="needs RGB images"):
        against_scratch.protect(digits_small, device="cpu", progress=False)


def test_tap_quality_ranges_draw_each_views_quality_afresh(monkeypatch):
    """``iss_quality_max`` / ``jpeg_quality_max``: every ISS or JPEG view draws its quality from the range (each
    value about equally often); without them the one quality; a range below its low end or without its view is
    refused."""
    import uge.protectors.tap as tap_module
    asked = []
    monkeypatch.setattr(tap_module, "soft_iss", lambda u, q, grad: asked.append(("iss", q)) or u)
    monkeypatch.setattr(tap_module, "soft_jpeg", lambda u, q, grad: asked.append(("jpeg", q)) or u)
    tap = build_protector("tap", **TINY["tap"], iss=0.5, iss_quality=10, iss_quality_max=30, jpeg=0.5,
                          jpeg_quality=20, jpeg_quality_max=21)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    for _ in range(300):
        for chance, see, _source in tap.step_views()[1:3]:
            see(x)
    iss = [q for view, q in asked if view == "iss"]
    jpeg = [q for view, q in asked if view == "jpeg"]
    assert set(iss) == set(range(10, 31)) and set(jpeg) == {20, 21} and 100 < jpeg.count(20) < 200
    asked.clear()
    build_protector("tap", **TINY["tap"], iss=0.5, iss_quality=30).step_views()[1][1](x)
    assert asked == [("iss", 30)]
    with pytest.raises(ConfigError, match="iss_quality_max must be at least iss_quality"):
        build_protector("tap", **TINY["tap"], iss=0.5, iss_quality=30, iss_quality_max=20)
    with pytest.raises(ConfigError, match="jpeg_quality_max is used only with jpeg > 0"):
        build_protector("tap", **TINY["tap"], jpeg_quality_max=50)


def test_soft_iss_cubic_gradient_is_largest_half_way_between_quantization_levels():
    """``grad="cubic"``: a block whose DC coefficient lies half-way between two levels of the quality-10 table gets
    a gradient, one that lies on a level gets none (the straight-through gradient is the same for both)."""
    from uge.protectors.noise import jpeg_luma_table, soft_iss
    step = float(jpeg_luma_table(10)[0, 0]) / 8 / 255  # one DC level as a change of the block's mean on [0, 1]
    on_level = 128 / 255  # DC 0: exactly on a level
    half_way = on_level + 0.5 * step
    x = torch.tensor([on_level, half_way]).view(2, 1, 1, 1).expand(2, 1, 8, 8).clone().requires_grad_(True)
    (cubic,) = torch.autograd.grad(soft_iss(x, grad="cubic").sum(), x)
    (ste,) = torch.autograd.grad(soft_iss(x).sum(), x)
    assert cubic[0].abs().max() < 1e-6 < cubic[1].abs().min()
    assert torch.allclose(ste[0], ste[1])


def test_tap_with_iss_in_its_expectation_sees_iss_on_some_steps(digits_small):
    tap = build_protector("tap", **{**TINY["tap"], "iss": 0.5})
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(0)
    seen = [not torch.equal(tap.squeeze(x)[0], x) for _ in range(40)]
    assert 5 < sum(seen) < 35  # about half the steps
    plain, source = build_protector("tap", **TINY["tap"]).squeeze(x)
    assert plain is x and source == "full"
    with pytest.raises(ConfigError, match="iss_quality is used only with iss > 0"):
        build_protector("tap", **TINY["tap"], iss_quality=20)
    with pytest.raises(ConfigError, match="jpeg_quality is used only with jpeg or scratch_jpeg > 0"):
        build_protector("tap", **TINY["tap"], jpeg_quality=30)
    with pytest.raises(ConfigError, match=r"iss \+ jpeg \+ blanket \+ scratch \+ scratch_jpeg \+ lowpass is the "):
        build_protector("tap", **TINY["tap"], iss=0.5, jpeg=0.5, blanket=0.25)
    with pytest.raises(ConfigError, match="iss_grad='cubic'"):
        build_protector("tap", **TINY["tap"], iss_grad="cubic")
    result = tap.protect(digits_small, device="cpu", progress=False, seed=0)
    assert np.abs(result.protected.images.astype(int) - digits_small.images).max() <= 8


def test_tap_with_the_blanket_in_its_expectation_sees_block_means_on_some_steps():
    """``blanket``: a share of the PGD steps see only x + δ's 8×8 block means; with ``iss`` the two shares add up
    (at most 1)."""
    from uge.pgd import cell_means
    tap = build_protector("tap", **{**TINY["tap"], "iss": 0.3, "blanket": 0.3})
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(0)
    views = [tap.squeeze(x) for _ in range(200)]
    means = sum(torch.equal(v, cell_means(x, 8)) and source == "full" for v, source in views)  # no blanket source
    plain = sum(v is x and source == "full" for v, source in views)
    assert 35 < means < 85 and 35 < 200 - plain - means < 85 and 50 < plain < 110  # about 0.3, 0.3 and 0.4
    with pytest.raises(ConfigError, match="at most 1"):
        build_protector("tap", **TINY["tap"], iss=0.6, blanket=0.6)


def test_tap_source_blanket_attacks_a_source_trained_on_what_the_blanket_removal_leaves(monkeypatch):
    """``source_blanket``: the steps that see block means attack a second source, trained on the clean images' 8×8
    block means, exactly what the blanket ``blockdct`` removal (every AC coefficient zeroed) leaves of them; with
    ``blanket = 1`` it is the only source. Each source's success is logged."""
    import uge.protectors.tap as tap_module
    from uge.countermeasures import parse_countermeasures, transform_data

    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), np.arange(12) % 3, list("abc"))
    blanket = transform_data(parse_countermeasures("blockdct:k=192,ratio=0.5"), data, reference=data)
    means = tap_module.block_means(data)
    assert np.abs(means.images.astype(int) - blanket.images).max() <= 1
    assert np.abs(means.images.astype(int) - data.images).max() > 50  # the blocks' detail is gone
    seen = []
    real = tap_module.train
    monkeypatch.setattr(tap_module, "train", lambda model, d, *a, **k: seen.append(d.images) or real(model, d, *a, **k))
    two = build_protector("tap", **TINY["tap"], blanket=0.5, source_blanket=True).protect(data, device="cpu",
                                                                                          progress=False)
    assert [np.array_equal(s, means.images) for s in seen] == [False, True]
    assert np.array_equal(seen[0], data.images)
    assert set(two.history[0]) == {"source_at_target", "blanket_source_at_target"}
    seen.clear()
    one = build_protector("tap", **TINY["tap"], blanket=1.0, source_blanket=True, cell=8).protect(data, device="cpu",
                                                                                                 progress=False)
    assert len(seen) == 1 and np.array_equal(seen[0], means.images) and set(one.history[0]) == {"source_at_target"}
    with pytest.raises(ConfigError, match="source_blanket needs blanket > 0"):
        build_protector("tap", **TINY["tap"], source_blanket=True)


def test_tap_scratch_attacks_a_second_source_from_random_init_beside_the_pretrained_probe(tmp_path, monkeypatch):
    """``scratch``: beside the probe on ``init``'s fixed features, a second source on full images trained from
    random init with every layer; both attacked, both logged. Without ``init`` it is refused (the main source is
    from random init already)."""
    import uge.protectors.tap as tap_module
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), np.arange(12) % 3, list("abc"))
    init = tmp_path / "features.safetensors"
    save_weights(init, create_model("lenet", 3, 3, seed=5).state_dict())
    trained = []
    real = tap_module.train
    monkeypatch.setattr(tap_module, "train", lambda model, d, *a, **k: trained.append(
        [n for n, p in model.named_parameters() if p.requires_grad]) or real(model, d, *a, **k))
    tap = build_protector("tap", **TINY["tap"], init=str(init), probe=True, scratch=0.5)
    assert tap.source_kinds() == ["full", "scratch"]
    result = tap.protect(data, device="cpu", progress=False)
    probe, scratch = trained
    assert len(probe) < len(scratch)  # the probe trains its head only, the scratch source every layer
    assert set(result.history[0]) == {"source_at_target", "scratch_source_at_target"}
    assert 0 < np.abs(result.protected.images.astype(int) - data.images).max() <= 8
    with pytest.raises(ConfigError, match="scratch needs init"):
        build_protector("tap", **TINY["tap"], scratch=0.5)
    with pytest.raises(ConfigError, match="scratch_jpeg needs init"):
        build_protector("tap", **TINY["tap"], scratch_jpeg=0.5)
    assert build_protector("tap", **TINY["tap"], init=str(init), scratch_jpeg=0.5).source_kinds() == ["full", "scratch"]


def test_tap_views_vote_moves_each_pixel_by_the_weighted_vote_of_every_views_gradient_sign():
    """``views = "vote"``: every step's gradient is the chance-weighted sum of the plain, ISS and block-mean views'
    gradient signs (each against its own source), so a pixel moves where the views' weights agree; "draw" is one view."""
    from uge.protectors.noise import soft_iss, soft_jpeg
    torch.manual_seed(0)
    full, coarse = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)) for _ in range(2))
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    tap = build_protector("tap", **TINY["tap"], iss=0.3, blanket=0.2, source_blanket=True, views="vote")
    delta = torch.zeros_like(x, requires_grad=True)
    (got,) = torch.autograd.grad(tap.loss({"full": full, "blanket": coarse}, lambda u: u, x + delta, t), delta)
    signs = []
    for model, view in ((full, lambda u: u), (full, lambda u: soft_iss(u)), (coarse, lambda u: cell_means(u, 8)),
                        (full, lambda u: soft_jpeg(u))):
        d = torch.zeros_like(x, requires_grad=True)
        signs.append(torch.autograd.grad(F.cross_entropy(model(view(x + d)), t), d)[0].sign())
    assert torch.allclose(got, 0.5 * signs[0] + 0.3 * signs[1] + 0.2 * signs[2])
    with_jpeg = build_protector("tap", **TINY["tap"], iss=0.3, jpeg=0.1, blanket=0.2, source_blanket=True,
                                views="vote")
    (got_jpeg,) = torch.autograd.grad(with_jpeg.loss({"full": full, "blanket": coarse}, lambda u: u, x + delta, t),
                                      delta)
    assert torch.allclose(got_jpeg, 0.4 * signs[0] + 0.3 * signs[1] + 0.2 * signs[2] + 0.1 * signs[3])
    scratch = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    d = torch.zeros_like(x, requires_grad=True)
    scratch_sign = torch.autograd.grad(F.cross_entropy(scratch(x + d), t), d)[0].sign()
    with_scratch = build_protector("tap", **TINY["tap"], iss=0.3, scratch=0.25, blanket=0.2, source_blanket=True,
                                   views="vote", init="unused.safetensors")
    (got_scratch,) = torch.autograd.grad(with_scratch.loss({"full": full, "blanket": coarse, "scratch": scratch},
                                                           lambda u: u, x + delta, t), delta)
    assert torch.allclose(got_scratch, 0.25 * signs[0] + 0.3 * signs[1] + 0.2 * signs[2] + 0.25 * scratch_sign)
    scratch_jpeg_sign = torch.autograd.grad(F.cross_entropy(scratch(soft_jpeg(x + d)), t), d)[0].sign()
    with_both = build_protector("tap", **TINY["tap"], iss=0.3, scratch=0.2, scratch_jpeg=0.15, blanket=0.2,
                                source_blanket=True, views="vote", init="unused.safetensors")
    (got_both,) = torch.autograd.grad(with_both.loss({"full": full, "blanket": coarse, "scratch": scratch},
                                                     lambda u: u, x + delta, t), delta)
    assert torch.allclose(got_both, 0.15 * signs[0] + 0.3 * signs[1] + 0.2 * signs[2] + 0.2 * scratch_sign
                          + 0.15 * scratch_jpeg_sign)
    assert (got.sign() != signs[0]).any() and (got.sign() == signs[0]).float().mean() > 0.5  # the plain view wins most
    for views in ("vote", "sum"):
        with pytest.raises(ConfigError, match=f"views='{views}' needs a view besides the plain one"):
            build_protector("tap", **TINY["tap"], views=views)
    data = random_dataset(n=8, size=16, channels=3, num_classes=2)
    out = tap.protect(data, device="cpu", progress=False).protected.images.astype(int)
    assert 0 < np.abs(out - data.images).max() <= 8  # ρ = 8/255 by default


def test_tap_views_sum_weighs_each_views_gradient_scaled_to_one_per_image():
    """``views = "sum"``: the chance-weighted sum of every view's gradient, each scaled to a mean magnitude of 1 per
    image, so a source with small gradients counts as much as one with large; where one view's gradient is large it
    outvotes the others' signs, which "vote" never lets it do."""
    from uge.protectors.noise import soft_iss
    torch.manual_seed(0)
    full, coarse = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)) for _ in range(2))
    with torch.no_grad():
        coarse[1].weight.mul_(1e-3)  # a source whose gradients are a thousand times smaller
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    kw = dict(**TINY["tap"], iss=0.3, blanket=0.2, source_blanket=True)
    summed, voted = (build_protector("tap", **kw, views=v) for v in ("sum", "vote"))
    delta = torch.zeros_like(x, requires_grad=True)
    (got,) = torch.autograd.grad(summed.loss({"full": full, "blanket": coarse}, lambda u: u, x + delta, t), delta)
    grads = []
    for model, view in ((full, lambda u: u), (full, lambda u: soft_iss(u)), (coarse, lambda u: cell_means(u, 8))):
        d = torch.zeros_like(x, requires_grad=True)
        g = torch.autograd.grad(F.cross_entropy(model(view(x + d)), t), d)[0]
        grads.append(g / g.abs().mean(dim=(1, 2, 3), keepdim=True))
    assert torch.allclose(got, 0.5 * grads[0] + 0.3 * grads[1] + 0.2 * grads[2], atol=1e-5)
    blanket_share = (got - 0.5 * grads[0] - 0.3 * grads[1]).abs().mean()
    assert torch.isclose(blanket_share, torch.tensor(0.2), atol=1e-4)  # the small source counts at its weight
    (vote,) = torch.autograd.grad(voted.loss({"full": full, "blanket": coarse}, lambda u: u, x + delta, t), delta)
    assert (got.sign() != vote.sign()).any()  # magnitudes decide some pixels that the vote of signs decides otherwise
    data = random_dataset(n=8, size=16, channels=3, num_classes=2)
    out = summed.protect(data, device="cpu", progress=False).protected.images.astype(int)
    assert 0 < np.abs(out - data.images).max() <= 8  # ρ = 8/255 by default


def test_tap_in_cells_of_luminance_publishes_a_perturbation_of_that_shape():
    """TAP restricted to the means of 4-px cells, one value for every channel (the band JPEG's block means and
    grayscale keep): the published perturbation is that, up to 8-bit rounding (±1 level)."""
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(40, 216, (24, 16, 16, 3), dtype=np.uint8), np.arange(24) % 4,
                        ["a", "b", "c", "d"])  # no pixel near 0 or 255: nothing is clipped
    tap = build_protector("tap", arch="cnn", rho=8 / 255, epochs=1, steps=5, batch_size=8, cell=4, luminance=True)
    pub = tap.protect(data, device="cpu", progress=False, seed=0).protected.images.astype(int)
    d = torch.from_numpy(pub - data.images.astype(int)).permute(0, 3, 1, 2).float()
    spread = d.unfold(2, 4, 4).unfold(3, 4, 4).flatten(-2)  # (N, C, 4, 4, 16): the pixels of every cell
    assert (spread.amax(-1) - spread.amin(-1)).max() <= 1 and (d.amax(1) - d.amin(1)).max() <= 1
    assert d.abs().max() <= 8 and d.abs().mean() > 2  # in the ball, and not nothing


def test_cuda_filters_differ_by_class_and_keep_images_recognizable(runs, digits_small):
    cuda = build_protector("cuda")
    w = cuda.filters(10, 1, seed=0)
    assert w.shape == (10, 1, 3, 3) and torch.allclose(w.sum(dim=(2, 3)), torch.ones(10, 1, dtype=w.dtype))
    assert all(not torch.equal(w[0], w[c]) for c in range(1, 10))
    # a flat image keeps its value under every class filter (normalized), an edge does not: class-wise blur
    flat = random_dataset(n=4, num_classes=2)
    flat.images[:] = 100
    assert (cuda.protect(flat, seed=0).protected.images == 100).all()
    s = similarity(runs["cuda"][0].protected.images, digits_small.images)
    assert math.isfinite(s["psnr"]) and 10 < s["psnr"] < PSNR_CAP and 0 < s["ssim"] < 1


def test_random_noise_is_spread_over_the_budget(runs, digits_small):
    d = runs["random"][0].protected.images.astype(int) - digits_small.images.astype(int)
    inside = (digits_small.images > 8) & (digits_small.images < 247)  # away from clipping at 0 and 255
    assert set(np.unique(d[inside])) == set(range(-8, 9))


def test_tiled_patch_is_one_periodic_pattern_per_class(runs, digits_small):
    d = runs["patch"][0].protected.images.astype(int) - digits_small.images.astype(int)
    inside = (digits_small.images > 8) & (digits_small.images < 247)
    assert set(np.unique(d[inside])) == {-8, 8}  # ±ρ everywhere the pixel range allows
    labels = digits_small.labels
    sign = np.sign(d)
    for c in np.unique(labels):  # every image of a class carries the same signs (where not clipped)
        first = np.flatnonzero(labels == c)[0]
        agree = [(sign[i] == sign[first])[inside[i] & inside[first]].mean() for i in np.flatnonzero(labels == c)]
        assert min(agree) == 1.0
    a, b = (np.flatnonzero(labels == c)[0] for c in (0, 1))
    assert (sign[a] != sign[b]).mean() > 0.2  # classes differ
    tile = sign[a][:4, :4]  # 8x8 digits, size 4: the same 4x4 tile four times
    both = inside[a][:4, :4] & inside[a][4:, 4:]
    assert (tile == sign[a][4:, 4:])[both].all()


def test_tiled_patch_of_coarse_cells(digits_small):
    prot = build_protector("patch", rho=8 / 255, size=8, block=4).protect(digits_small, progress=False)
    d = prot.protected.images.astype(int) - digits_small.images.astype(int)
    inside = (digits_small.images > 8) & (digits_small.images < 247)
    signs = np.sign(d).astype(float)
    signs[~inside] = np.nan
    for i in range(20):  # each 4x4 cell has one sign (where not clipped); the four cells are not all alike
        cells = [signs[i][r:r + 4, c:c + 4] for r in (0, 4) for c in (0, 4)]
        assert all(len(np.unique(cell[~np.isnan(cell)])) <= 1 for cell in cells)
    assert set(np.unique(d[inside])) == {-8, 8}


# ------------------------------------------------------------------------------- similarity


def test_psnr_and_ssim_known_values():
    a = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert psnr(a, a) == PSNR_CAP and ssim(a, a) == pytest.approx(1.0)
    b = a.astype(int)
    b[..., 0, 0, 0] += np.where(a[..., 0, 0, 0] < 128, 10, -10)  # one pixel off by 10: MSE = 100 / 768
    assert psnr(b.astype(np.uint8), a) == pytest.approx(10 * math.log10(255 ** 2 * 768 / 100))
    noisy = np.clip(a + np.random.default_rng(1).integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(noisy, a) < ssim(b.astype(np.uint8), a) < 1


def test_ssim_matches_a_gaussian_filter_reference():
    """Independent reference: scipy's Gaussian filter (σ 1.5, 11 taps), borders cropped (skimage's recipe)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    b = np.clip(a + rng.integers(-25, 26, a.shape), 0, 255).astype(np.uint8)
    c1, c2, vals = (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
    for x, y in zip(a.astype(float), b.astype(float)):
        per_channel = []
        for ch in range(3):
            f = lambda t: ndimage.gaussian_filter(t, 1.5, truncate=3.5)
            X, Y = x[..., ch], y[..., ch]
            mx, my = f(X), f(Y)
            vx, vy, cov = f(X * X) - mx ** 2, f(Y * Y) - my ** 2, f(X * Y) - mx * my
            s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
            per_channel.append(s[5:-5, 5:-5].mean())
        vals.append(np.mean(per_channel))
    assert ssim(b, a) == pytest.approx(np.mean(vals), abs=1e-9)


def test_verify_catches_a_cuda_set_whose_manifest_misreports_its_similarity(runs, digits_small, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(runs["cuda"][1], folder)
    f = folder / "manifest.json"
    m = json.loads(f.read_text())
    m["similarity"]["psnr"] += 5
    f.write_text(json.dumps(m))
    assert {c.name for c in verify(folder, digits_small).checks if not c.passed} == {"file hashes"}
    rehash(folder)  # a careful forger: the measured similarity still disagrees
    report = verify(folder, digits_small)
    assert {c.name for c in report.checks if not c.passed} == {"similarity"}


def test_uge_verify_command_reports_psnr_and_ssim_for_a_cuda_set(runs, digits_small, tmp_path, capsys):
    from uge.cli import main

    source = {"data": "digits", "split": "train", "per_class": 10, "subset_seed": 0}  # = digits_small
    folder = publish(runs["cuda"][0], digits_small, tmp_path / "cuda", source=source)
    capsys.readouterr()
    assert main(["verify", str(folder), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "verified: OK" and not any(line.startswith("FAIL") for line in lines)
    sim = next(line for line in lines if line.startswith("PASS  similarity"))
    assert "PSNR" in sim and "SSIM" in sim and not any("budget" in line for line in lines)


def test_cli_protects_with_a_baseline_method(tmp_path, capsys):
    from uge.cli import main

    out = tmp_path / "rand"
    assert main(["protect", "--data", "digits", "--per-class", "3", "--out", str(out), "--method", "random",
                 "--param", "rho=0.0314", "--format", "npz", "--quiet"]) == 0
    assert read_published(out).manifest["method"] == "random"
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["protect", "--data", "digits", "--out", str(tmp_path / "x"), "--method", "em",
                 "--param", "pgd_stepz=3"]) == 2
    assert "pgd_stepz" in capsys.readouterr().err
    assert main(["protect", "--data", "digits", "--out", str(tmp_path / "y"), "--method", "nope"]) == 2
    assert main(["protect", "--data", "digits", "--out", str(tmp_path / "z"), "--param", "a=1"]) == 2


# the protectors whose perturbation reaches the edge of any budget it is given (the others stay within it)
USES_THE_WHOLE_BUDGET = {"random", "patch", "jpeg-patch", "smooth", "keyed", "em", "rem", "tap"}


@pytest.mark.parametrize("name", [n for n in list_protectors() if protector_class(n).norm_bounded])
def test_the_budget_given_is_the_budget_used_and_published(name, digits_small, tmp_path):
    """Each norm-bounded protector at a budget that is not its default (4 levels): the saved files stay within
    it, the manifest states it, and the noise-type ones reach it (a protector that ignored ρ would use 8 or 10)."""
    data = _data(name, digits_small)
    p = build_protector(name, **{**TINY[name], "rho": 4 / 255})
    result = p.protect(data, device="cpu", progress=False, seed=0)
    folder = publish(result, data, tmp_path / "set", formats=("npz",))
    levels = int(np.abs(read_published(folder).data.images.astype(int) - data.images.astype(int)).max())
    m = read_published(folder).manifest
    assert result.rho == pytest.approx(4 / 255) and m["params"]["rho"] == pytest.approx(4 / 255)
    assert m["rho_levels"] == 4
    assert 1 <= levels <= 4
    if name in USES_THE_WHOLE_BUDGET:
        assert levels == 4
    assert verify(folder, data, rho=4 / 255).ok


def test_cuda_filters_every_colour_channel_of_rgb_images():
    """CUDA's class filters act on each channel (a CUDA that left one channel unfiltered passed the digits tests)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    data = ImageDataset(images, np.arange(40) % 4, [f"c{i}" for i in range(4)])
    cuda = build_protector("cuda", blur=0.5)
    assert cuda.filters(4, 3).shape == (4, 3, 3, 3)
    out = cuda.protect(data, seed=0).protected.images
    for c in range(3):
        assert (out[..., c] != images[..., c]).mean() > 0.5, f"channel {c} left unfiltered"
    # a channel's output depends on that channel only (depthwise): changing red leaves green and blue alone
    other = images.copy()
    other[..., 0] = 255 - other[..., 0]
    out2 = cuda.protect(ImageDataset(other, data.labels, data.classes), seed=0).protected.images
    assert np.array_equal(out2[..., 1:], out[..., 1:]) and not np.array_equal(out2[..., 0], out[..., 0])


def test_tap_in_a_band_of_block_dct_frequencies_publishes_a_perturbation_in_that_band():
    """``band = 2``: every 8×8 block of the published perturbation is made of the DCT coefficients v + u ≤ 2 (the
    finer ones hold only what 8-bit rounding and the budget's clipping add); ``luminance`` makes it one value for
    every channel. The sign steps are projected too, so the band holds after the last step; without ``band`` most
    of the noise's power lies outside it."""
    from uge.pgd import block_dct

    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(40, 216, (24, 16, 16, 3), dtype=np.uint8), np.arange(24) % 4,
                        ["a", "b", "c", "d"])
    v, u = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    share = {}
    for band in (None, 2):
        tap = build_protector("tap", arch="cnn", rho=8 / 255, epochs=1, steps=5, batch_size=8, band=band,
                              luminance=True)
        pub = tap.protect(data, device="cpu", progress=False, seed=0).protected.images.astype(int)
        d = torch.from_numpy(pub - data.images.astype(int)).permute(0, 3, 1, 2).double()
        power = (block_dct(d) ** 2).mean((0, 1, 2, 3))  # (8, 8)
        share[band] = (power[v + u > 2].sum() / power.sum()).item()  # outside the band
        assert d.abs().max() <= 8 and d.abs().mean() > 1
        assert (d.amax(1) - d.amin(1)).max() <= 1  # luminance: the channels differ by rounding only
    assert share[2] < 0.1 and share[None] > 0.5
    with pytest.raises(ConfigError, match="band needs cell = 1"):
        build_protector("tap", band=2, cell=8)


def test_tap_matched_publishes_the_clean_sets_block_dct_power_and_unmatched_does_not():
    """``matched``: each image's content is shrunk so that the published set's power at every block-DCT coefficient
    and channel equals the clean set's, the noise's cross term with the content included; without it the noise's
    power shows. The budget holds on the images either way."""
    from uge.countermeasures.adaptive import BlockDCTExcess

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:16, :16]
    smooth = 60 * np.sin(xx[None] * rng.uniform(0.1, 0.6, (48, 1, 1)) + yy[None] * rng.uniform(0.1, 0.6, (48, 1, 1)))
    images = np.clip(128 + smooth[..., None] + rng.normal(0, 12, (48, 16, 16, 3)), 20, 235).astype(np.uint8)
    data = ImageDataset(images, np.arange(48) % 4, ["a", "b", "c", "d"])
    power = lambda x: (BlockDCTExcess._coefficients(x)[0] ** 2).mean(0)  # noqa: E731
    ac = np.arange(8)[:, None] + np.arange(8) > 0
    ratio = {}
    for matched in (False, True):
        tap = build_protector("tap", arch="cnn", rho=8 / 255, epochs=1, steps=5, batch_size=16, band=3,
                              luminance=True, matched=matched)
        pub = tap.protect(data, device="cpu", progress=False, seed=0).protected.images
        assert np.abs(pub.astype(int) - images).max() <= 8
        ratio[matched] = (power(pub) / power(images))[ac]
    assert ratio[False].max() > 1.2 and np.abs(ratio[True] - 1).max() < 0.02


def test_tap_lowpass_attacks_a_source_trained_on_what_the_fine_block_dct_comparison_leaves(monkeypatch):
    """``lowpass``: the steps that see x + δ with every block-DCT coefficient v + u > ``lowpass_band`` zeroed
    attack a second source trained on the clean images so filtered: what ``blockdct`` leaves when it zeroes exactly
    those coefficients (a noise that adds power there); its success is logged. ``lowpass_band`` without
    ``lowpass`` is refused."""
    import uge.protectors.tap as tap_module
    from uge.countermeasures.adaptive import BlockDCTExcess

    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), np.arange(12) % 3, list("abc"))
    low = tap_module.low_passed(data, 2)
    f = BlockDCTExcess._coefficients(low.images)[0]
    v, u = np.indices((8, 8))
    fine, kept = (f[:, v + u > 2] ** 2).mean(), (f[:, v + u <= 2] ** 2).mean()
    assert fine < 0.01 * kept  # rounding only where the filter zeroed
    assert np.abs(low.images.astype(int) - data.images).max() > 50  # the fine detail is gone
    seen = []
    real = tap_module.train
    monkeypatch.setattr(tap_module, "train", lambda model, d, *a, **k: seen.append(d.images) or real(model, d, *a, **k))
    tap = build_protector("tap", **TINY["tap"], lowpass=0.5, lowpass_band=2)
    assert tap.source_kinds() == ["full", "lowpass"] and tap.step_views()[-1][0] == 0.5
    result = tap.protect(data, device="cpu", progress=False)
    assert [np.array_equal(s, low.images) for s in seen] == [False, True]
    assert set(result.history[0]) == {"source_at_target", "lowpass_source_at_target"}
    with pytest.raises(ConfigError, match="lowpass_band is used only with lowpass"):
        build_protector("tap", **TINY["tap"], lowpass_band=2)
