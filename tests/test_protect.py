"""The protector: quantization within the budget, the generator's ρ-ball, a tiny end-to-end run, the
per-loss histories, the generator actually optimizing its loss, resuming after an interruption, and
several authorized networks."""
from __future__ import annotations

import importlib
import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from uge.config import AuthorizedSpec
from uge.errors import ConfigError
from uge.models import create_model
from uge.protectors.uge import Generator, generate, protect
from uge.published import publish, read_published, verify
from uge.result import Protection, quantize

# the modules of UGE whose names the tests below patch: the trajectories and L_ud's teacher are trained in
# workdir, the offline feature encoder in objective
workdir_mod = importlib.import_module("uge.protectors.uge.workdir")
objective_mod = importlib.import_module("uge.protectors.uge.objective")


@pytest.fixture(autouse=True)
def _quiet_fallback_warning():
    logging.getLogger("uge").setLevel(logging.ERROR)  # the offline-encoder warning on every run
    yield
    logging.getLogger("uge").setLevel(logging.NOTSET)


def _levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fail(*_, **__):
    raise AssertionError("this stage should have been resumed from the work folder, not rerun")


# ------------------------------------------------------------------------------- quantize


def test_quantize_clamps_where_rounding_would_overshoot_the_budget():
    rho = 10.6 / 255  # allows 10 whole levels; x ± 10.6 rounds to x ± 11
    x8 = torch.tensor([100, 100, 5, 250, 0, 255], dtype=torch.uint8)
    x_u = torch.tensor([100 + 10.6, 100 - 10.6, 5 - 10.6, 250 + 10.6, 0.0, 255.0]) / 255
    q = quantize(x_u, x8, rho)
    assert q.dtype == torch.uint8
    assert q.tolist() == [110, 90, 0, 255, 0, 255]
    assert (q.to(torch.int16) - x8.to(torch.int16)).abs().max() <= math.floor(255 * rho)


def test_quantize_keeps_exactly_representable_budget_and_rounds_inside_it():
    rho = 10 / 255  # 255 * rho is 9.999999... in floating point: still 10 levels
    x8 = torch.tensor([50, 50, 50], dtype=torch.uint8)
    x_u = torch.tensor([60.0, 40.0, 53.4]) / 255
    assert quantize(x_u, x8, rho).tolist() == [60, 40, 53]


def test_quantize_random_inputs_stay_in_budget_and_range():
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    for rho in (1 / 255, 0.02, 0.04, 10.6 / 255, 0.5):
        x_u = torch.rand(x8.shape, generator=g) * 1.4 - 0.2  # far outside the ball and [0, 1]
        q = quantize(x_u, x8, rho)
        assert q.dtype == torch.uint8 and q.shape == x8.shape
        diff = (q.to(torch.int16) - x8.to(torch.int16)).abs()
        assert diff.max() <= math.floor(255 * rho + 1e-9)
        assert diff.max() >= 1  # and it does move pixels


# ------------------------------------------------------------------------------ generator


def _check_ball(out: torch.Tensor, x: torch.Tensor, rho: float):
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= rho + 1e-6


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 12), (3, 10)])
def test_generator_output_respects_the_ball_and_unit_range(channels, size):
    torch.manual_seed(0)
    rho = 0.04
    gen = Generator(channels, rho, width=4)
    x = torch.rand(6, channels, size, size)
    x[0] = 0.0
    x[1] = 1.0
    for mode in (gen.train, gen.eval):
        mode()
        _check_ball(gen(x), x, rho)
    assert not torch.equal(gen.eval()(x), x)  # it does perturb the images


def _scaled_generator(rho: float, scale: float, mode: str) -> Generator:
    torch.manual_seed(0)
    gen = Generator(1, rho, width=4)
    with torch.no_grad():
        for p in gen.parameters():
            p.mul_(scale)
    return gen.train() if mode == "train" else gen.eval()


def _extreme_batch(rho: float):
    torch.manual_seed(1)
    x = torch.rand(8, 1, 8, 8)
    x[0], x[1] = 0.0, 1.0
    return x, (x > rho) & (x < 1 - rho)


@pytest.mark.parametrize("mode, scale", [("train", 1e4), ("train", 1e6), ("eval", 10.0)])
def test_generator_stays_in_the_ball_with_huge_weights(mode, scale):
    rho = 0.03
    x, interior = _extreme_batch(rho)
    with torch.no_grad():
        out = _scaled_generator(rho, scale, mode)(x)
    _check_ball(out, x, rho)
    # saturated tanh: the perturbation sits on the ball's surface wherever the [0, 1] clamp does not bite
    assert torch.allclose((out - x).abs()[interior], torch.full_like(out[interior], rho), atol=1e-5)


def test_generator_output_is_finite_and_in_the_ball_even_when_activations_overflow():
    rho = 0.03
    x, _ = _extreme_batch(rho)
    with torch.no_grad():
        out = _scaled_generator(rho, 100.0, "eval")(x)
    assert torch.isfinite(out).all()
    _check_ball(out, x, rho)


# ------------------------------------------------------------------------------ tiny protect run


