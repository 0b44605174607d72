"""The hacker's countermeasures: the spec syntax and registry, a contract test for every registered
countermeasure, behaviour tests for each, PGD adversarial training, the θ0-plus-noise hacker, and their
integration with ``train``, ``evaluate_set`` and the ``uge`` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_dataset, tiny_config

from uge.cli import main
from uge.countermeasures import (
    BatchAugment,
    Countermeasure,
    InputTransform,
    adapt_model,
    countermeasure_slug,
    format_countermeasures,
    get_countermeasure,
    list_countermeasures,
    make_batch_augment,
    parse_countermeasures,
    perturb_init,
    transform_data,
    wrap_task,
)
from uge.data import ImageDataset
from uge.errors import ConfigError
from uge.evaluate import HackerSpec, evaluate_set, format_table
from uge.models import create_model
from uge.training import AdversarialTask, DistillTask, Recipe, SupervisedTask, train
from uge.weights import save_weights

# One valid, cheap spec per registered countermeasure; a new countermeasure must add one here.
EXAMPLES = {
    "jpeg": "jpeg:quality=30", "grayscale": "grayscale", "blur": "blur:sigma=0.8", "cutout": "cutout:size=4",
    "mixup": "mixup:alpha=0.4", "cutmix": "cutmix:alpha=1", "ueraser": "ueraser:strength=0.7",
    "adv": "adv:eps=4,steps=2", "copy-input": "copy-input", "pca": "pca:patch=2,k=2",
    "classmean": "classmean:strength=0.5", "orthogonal": "orthogonal:steps=5", "spectral": "spectral:k=8,ratio=1.5",
    "jpeg-grid": "jpeg-grid:quality=30,offset=3", "blockdct": "blockdct:k=4,ratio=1.5",
    "classdct": "classdct:k=4,ratio=1.5", "bitdepth": "bitdepth:bits=3", "knownbasis": "knownbasis:bases=4",
    "knownband": "knownband:fmax=1", "lowband": "lowband:k=2", "classref": "classref:cell=4", "probe": "probe",
}
# One bad parameter per countermeasure: (spec, words the message must contain).
BAD = {
    "jpeg": ("jpeg:quality=5", ["quality=5", "out of range", "10..95"]),
    "grayscale": ("grayscale:levels=2", ["no parameter 'levels'", "parameters: none"]),
    "blur": ("blur:kernel=4", ["kernel=4", "odd int"]),
    "cutout": ("cutout:size=0", ["size=0", "1..1024"]),
    "mixup": ("mixup:alpha=-1", ["alpha=-1", "> 0"]),
    "cutmix": ("cutmix:alpha=big", ["alpha='big'", "is not a float"]),
    "ueraser": ("ueraser:strength=2", ["strength=2", "<= 1"]),
    "adv": ("adv:eps=4,steps=2.5", ["steps='2.5'", "is not an int"]),
    "copy-input": ("copy-input:from=1", ["no parameter 'from'", "parameters: none"]),
    "probe": ("probe:layers=2", ["no parameter 'layers'", "parameters: none"]),
    "pca": ("pca:patch=0", ["patch=0", "1..16"]),
    "classmean": ("classmean:strength=0", ["strength=0", "> 0"]),
    "orthogonal": ("orthogonal:steps=0", ["steps=0", "1..10000"]),
    "spectral": ("spectral:zero=2", ["zero=2", "0..1"]),
    "jpeg-grid": ("jpeg-grid:offset=8", ["offset=8", "1..7"]),
    "blockdct": ("blockdct:ratio=0", ["ratio=0", "> 0"]),
    "classdct": ("classdct:k=0", ["k=0", "1..10000"]),
    "bitdepth": ("bitdepth:bits=8", ["bits=8", "1..7"]),
    "knownbasis": ("knownbasis:bases=64", ["bases=64", "1..63"]),
    "knownband": ("knownband:fmax=0", ["fmax=0", "1..64"]),
    "lowband": ("lowband:k=15", ["k=15", "1..14"]),
    "classref": ("classref:cell=0", ["cell=0", "1..256"]),
}
INPUTS = [n for n in list_countermeasures() if get_countermeasure(n).kind == "input"]
BATCHES = [n for n in list_countermeasures() if get_countermeasure(n).kind == "batch"]
TINY = Recipe(epochs=1, batch_size=16, lr=0.05, flip=False)


def one(spec: str) -> Countermeasure:
    (c,) = parse_countermeasures(spec)
    return c


def batch(b=16, c=3, size=8, seed=0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def rgb_dataset(n=24, size=16, seed=0) -> ImageDataset:
    return random_dataset(n=n, size=size, channels=3, num_classes=4, seed=seed)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- syntax and registry


def test_every_registered_countermeasure_has_a_contract_example():
    assert set(EXAMPLES) == set(BAD) == set(list_countermeasures())
    assert {"jpeg", "grayscale", "blur", "cutout", "mixup", "cutmix", "ueraser", "adv"} <= set(list_countermeasures())


@pytest.mark.parametrize("name", list_countermeasures())
def test_spec_round_trip_spells_out_every_parameter(name):
    c = one(EXAMPLES[name])
    assert c.name == name and c.kind in ("input", "batch", "task", "model")
    assert one(c.spec) == c and one(c.spec).spec == c.spec
    assert all(f"{k}=" in c.spec for k in c.params)  # defaults and derived values are written out
    assert one(name) == one(one(name).spec)  # every parameter has a default


def test_composed_specs_round_trip_in_order():
    text = " jpeg:quality=20 + grayscale+cutout:size=4+mixup:alpha=0.5+adv:eps=2, steps=1 "
    cms = parse_countermeasures(text)
    assert [c.name for c in cms] == ["jpeg", "grayscale", "cutout", "mixup", "adv"]
    canon = format_countermeasures(cms)
    assert canon == "jpeg:quality=20+grayscale+cutout:size=4+mixup:alpha=0.5+adv:eps=2.0,steps=1,step=5.0"
    assert parse_countermeasures(canon) == cms
    assert countermeasure_slug(cms) == "jpeg-quality20+grayscale+cutout-size4+mixup-alpha0.5+adv-eps2.0-steps1-step5.0"
    assert parse_countermeasures(cms) == cms  # a parsed list passes through


@pytest.mark.parametrize("text", [None, "", "  ", "none"])
def test_no_countermeasure(text):
    assert parse_countermeasures(text) == [] and format_countermeasures([]) == ""


def test_defaults_and_derived_values():
    assert one("jpeg").quality == 10
    assert one("blur:sigma=1").kernel == 7 and one("blur:sigma=0.5").kernel == 5  # 2*ceil(3 sigma)+1
    assert one("blur:sigma=1,kernel=3").kernel == 3
    adv = one("adv:eps=8,steps=4")
    assert adv.step == pytest.approx(5.0)  # Madry et al.: 2.5 eps / steps
    task = adv.wrap(SupervisedTask())
    assert isinstance(task, AdversarialTask) and task.eps == pytest.approx(8 / 255) and task.steps == 4
    assert task.step == pytest.approx(5 / 255)


@pytest.mark.parametrize("name", list_countermeasures())
def test_bad_parameter_raises_one_line_config_error(name):
    spec, words = BAD[name]
    with pytest.raises(ConfigError) as e:
        parse_countermeasures(spec)
    msg = str(e.value)
    assert "\n" not in msg and repr(name) in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("text, words", [
    ("jepg:quality=10", ["unknown countermeasure 'jepg'", "known: adv, bitdepth, blockdct, blur"]),
    ("jpeg:q=10", ["no parameter 'q'", "quality (an int in 10..95, default 10"]),
    ("jpeg:quality", ["bad parameter 'quality'", "key=value"]),
    ("jpeg:", ["bad countermeasure 'jpeg:'", "NAME[:key=value"]),
    ("jpeg++grayscale", ["bad countermeasure ''"]),
    ("jpeg:quality=10,quality=20", ["'quality' given twice"]),
    ("mixup:alpha=nan", ["alpha=nan", "out of range"]),
    ("blur:sigma=inf", ["sigma=inf", "out of range"]),
    ("adv+adv:eps=2", ["at most one training-task countermeasure", "adv and adv"]),
])
def test_malformed_specs_name_the_problem(text, words):
    with pytest.raises(ConfigError) as e:
        parse_countermeasures(text)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_python_keyword_construction_validates_too():
    assert get_countermeasure("jpeg")(quality=50).spec == "jpeg:quality=50"
    with pytest.raises(ConfigError, match="quality=True"):
        get_countermeasure("jpeg")(quality=True)
    with pytest.raises(ConfigError, match="quality=20.5"):
        get_countermeasure("jpeg")(quality=20.5)


# ------------------------------------------------------------------------ contract: input transforms


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", INPUTS)
def test_input_transform_contract(name, channels):
    data = random_dataset(n=12, size=12, channels=channels, num_classes=3)
    reference = random_dataset(n=12, size=12, channels=channels, num_classes=3, seed=1)  # clean images from elsewhere
    before = data.images.copy()
    c = one(EXAMPLES[name])
    assert isinstance(c, InputTransform)
    out = c(data, reference)
    assert out.images.shape == data.images.shape and out.images.dtype == np.uint8
    assert np.array_equal(out.labels, data.labels) and out.classes == data.classes
    assert np.array_equal(data.images, before)  # the input is not modified
    assert np.array_equal(c(data, reference).images, out.images)  # deterministic


def test_transform_data_applies_in_order_and_only_at_test_transforms_to_test_sets():
    data = rgb_dataset()
    cms = parse_countermeasures("jpeg:quality=20+grayscale")
    train_side = transform_data(cms, data)
    assert np.array_equal(train_side.images, one("grayscale")(one("jpeg:quality=20")(data)).images)
    test_side = transform_data(cms, data, test=True)  # a grayscale network sees grayscale test images ...
    assert np.array_equal(test_side.images, one("grayscale")(data).images)  # ... but no JPEG there
    assert transform_data([], data) is data


# ------------------------------------------------------------------------ contract: batch augmentations


@pytest.mark.parametrize("soft_in", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", BATCHES)
def test_batch_augment_contract(name, channels, soft_in):
    k = 5
    x = batch(c=channels)
    y = torch.arange(16) % k
    if soft_in:
        y = torch.softmax(torch.randn(16, k, generator=torch.Generator().manual_seed(1)), 1)
    c = one(EXAMPLES[name])
    assert isinstance(c, BatchAugment)
    torch.manual_seed(3)
    xa, ya = c.augment(x, y, k)
    assert xa.shape == x.shape and xa.dtype == x.dtype and xa.device == x.device
    assert xa.min() >= 0 and xa.max() <= 1
    assert not torch.equal(xa, x)
    if name in ("mixup", "cutmix") or soft_in:  # soft targets: (B, K), non-negative, rows sum to 1
        assert ya.shape == (16, k) and ya.dtype == torch.float32
        assert (ya >= 0).all() and torch.allclose(ya.sum(1), torch.ones(16))
    else:
        assert torch.equal(ya, y)  # labels untouched
    torch.manual_seed(3)  # deterministic given the seed ...
    xb, yb = c.augment(x, y, k)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    torch.manual_seed(4)  # ... and random across seeds
    assert not torch.equal(c.augment(x, y, k)[0], xa)


def test_make_batch_augment_chains_in_order_and_skips_other_kinds():
    assert make_batch_augment(parse_countermeasures("jpeg+adv"), 4) is None
    aug = make_batch_augment(parse_countermeasures("jpeg+cutout:size=3+mixup"), 4)
    x, y = batch(c=1), torch.arange(16) % 4
    torch.manual_seed(0)
    xa, ya = aug(x, y)
    torch.manual_seed(0)
    x1, y1 = one("cutout:size=3").augment(x, y, 4)
    x2, y2 = one("mixup").augment(x1, y1, 4)
    assert torch.equal(xa, x2) and torch.equal(ya, y2)


# ---------------------------------------------------------------------------- contract: every kind in train()


@pytest.mark.parametrize("name", list_countermeasures())
def test_training_with_each_countermeasure_is_deterministic_for_a_seed(name):
    data = random_dataset(n=32, size=8, channels=3, num_classes=4)
    cms = parse_countermeasures(EXAMPLES[name])

    def run(seed):
        m = create_model("lenet", 4, 3, seed=0)
        train(m, transform_data(cms, data, reference=data), TINY, task=wrap_task(cms, SupervisedTask()), device="cpu",
              seed=seed,
              progress=False, batch_augment=make_batch_augment(cms, 4))
        return _state(m)

    a, b = run(0), run(0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())


# ------------------------------------------------------------------------------ behaviour: input transforms


def test_jpeg_at_quality_10_changes_images_more_than_at_90(digits_small):
    for data in (digits_small, rgb_dataset(size=16)):
        err = {q: np.abs(one(f"jpeg:quality={q}")(data).images.astype(int) - data.images).mean() for q in (10, 90)}
        assert err[10] > err[90] > 0


def test_jpeg_matches_a_pillow_round_trip():
    import io

    from PIL import Image

    data = rgb_dataset(n=2)
    buf = io.BytesIO()
    Image.fromarray(data.images[1]).save(buf, format="JPEG", quality=40)
    assert np.array_equal(one("jpeg:quality=40")(data).images[1], np.asarray(Image.open(buf)))


def test_grayscale_channels_are_equal_and_use_luma():
    data = rgb_dataset()
    out = one("grayscale")(data).images
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    red = ImageDataset(np.tile(np.array([255, 0, 0], np.uint8), (2, 8, 8, 1)), [0, 1], ["a", "b"])
    assert (one("grayscale")(red).images == 76).all()  # round(0.299 * 255)
    gray = random_dataset(n=4, channels=1)
    assert np.array_equal(one("grayscale")(gray).images, gray.images)  # one channel: unchanged


def test_bitdepth_keeps_only_its_levels_and_removes_a_perturbation_below_half_a_step():
    data = rgb_dataset()
    out = one("bitdepth:bits=2")(data).images
    assert set(np.unique(out)) <= {0, 85, 170, 255} and len(np.unique(out)) == 4
    assert np.abs(out.astype(int) - data.images).max() <= 43  # rounding to the nearest level
    # a +-8 pattern on pixels at least 9 levels from any threshold (42.5 + 85 k) is gone entirely
    flat = ImageDataset(np.full((2, 8, 8, 3), 20, np.uint8), [0, 1], ["a", "b"])
    sign = np.where(np.indices((8, 8)).sum(0) % 2 == 0, 8, -8)[None, :, :, None]
    marked = ImageDataset((flat.images.astype(int) + sign).astype(np.uint8), [0, 1], ["a", "b"])
    assert np.array_equal(one("bitdepth:bits=2")(marked).images, one("bitdepth:bits=2")(flat).images)
    assert not np.array_equal(one("bitdepth:bits=7")(marked).images, one("bitdepth:bits=7")(flat).images)
    assert np.abs(one("bitdepth:bits=7")(data).images.astype(int) - data.images).max() <= 1  # 128 levels


def _high_frequency_energy(images: np.ndarray) -> float:
    """Energy of the discrete Laplacian (a high-pass filter) per pixel."""
    x = images.astype(np.float64)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float((lap ** 2).mean())


def test_blur_reduces_high_frequency_energy_more_with_larger_sigma():
    data = rgb_dataset(size=16)
    e = {s: _high_frequency_energy(one(f"blur:sigma={s}")(data).images) for s in (0.5, 1.0, 2.0)}
    e0 = _high_frequency_energy(data.images)
    assert e0 > e[0.5] > e[1.0] > e[2.0]
    assert e[1.0] < 0.1 * e0
    flat = ImageDataset(np.full((2, 8, 8, 3), 77, np.uint8), [0, 1], ["a", "b"])
    assert np.array_equal(one("blur:sigma=3")(flat).images, flat.images)  # a kernel larger than the image is fine


# --------------------------------------------------------------------------- behaviour: batch augmentations


def test_cutout_blanks_at_most_one_square_with_gray():
    x = torch.ones(64, 1, 12, 12)
    torch.manual_seed(0)
    xa, _ = one("cutout:size=4").augment(x, torch.zeros(64, dtype=torch.long), 2)
    blank = (xa == 0.5)
    assert torch.equal(blank | (xa == 1), torch.ones_like(blank))  # only gray or the original
    counts = blank.flatten(1).sum(1)
    assert (counts >= 4).all() and (counts <= 16).all() and (counts == 16).any()  # clipped at the borders
    rows, cols = blank.any(3).squeeze(1), blank.any(2).squeeze(1)  # blanked pixels form one rectangle
    assert torch.equal(counts, rows.sum(1) * cols.sum(1))


def test_mixup_blends_images_with_the_same_weights_as_the_targets():
    b = 8
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, 8, 8) / b  # image i is constant i/b
    torch.manual_seed(0)
    xa, t = one("mixup:alpha=1").augment(x, torch.arange(b), b)  # label i for image i
    expected = (t * torch.arange(b, dtype=torch.float32) / b).sum(1)  # the target-weighted mean of the values
    assert torch.allclose(xa[:, 0, 0, 0], expected, atol=1e-6)
    assert ((t > 0).sum(1) <= 2).all()


def test_cutmix_targets_equal_the_pasted_area():
    b = 8
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, 16, 16).contiguous() / b
    for seed in range(5):
        torch.manual_seed(seed)
        xa, t = one("cutmix:alpha=1").augment(x, torch.arange(b), b)
        for i in range(b):
            share = torch.stack([(xa[i] == v / b).float().mean() for v in range(b)])
            assert torch.allclose(share, t[i], atol=1e-6)


def test_ueraser_changes_images_strongly_and_strength_scales_it():
    x = batch(b=64, c=3, size=16)
    y = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    strong = (one("ueraser").augment(x, y, 2)[0] - x).abs().mean()
    torch.manual_seed(0)
    weak = (one("ueraser:strength=0.05").augment(x, y, 2)[0] - x).abs().mean()
    assert strong > 0.15 and weak < strong


# ------------------------------------------------------------------------------- adversarial training


@pytest.fixture(scope="module")
def fixed_cnn(digits_splits):
    m = create_model("cnn", 10, 1, seed=0)
    return train(m, digits_splits[0].per_class(20), Recipe(epochs=4, batch_size=32, lr=0.05, flip=False),
                 device="cpu", progress=False)


def test_pgd_increases_the_loss_stays_in_the_ball_and_leaves_the_model_alone(fixed_cnn, digits_splits):
    images, labels = digits_splits[1].tensors()
    x, y = images[:64].float() / 255, labels[:64]
    before = _state(fixed_cnn)
    grads = [None if p.grad is None else p.grad.clone() for p in fixed_cnn.parameters()]
    fixed_cnn.train()  # as inside the training loop
    losses = {}
    for eps in (2, 8):
        torch.manual_seed(0)
        task = AdversarialTask(eps=eps / 255, steps=5)
        xa = task.perturb(fixed_cnn, x, y)
        assert (xa - x).abs().max() <= eps / 255 + 1e-6
        assert xa.min() >= 0 and xa.max() <= 1
        with torch.no_grad():
            fixed_cnn.eval()
            losses[eps] = F.cross_entropy(fixed_cnn(xa), y).item()
            clean = F.cross_entropy(fixed_cnn(x), y).item()
            fixed_cnn.train()
    assert clean < losses[2] < losses[8]
    assert fixed_cnn.training  # the mode is restored
    after = _state(fixed_cnn)  # eval-mode attack: no BatchNorm statistics updated, no weights changed
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad)  # no gradient accumulated
               for g, p in zip(grads, fixed_cnn.parameters()))
    fixed_cnn.eval()


def test_adversarial_task_wraps_distillation_and_soft_targets(fixed_cnn, digits_small):
    x = digits_small.tensors()[0][:32].float() / 255
    student = create_model("lenet", 10, 1, seed=1)
    torch.manual_seed(0)
    adv = AdversarialTask(DistillTask(fixed_cnn), eps=8 / 255, steps=3)
    # ARD: the teacher's targets come from the clean batch, so the attack can only raise the student's loss
    assert adv.loss(student, x, None).item() > DistillTask(fixed_cnn).loss(student, x, None).item()
    calls = []
    hook = fixed_cnn.register_forward_hook(lambda m, i, o: calls.append(i[0]))
    try:
        adv.loss(student, x, None)
    finally:
        hook.remove()
    assert len(calls) == 1 and torch.equal(calls[0], x)  # one teacher pass, on the clean images
    soft = torch.softmax(torch.randn(32, 10), 1)
    assert torch.isfinite(AdversarialTask(eps=4 / 255, steps=1).loss(student, x, soft))
    with pytest.raises(ConfigError, match="eps > 0"):
        AdversarialTask(eps=0)


# --------------------------------------------------------------------------------------- linear probe


def test_probe_trains_the_head_only_and_keeps_the_features_batchnorm_statistics():
    data = random_dataset(n=32, size=8, channels=3, num_classes=4)

    def changed(cms):
        m = adapt_model(parse_countermeasures(cms), create_model("resnetc20", 4, 3, seed=0), [])
        before = {k: v.clone() for k, v in m.state_dict().items()}
        train(m, data, TINY, device="cpu", seed=0, progress=False)
        assert not m.training
        return {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}

    probe = changed("probe")
    assert probe == {"body.head.weight", "body.head.bias"}
    everything = changed("none")  # the control: without the probe the features and their statistics move
    assert any(k.endswith("running_mean") for k in everything) and any("conv" in k for k in everything)


def test_probe_on_a_pretrained_hacker_keeps_its_features(digits_small, digits_splits, tmp_path):
    """The transfer-learning attack: a hacker's own network from a file, only its head fitted to the set."""
    test = digits_splits[1].per_class(5)
    pretrained = create_model("cnn", 10, 1, seed=5)
    save_weights(tmp_path / "pre.safetensors", pretrained.state_dict())
    spec = HackerSpec.parse(f"cnn:normal:@{tmp_path / 'pre.safetensors'}")
    (rec,) = evaluate_set(digits_small, test, [], [spec], TINY, countermeasures="probe", data_label="protected",
                          device="cpu", progress=False)
    assert rec["countermeasures"] == "probe" and rec["init"] == "file:pre.safetensors"
    m = adapt_model(parse_countermeasures("probe"), create_model("cnn", 10, 1, seed=0), [])
    m.load_state_dict(pretrained.state_dict())
    train(m, digits_small, TINY, device="cpu", seed=0, progress=False)
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in m.state_dict().items() if ".head." not in k)
    assert not torch.equal(m.body.head.weight, pretrained.body.head.weight)


