"""The training loop: recipe validation, lr schedule, augmentation, determinism, learning, distillation,
trajectory recording."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_dataset

from uge.data import ImageDataset
from uge.errors import ConfigError
from uge.models import create_model
from uge.training import DistillTask, Recipe, accuracy, augment, predict, record_trajectory, train

CHANCE = 10.0  # digits: 10 balanced classes


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ Recipe


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("batch_size", 1), ("lr", 0.0), ("lr", -0.1), ("momentum", 1.0), ("momentum", -0.1),
    ("weight_decay", -1e-4), ("warmup", 1.0), ("warmup", -0.1), ("schedule", "step"), ("temperature", 0.0),
])
def test_recipe_rejects_bad_value_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        Recipe(**{field: value})


def test_recipe_error_names_every_bad_field_and_only_those():
    with pytest.raises(ConfigError) as e:
        Recipe(epochs=0, lr=-1)
    msg = str(e.value)
    assert "epochs" in msg and "lr" in msg
    assert "batch_size" not in msg and "momentum" not in msg


def test_recipe_dict_round_trip_and_unknown_key():
    r = Recipe(epochs=3, batch_size=16, lr=0.02, schedule="cosine", flip=False)
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ConfigError, match="learning_rate"):
        Recipe.from_dict({**r.to_dict(), "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="epochs"):  # from_dict validates too
        Recipe.from_dict({**r.to_dict(), "epochs": 0})


# ------------------------------------------------------------------------------ lr schedule


def _lrs(recipe: Recipe, total: int) -> np.ndarray:
    return np.array([recipe.lr_at(s, total) for s in range(total)])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_warmup_rises_to_the_peak(schedule):
    r = Recipe(lr=0.1, warmup=0.1, schedule=schedule)
    lrs = _lrs(r, 100)
    warm = lrs[:10]
    assert 0 < warm[0] < warm[-1]
    assert np.all(np.diff(warm) > 0)
    assert warm[-1] == pytest.approx(0.1)
    assert lrs.max() == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_decays_to_about_zero_at_the_end(schedule):
    r = Recipe(lr=0.1, warmup=0.1, schedule=schedule)
    lrs = _lrs(r, 200)
    after = lrs[20:]
    assert after[0] == pytest.approx(0.1)
    assert np.all(np.diff(after) <= 1e-12)  # non-increasing after the warmup
    assert after[-1] < 0.1 * 0.01  # ~0 on the last step
    assert r.lr_at(200, 200) == pytest.approx(0.0, abs=1e-12)
    assert r.lr_at(110, 200) == pytest.approx(0.05, rel=0.02)  # half-way through the decay: half the lr


def test_lr_linear_is_linear():
    r = Recipe(lr=0.2, warmup=0.0, schedule="linear")
    assert [r.lr_at(s, 4) for s in range(4)] == pytest.approx([0.2, 0.15, 0.1, 0.05])


def test_lr_constant_after_warmup_and_no_warmup():
    r = Recipe(lr=0.05, warmup=0.2, schedule="constant")
    lrs = _lrs(r, 50)
    assert np.allclose(lrs[10:], 0.05)
    assert lrs[0] < 0.05
    assert np.allclose(_lrs(Recipe(lr=0.05, warmup=0.0, schedule="constant"), 7), 0.05)


def test_lr_tiny_total_does_not_divide_by_zero():
    r = Recipe(lr=0.1, warmup=0.1)  # int(0.1 * 3) == 0 warmup steps
    lrs = _lrs(r, 3)
    assert np.all(np.isfinite(lrs)) and lrs[0] == pytest.approx(0.1)


# ------------------------------------------------------------------------------- augment


def _batch(b=64, c=1, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


@pytest.mark.parametrize("crop, flip", [(True, True), (True, False), (False, True)])
def test_augment_keeps_shape_dtype_range(crop, flip):
    x = _batch(c=3, h=12, w=10)
    y = augment(x, crop=crop, flip=flip)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1


def test_augment_off_is_identity():
    x = _batch()
    assert torch.equal(augment(x, crop=False, flip=False), x)


def test_augment_flip_only_gives_original_or_mirror_and_both_occur():
    torch.manual_seed(0)
    x = _batch()
    y = augment(x, crop=False, flip=True)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(3)).flatten(1).all(1)
    assert torch.all(same | mirrored)
    assert same.any() and mirrored.any()


def test_augment_flips_every_image_when_forced(monkeypatch):
    x = _batch(b=8)
    zeros = torch.zeros
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: zeros(*shape, **kw))  # all draws < 0.5: flip
    y = augment(x, crop=False, flip=True)
    assert torch.equal(y, x.flip(3))
    assert not torch.equal(y, x)


def test_augment_crop_shifts_content_by_at_most_the_padding():
    torch.manual_seed(0)
    x = _batch(b=64, c=2, h=16, w=16)
    p = 2  # 16 / 8
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    y = augment(x, crop=True, flip=False)
    shifted = 0
    for i in range(len(x)):
        offsets = [(oy, ox) for oy in range(2 * p + 1) for ox in range(2 * p + 1)
                   if torch.equal(y[i], xp[i, :, oy:oy + 16, ox:ox + 16])]
        assert offsets, f"image {i} is not a {p}-pixel shift of its input"
        shifted += offsets[0] != (p, p)
    assert shifted > len(x) // 2  # 24 of 25 offsets move the content


def test_augment_crop_pads_at_least_one_pixel_on_tiny_images():
    torch.manual_seed(1)
    x = torch.ones(32, 1, 8, 8)
    y = augment(x, crop=True, flip=False)
    assert (y == 0).any(), "a shifted all-ones image must show zero padding"
    assert (y.flatten(1).sum(1) >= 8 * 8 - 15).all()  # at most one row and one column of padding


# ------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def small(digits_splits):
    return digits_splits[0].per_class(10)


def test_train_is_deterministic_for_a_seed_and_varies_with_it(small):
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05, crop=True, flip=True)  # exercise the augmentation RNG
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        m = create_model("lenet", small.num_classes, small.channels, seed=0)
        runs[name] = _state(train(m, small, recipe, device="cpu", seed=seed, progress=False))
    assert _equal_states(runs["a"], runs["b"])
    assert not _equal_states(runs["a"], runs["c"])


def test_train_changes_weights_returns_eval_model_and_leaves_global_rng_alone(small):
    m = create_model("lenet", small.num_classes, small.channels, seed=0)
    before = _state(m)
    rng_before = torch.get_rng_state()
    out = train(m, small, Recipe(epochs=1, batch_size=32, flip=False), device="cpu", progress=False)
    assert out is m and not m.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not _equal_states(before, _state(m))


def test_train_calls_on_epoch_after_every_epoch(small):
    seen = []
    m = create_model("lenet", small.num_classes, small.channels)
    train(m, small, Recipe(epochs=3, batch_size=50, flip=False), device="cpu", progress=False,
          on_epoch=lambda e, model: seen.append((e, model is m)))
    assert seen == [(1, True), (2, True), (3, True)]


def test_train_divergence_raises(small):
    m = create_model("lenet", small.num_classes, small.channels)
    with pytest.raises(FloatingPointError, match="diverged"):
        train(m, small, Recipe(epochs=2, batch_size=32, lr=1e12, warmup=0, flip=False), device="cpu",
              progress=False)


@pytest.fixture(scope="module")
def trained_cnn(digits_splits):
    """A cnn trained on 30 digits per class for 8 epochs (about a second on one core)."""
    train_set, _ = digits_splits
    m = create_model("cnn", 10, 1, seed=0)
    return train(m, train_set.per_class(30), Recipe(epochs=8, batch_size=32, lr=0.05, flip=False), device="cpu",
                 progress=False)


def test_authorized_cnn_learns_digits(trained_cnn, digits_splits):
    _, test = digits_splits
    untrained = accuracy(create_model("cnn", 10, 1, seed=0), test)
    acc = accuracy(trained_cnn, test)
    assert acc > 70, f"cnn reached only {acc:.1f}% on the digits test split"
    assert acc > untrained + 40


def test_accuracy_matches_a_manual_count(trained_cnn, digits_splits):
    _, test = digits_splits
    images, labels = test.tensors()
    pred = predict(trained_cnn, images).argmax(1)
    assert accuracy(trained_cnn, test) == pytest.approx((pred == labels).float().mean().item() * 100)
    # predict treats uint8 as 0..255 and floats as [0, 1]
    assert torch.allclose(predict(trained_cnn, images), predict(trained_cnn, images.float() / 255), atol=1e-5)


def test_distillation_from_a_trained_teacher_ignores_labels(trained_cnn, digits_splits):
    train_set, test = digits_splits
    data = train_set.per_class(30, seed=1)
    # Scramble the labels: a distilled student must learn from the teacher's outputs alone.
    scrambled = ImageDataset(data.images, np.random.default_rng(0).permutation(data.labels), data.classes)
    student = create_model("cnn", 10, 1, seed=1)
    train(student, scrambled, Recipe(epochs=8, batch_size=32, lr=0.05, flip=False), task=DistillTask(trained_cnn),
          device="cpu", progress=False)
    acc = accuracy(student, test)
    assert acc > 7 * CHANCE, f"distilled student reached only {acc:.1f}%"
    assert not trained_cnn.training  # the teacher stays frozen in eval mode
    assert all(not p.requires_grad for p in trained_cnn.parameters())
    # the same scrambled labels teach a supervised network nothing
    supervised = create_model("cnn", 10, 1, seed=1)
    train(supervised, scrambled, Recipe(epochs=8, batch_size=32, lr=0.05, flip=False), device="cpu", progress=False)
    assert accuracy(supervised, test) < 3 * CHANCE


def test_distill_task_loss_is_zero_for_the_teacher_itself(trained_cnn, digits_splits):
    x = digits_splits[1].tensors()[0][:16].float() / 255
    task = DistillTask(trained_cnn, temperature=4.0)
    assert task.loss(trained_cnn, x, None).item() == pytest.approx(0.0, abs=1e-5)
    other = create_model("cnn", 10, 1, seed=5).eval()
    assert task.loss(other, x, None).item() > 1e-3


# --------------------------------------------------------------------------- trajectory


def test_record_trajectory_returns_initial_and_per_epoch_states(small):
    m = create_model("lenet", small.num_classes, small.channels, seed=3)
    init = _state(m)
    states = record_trajectory(m, small, Recipe(epochs=4, batch_size=32, flip=False), steps=3, device="cpu",
                               progress=False)
    assert len(states) == 4
    assert _equal_states(states[0], init)
    assert _equal_states(states[-1], _state(m))  # the model holds θT on return
    for a in range(len(states)):
        for b in range(a + 1, len(states)):
            assert not _equal_states(states[a], states[b]), f"θ{a} == θ{b}"
    # the states are copies, not views of the live parameters
    last = {k: v.clone() for k, v in states[-1].items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    assert _equal_states(states[-1], last) and not _equal_states(states[-1], _state(m))
    assert all(v.device.type == "cpu" for s in states for v in s.values())


def test_stop_after_keeps_the_schedule_of_the_full_recipe(small, monkeypatch):
    full = Recipe(epochs=4, batch_size=25, lr=0.05, flip=False)  # 4 steps per epoch, 16 in all

    def run(recipe, **kw):
        m = create_model("lenet", small.num_classes, small.channels, seed=0)
        return _state(train(m, small, recipe, device="cpu", progress=False, **kw))

    # 2 of 4 epochs == the state after epoch 2 of the full run ...
    at_epoch_2 = {}
    m = create_model("lenet", small.num_classes, small.channels, seed=0)
    train(m, small, full, device="cpu", progress=False,
          on_epoch=lambda e, model: at_epoch_2.update(_state(model)) if e == 2 else None)
    stopped = run(full, stop_after=2)
    assert _equal_states(stopped, at_epoch_2)
    # ... and not a 2-epoch recipe (whose lr would decay to 0 by the end of epoch 2)
    assert not _equal_states(stopped, run(Recipe(epochs=2, batch_size=25, lr=0.05, flip=False)))

    calls = []
    orig = Recipe.lr_at
    monkeypatch.setattr(Recipe, "lr_at", lambda self, s, t: calls.append((s, t)) or orig(self, s, t))
    run(full, stop_after=2)
    assert list(dict.fromkeys(calls)) == [(s, 16) for s in range(8)]  # (once per parameter group)


def test_train_drops_the_last_partial_batch_and_handles_batch_larger_than_data(monkeypatch):
    data = random_dataset(n=10, num_classes=2)
    calls = []
    m = create_model("lenet", 2, 1)
    orig = Recipe.lr_at
    monkeypatch.setattr(Recipe, "lr_at", lambda self, s, t: calls.append((s, t)) or orig(self, s, t))
    train(m, data, Recipe(epochs=2, batch_size=4, flip=False), device="cpu", progress=False)  # 10 // 4 = 2 steps
    assert list(dict.fromkeys(calls)) == [(s, 4) for s in range(4)]  # (once per parameter group)
    calls.clear()
    train(m, data, Recipe(epochs=1, batch_size=64, flip=False), device="cpu", progress=False)
    assert list(dict.fromkeys(calls)) == [(0, 1)]  # one full-data batch