@pytest.fixture(scope="module")
def tiny_run(digits_small, tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny") / "work"
    cfg = tiny_config()
    return protect(digits_small, cfg, device="cpu", work_dir=work, progress=False), cfg, work


def test_tiny_protect_run_returns_a_protection_within_budget(tiny_run, digits_small):
    result, cfg, _ = tiny_run
    assert isinstance(result, Protection)
    prot = result.protected
    assert prot.images.shape == digits_small.images.shape and prot.images.dtype == np.uint8
    assert _levels(prot.images, digits_small.images) <= math.floor(255 * cfg.rho + 1e-9)  # 0.04 -> 10 levels
    assert np.array_equal(prot.labels, digits_small.labels)
    assert prot.classes == digits_small.classes


def test_tiny_protect_run_changes_the_images(tiny_run, digits_small):
    changed = tiny_run[0].protected.images != digits_small.images
    assert changed.mean() > 0.05, f"only {changed.mean():.1%} of the pixels changed"


def test_a_few_generator_epochs_change_many_pixels_within_budget(digits_small):
    cfg = tiny_config(losses=("fd",), generator_epochs=4)
    prot = protect(digits_small, cfg, device="cpu", progress=False).protected
    changed = prot.images != digits_small.images
    assert changed.mean() > 0.1, f"only {changed.mean():.1%} of the pixels changed"
    assert 1 <= _levels(prot.images, digits_small.images) <= 10


def test_tiny_protect_run_records_theta0_history_and_cleans_up(tiny_run, digits_small):
    result, cfg, work = tiny_run
    assert result.method == "uge" and result.seed == cfg.seed and result.rho == cfg.rho
    assert result.params == {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    assert result.authorized == cfg.authorized and result.recipe == cfg.recipe
    assert len(result.theta0) == 1
    assert _equal_states(result.theta0[0], create_model("cnn", 10, 1, seed=0).state_dict())
    assert [h["epoch"] for h in result.history] == [1]
    rec = result.history[0]
    assert set(rec) == {"epoch", "gm", "fd", "ud", "total", "diag_gm_authorized", "diag_gm_hacker",
                        "diag_fd_target_rate", "diag_surrogate_acc"}
    assert all(math.isfinite(v) for v in rec.values())
    assert 0 <= rec["diag_fd_target_rate"] <= 1 and 0 <= rec["diag_surrogate_acc"] <= 1
    assert rec["total"] == pytest.approx(rec["gm"] + rec["fd"] + rec["ud"], rel=1e-5, abs=1e-6)
    assert result.feature_space.startswith("encoder")
    assert {"trajectory", "feature_space", "generator", "generate"} <= set(result.seconds)
    assert not work.exists(), "the work folder must be removed after success unless keep_work"


def test_protect_without_work_dir_leaves_no_temp_folder(digits_small, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    protect(digits_small, tiny_config(losses=("fd",)), device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_protect_is_deterministic(digits_small, tiny_run):
    again = protect(digits_small, tiny_config(), device="cpu", progress=False)
    assert np.array_equal(again.protected.images, tiny_run[0].protected.images)


@pytest.mark.parametrize("losses", [("gm",), ("ud",), ("gm", "fd"), ("fd", "ud")])
def test_history_holds_only_the_enabled_losses(digits_small, losses):
    result = protect(digits_small, tiny_config(losses=losses, generator_epochs=2), device="cpu", progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]
    for rec in result.history:
        assert {k for k in rec if not k.startswith("diag_")} == {"epoch", "total", *losses}
        assert rec["total"] == pytest.approx(sum(rec[k] for k in losses), rel=1e-5, abs=1e-6)
    assert (result.feature_space == "none") == ("fd" not in losses)


def test_fd_only_runs_and_reports_its_feature_space(digits_small):
    result = protect(digits_small, tiny_config(losses=("fd",)), device="cpu", progress=False)
    assert set(result.history[0]) == {"epoch", "fd", "total", "diag_fd_target_rate", "diag_surrogate_acc"}
    assert result.feature_space.startswith("encoder")
    # θ0 is still published for the authorized network
    assert _equal_states(result.theta0[0], create_model("cnn", 10, 1, seed=0).state_dict())


def _no_trajectory(*_, **__):
    raise AssertionError("record_trajectory was called although no enabled loss uses the trajectory")


def test_fd_only_does_not_train_a_trajectory(digits_small, monkeypatch):
    monkeypatch.setattr(workdir_mod, "record_trajectory", _no_trajectory)
    result = protect(digits_small, tiny_config(losses=("fd",)), device="cpu", progress=False)
    assert _equal_states(result.theta0[0], create_model("cnn", 10, 1, seed=0).state_dict())


@pytest.mark.parametrize("loss", ["gm", "fd"])
def test_generator_loss_decreases(digits_small, loss):
    cfg = tiny_config(losses=(loss,), generator_epochs=6, generator_lr=1e-2)
    history = protect(digits_small, cfg, device="cpu", progress=False).history
    values = [h[loss] for h in history]
    first, last = np.mean(values[:2]), np.mean(values[-2:])
    assert last < first, values
    assert last < (0.85 if loss == "gm" else 0.97) * first, values


def test_protect_rejects_unknown_arch_before_training(digits_small, monkeypatch):
    monkeypatch.setattr(workdir_mod, "record_trajectory", _fail)
    with pytest.raises(ConfigError, match="nosuchnet"):
        protect(digits_small, tiny_config(authorized=[AuthorizedSpec("nosuchnet", 0)]), device="cpu",
                progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_protect_cuda_without_gpu_is_a_config_error(digits_small):
    with pytest.raises(ConfigError, match="cuda"):
        protect(digits_small, tiny_config(), device="cuda", progress=False)


# ------------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_from_the_work_folder(digits_small, tmp_path, monkeypatch):
    cfg = tiny_config(generator_epochs=2)
    work = tmp_path / "work"
    real_save = torch.save
    calls = []

    def save_then_interrupt(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # the checkpoint after generator epoch 2
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        protect(digits_small, cfg, device="cpu", work_dir=work, progress=False)
    monkeypatch.setattr(torch, "save", real_save)

    assert {p.name for p in work.iterdir()} >= {"config.json", "trajectory_0.safetensors", "encoder.safetensors",
                                                 "generator.pt"}
    ckpt = torch.load(work / "generator.pt", weights_only=True)
    assert ckpt["done"] == 1 and len(ckpt["history"]) == 1
    epoch1 = ckpt["history"][0]

    # another config must not be mixed into this work folder
    with pytest.raises(ConfigError, match="another config"):
        protect(digits_small, tiny_config(generator_epochs=3), device="cpu", work_dir=work, progress=False)

    # the same config resumes: no trajectory, no encoder training, only generator epoch 2
    monkeypatch.setattr(workdir_mod, "record_trajectory", _fail)
    monkeypatch.setattr(workdir_mod, "train", _fail)
    monkeypatch.setattr(objective_mod, "train", _fail)
    result = protect(digits_small, cfg, device="cpu", work_dir=work, progress=False, keep_work=True)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[0] == epoch1
    assert _equal_states(result.theta0[0], create_model("cnn", 10, 1, seed=0).state_dict())
    assert _levels(result.protected.images, digits_small.images) <= 10
    assert torch.load(work / "generator.pt", weights_only=True)["done"] == 2
    assert json.loads((work / "config.json").read_text()) == cfg.to_dict()

    # a finished run reruns nothing and regenerates the same images
    again = protect(digits_small, cfg, device="cpu", work_dir=work, progress=False)
    assert again.history == result.history
    assert np.array_equal(again.protected.images, result.protected.images)
    assert not work.exists()  # keep_work=False this time


# ------------------------------------------------------------------------ several authorized


def test_two_authorized_networks_protect_and_publish_two_theta0(digits_small, tmp_path):
    cfg = tiny_config(authorized=[AuthorizedSpec("cnn", 0), AuthorizedSpec("cnn", 1)])
    result = protect(digits_small, cfg, device="cpu", progress=False)
    assert len(result.theta0) == 2
    for seed, state in enumerate(result.theta0):
        assert _equal_states(state, create_model("cnn", 10, 1, seed=seed).state_dict())
    assert not _equal_states(result.theta0[0], result.theta0[1])
    assert _levels(result.protected.images, digits_small.images) <= 10

    out = publish(result, digits_small, tmp_path / "pub")
    files = sorted(p.name for p in (out / "authorized").iterdir())
    assert files == ["theta0_0.safetensors", "theta0_1.safetensors"]
    pub = read_published(out)
    assert [a["seed"] for a in pub.manifest["authorized"]] == [0, 1]
    for k in (0, 1):
        assert _equal_states(load_file(out / f"authorized/theta0_{k}.safetensors"), result.theta0[k])
        assert _equal_states(pub.authorized_network(k).state_dict(), result.theta0[k])
    assert verify(out, digits_small).ok


def test_theta0_from_file_is_used_for_the_authorized_network(digits_small, tmp_path):
    from uge.weights import save_weights

    init = create_model("cnn", 10, 1, seed=42).state_dict()
    save_weights(tmp_path / "init.safetensors", init)
    cfg = tiny_config(authorized=[AuthorizedSpec("cnn", 0, theta0=str(tmp_path / "init.safetensors"))],
                      losses=("gm",))
    result = protect(digits_small, cfg, device="cpu", progress=False)
    assert _equal_states(result.theta0[0], init)
    assert not _equal_states(result.theta0[0], create_model("cnn", 10, 1, seed=0).state_dict())


def test_generate_quantizes_within_the_generators_budget(digits_small):
    torch.manual_seed(0)
    gen = Generator(1, 10.6 / 255, width=4)
    with torch.no_grad():  # push the output to the edge of the ball, where rounding would overshoot
        gen.decode[-1].weight.zero_()
        gen.decode[-1].bias.fill_(100.0)
    out = generate(gen, digits_small, device="cpu", batch_size=33)
    assert out.images.dtype == np.uint8 and np.array_equal(out.labels, digits_small.labels)
    assert _levels(out.images, digits_small.images) == 10