# ------------------------------------------------------------------------------------- θ0 + noise


def test_perturb_init_sigma_zero_is_theta0_and_distance_grows_with_sigma():
    theta0 = _state(create_model("cnn", 10, 3, seed=0))

    def noisy(sigma, seed=1):
        return _state(perturb_init(create_model("cnn", 10, 3, seed=0), sigma, seed=seed))

    assert all(torch.equal(theta0[k], v) for k, v in noisy(0.0).items())

    def dist(s):
        return sum(((s[k].float() - theta0[k].float()) ** 2).sum() for k in theta0).sqrt().item()

    d = [dist(noisy(s)) for s in (0.01, 0.1, 1.0)]
    assert 0 < d[0] < d[1] < d[2]
    assert d[2] / d[1] == pytest.approx(10, rel=1e-4)  # the same noise direction, scaled: linear in sigma
    w = "body.head.weight" if "body.head.weight" in theta0 else next(k for k in theta0 if k.endswith("weight"))
    rel = ((noisy(0.1)[w] - theta0[w]).std() / theta0[w].std()).item()
    assert rel == pytest.approx(0.1, rel=0.2)  # noise relative to the tensor's own spread
    assert all(torch.equal(a, b) for a, b in zip(noisy(0.1).values(), noisy(0.1).values()))
    assert not all(torch.equal(a, b) for a, b in zip(noisy(0.1, seed=2).values(), noisy(0.1).values()))
    buffers = [k for k in theta0 if "running" in k]
    assert buffers and all(torch.equal(noisy(1.0)[k], theta0[k]) for k in buffers)


@pytest.mark.parametrize("text, spec", [
    ("cnn:normal:theta0+0.05", HackerSpec("cnn", "normal", 1, 0.05)),
    ("cnn:distill:theta0+0.1:3", HackerSpec("cnn", "distill", 3, 0.1)),
    ("cnn:normal:theta0", HackerSpec("cnn", "normal", 1, 0.0)),
    ("lenet:distill:2", HackerSpec("lenet", "distill", 2)),
    ("resnetc20:normal:@runs/pre-s1.safetensors", HackerSpec("resnetc20", "normal", theta0="runs/pre-s1.safetensors")),
])
def test_hacker_spec_with_theta0_noise_parses_and_round_trips(text, spec):
    assert HackerSpec.parse(text) == spec
    assert HackerSpec.parse(spec.spec) == spec


@pytest.mark.parametrize("text", ["cnn:normal:theta0-1", "cnn:normal:theta0+abc", "cnn:normal:3:4",
                                  "cnn:normal:theta0+-0.1", "cnn:normal:theta0+0.1:x"])
def test_bad_theta0_hacker_specs_raise(text):
    with pytest.raises(ConfigError, match="hacker"):
        HackerSpec.parse(text)


# --------------------------------------------------------------------------------- evaluate_set


def _authorized():
    return [("cnn", create_model("cnn", 10, 1, seed=0), "theta0")]


def test_theta0_hacker_with_sigma_zero_repeats_the_authorized_network(digits_small, digits_splits):
    test = digits_splits[1].per_class(5)
    hackers = [HackerSpec.parse("cnn:normal:theta0"), HackerSpec.parse("cnn:normal:theta0+3")]
    recs = evaluate_set(digits_small, test, _authorized(), hackers, TINY, data_label="protected", device="cpu",
                        progress=False, recipes={"cnn": Recipe(epochs=1, lr=0.5)})  # ignored: θ0 hackers use `recipe`
    auth, same, far = recs
    assert same["test_acc"] == auth["test_acc"] and same["train_acc"] == auth["train_acc"]
    assert same["init"] == "theta0+noise0.0:seed1" and same["init_noise"] == 0.0 and same["recipe"] == auth["recipe"]
    assert far["init_noise"] == 3.0
    with pytest.raises(ConfigError, match="no authorized network is a lenet"):
        evaluate_set(digits_small, test, _authorized(), [HackerSpec("lenet", init_noise=0.1)], TINY,
                     data_label="protected", device="cpu", progress=False)


def test_hacker_from_a_file_starts_there(digits_small, digits_splits, tmp_path):
    """A hacker with its own (e.g. pretrained) weights: from the authorized θ0's file it repeats that network."""
    test = digits_splits[1].per_class(5)
    save_weights(tmp_path / "theta0.safetensors", _authorized()[0][1].state_dict())
    spec = HackerSpec.parse(f"cnn:normal:@{tmp_path / 'theta0.safetensors'}")
    auth, same, other = evaluate_set(digits_small, test, _authorized(), [spec, HackerSpec("cnn")], TINY,
                                     data_label="protected", device="cpu", progress=False)
    assert same["init"] == "file:theta0.safetensors" and same["test_acc"] == auth["test_acc"]
    assert same["train_acc"] == auth["train_acc"] and other["train_acc"] != auth["train_acc"]
    assert spec.key == "cnn_normal_at-theta0"


def test_evaluate_set_leaves_the_theta0_networks_untouched_for_the_next_grid(digits_small, digits_splits):
    """A benchmark reuses one authorized list for every countermeasure: each grid must start from θ0."""
    test = digits_splits[1].per_class(5)
    authorized = _authorized()
    theta0 = {k: v.clone() for k, v in authorized[0][1].state_dict().items()}
    kw = {"data_label": "protected", "device": "cpu", "progress": False}
    first = evaluate_set(digits_small, test, authorized, [], TINY, **kw)
    assert all(torch.equal(v, theta0[k]) for k, v in authorized[0][1].state_dict().items())
    again = evaluate_set(digits_small, test, authorized, [], TINY, **kw)
    assert again[0]["train_acc"] == first[0]["train_acc"] and again[0]["test_acc"] == first[0]["test_acc"]


def test_evaluate_set_records_and_file_names_carry_the_countermeasures(digits_small, digits_splits, tmp_path):
    test = digits_splits[1].per_class(5)
    hackers = [HackerSpec("lenet")]
    kw = {"data_label": "protected", "out_dir": tmp_path, "device": "cpu", "progress": False}
    plain = evaluate_set(digits_small, test, _authorized(), hackers, TINY, **kw)
    jpeg = evaluate_set(digits_small, test, _authorized(), hackers, TINY, countermeasures="jpeg:quality=20", **kw)
    both = evaluate_set(digits_small, test, _authorized(), hackers, TINY, countermeasures="cutout:size=3",
                        authorized_countermeasures="mixup:alpha=0.5", **kw)
    assert {f.name for f in tmp_path.glob("*.json")} == {
        "protected_authorized0_cnn.json", "protected_hacker_lenet_normal_s1.json",  # unchanged without any
        "protected_hacker_lenet_normal_s1__jpeg-quality20.json",
        "protected_authorized0_cnn__mixup-alpha0.5.json", "protected_hacker_lenet_normal_s1__cutout-size3.json"}
    assert [r["countermeasures"] for r in plain] == [None, None]
    assert [r["countermeasures"] for r in jpeg] == [None, "jpeg:quality=20"]  # the authorized record is reused
    assert [r["countermeasures"] for r in both] == ["mixup:alpha=0.5", "cutout:size=3"]
    stored = json.loads((tmp_path / "protected_hacker_lenet_normal_s1__jpeg-quality20.json").read_text())
    assert stored == jpeg[1]
    table = format_table(plain + jpeg[1:] + both)
    assert "| countermeasures |" in table and "| jpeg:quality=20 |" in table and "| mixup:alpha=0.5 |" in table
    assert "countermeasures" not in format_table(plain)  # tables without countermeasures are unchanged
    with pytest.raises(ConfigError, match="other settings: epochs=1 \\(now 2\\)"):  # never reuse a stale record
        evaluate_set(digits_small, test, _authorized(), hackers, Recipe(epochs=2, batch_size=16, lr=0.05, flip=False),
                     **kw)
    with pytest.raises(ConfigError, match="unknown countermeasure"):
        evaluate_set(digits_small, test, _authorized(), hackers, TINY, countermeasures="jpg", **kw)


# ----------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def published(tmp_path_factory, digits_splits):
    """A published set without perturbation (written by the real publish code, no generator training)."""
    from uge.published import publish
    from uge.result import Protection

    data = digits_splits[0].per_class(10)
    cfg = tiny_config()
    result = Protection(protected=data, method="uge", params={}, rho=cfg.rho, authorized=list(cfg.authorized),
                        theta0=[create_model("cnn", 10, 1, seed=0).state_dict()], recipe=cfg.recipe)
    return publish(result, data, tmp_path_factory.mktemp("cm") / "pub",
                   source={"data": "digits", "split": "train", "per_class": 10, "subset_seed": 0})


def test_cli_evaluate_with_a_countermeasure_writes_records_that_name_it(published, tmp_path, capsys):
    argv = ["evaluate", str(published), "--hackers", "lenet", "--epochs", "1", "--test-per-class", "5", "--quiet",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main([*argv, "--countermeasure", "jpeg:quality=20"]) == 0
    out = capsys.readouterr().out
    assert "| lenet | normal | seed:1 | jpeg:quality=20 |" in out
    hacker = json.loads((tmp_path / "protected_hacker_lenet_normal_s1__jpeg-quality20.json").read_text())
    assert hacker["countermeasures"] == "jpeg:quality=20" and hacker["role"] == "hacker"
    assert json.loads((tmp_path / "protected_authorized0_cnn.json").read_text())["countermeasures"] is None
    assert (tmp_path / "table__jpeg-quality20.md").exists() and not (tmp_path / "table.md").exists()
    assert main([*argv, "--countermeasure", "jpeg:quality=3"]) == 2
    assert "quality=3 is out of range; allowed: an int in 10..95" in capsys.readouterr().err


def test_cli_lists_countermeasures_and_train_takes_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--countermeasure", "list"])
    assert e.value.code == 0
    listing = capsys.readouterr().out
    assert all(f"{n} (" in listing for n in list_countermeasures()) and "quality (an int in 10..95" in listing
    rec = tmp_path / "r.json"
    assert main(["train", "--data", "digits", "--per-class", "5", "--test-per-class", "5", "--arch", "lenet",
                 "--epochs", "1", "--batch-size", "16", "--quiet", "--device", "cpu", "--record", str(rec),
                 "--countermeasure", "grayscale+cutmix:alpha=0.5"]) == 0
    assert json.loads(rec.read_text())["countermeasures"] == "grayscale+cutmix:alpha=0.5"
