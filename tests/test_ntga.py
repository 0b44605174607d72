"""NTGA (issue 23): the kernels against independent references, the attack's effect on kernel regression's
held-out loss, the budget on the saved files, and one-line errors for bad parameters. Seconds on a CPU."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

from uge.errors import ConfigError
from uge.protectors import build_protector
from uge.protectors.ntga import EmpiricalNTK, infinite_ntk
from uge.published import publish, read_published, verify

TINY = {"block_size": 32, "held_out": 64}  # 100 digits: 4 blocks of 25, each against 64 of the other 75


def _x(n=10, d=12):
    """Fixed inputs in [0, 1] (the ones the neural-tangents references below were computed on)."""
    return torch.from_numpy((np.sin(np.arange(n * d).reshape(n, d) * 0.37) + 1) / 2)


# neural_tangents 0.6.5 (jax 0.4.30, float64): stax.serial(*[Dense(512, √1.76, √0.18), Erf()] * depth
# [+ Dense(1, √1.76, √0.18)]).kernel_fn(x[:3], x[3:5], "ntk") — the authors' DenseGroup surrogate.
NT_NTK = {
    (5, False): [[2.4190349279607117, 1.9783232665606014], [1.0174058271121575, 2.4389797736347965],
                 [1.4432578909852978, 1.258791939687877]],
    (2, False): [[1.0254844482346552, 0.8861808225248541], [0.4248545703613904, 1.0248200895868937],
                 [0.5908479204287888, 0.5138094339643173]],
    (2, True): [[2.7522775120453096, 2.4405184670500706], [1.3481871341653617, 2.7518011078298494],
                [1.763553341512112, 1.57482405287119]],
}
# nt.predict.gradient_descent_mse(Θ(x[:6], x[:6]), y, diag_reg=1e-4)(t, 0., 0., Θ(x[6:], x[:6]))[1], depth 5,
# y = one-hot of (0, 1, 2, 0, 1, 2)
NT_PREDICT = {
    64.0: [[6.5726068045587871e-01, -6.2133841988865068e-04, 2.7836946532679885e-01],
           [6.9628362836336044e-01, 3.0278081893456499e-01, -2.7925658344807314e-04],
           [-1.6591958099866438e-02, 7.1350576411759592e-01, 2.9254927121647567e-01],
           [1.7985324386983997e-01, -6.9758637630529252e-03, 7.9167819292183528e-01]],
    None: [[0.6118705510960868, 0.08724942891093235, 0.24562230049567801],
           [0.7089202426339627, 0.23655002331539476, 0.04442080964502171],
           [0.03950508242490336, 0.7238283715332818, 0.22894305565870932],
           [0.1534563328025309, 0.07290625972063491, 0.7420074794110725]],
}


@pytest.mark.parametrize("depth, readout", list(NT_NTK))
def test_infinite_ntk_is_neural_tangents(depth, readout):
    x = _x()
    got = infinite_ntk(x[:3], x[3:5], depth, readout=readout)
    assert torch.allclose(got, torch.tensor(NT_NTK[depth, readout], dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(infinite_ntk(x[3:5], x[:3], depth, readout), got.T, atol=1e-12)  # symmetric


@pytest.mark.parametrize("t", list(NT_PREDICT))
def test_kernel_regression_at_time_t_is_neural_tangents(t):
    x, p = _x(), build_protector("ntga", t=t)
    y = torch.eye(3, dtype=torch.float64)[torch.arange(6) % 3]
    out = p.predict(infinite_ntk(x[:6], x[:6], 5), infinite_ntk(x[6:], x[:6], 5), y)
    assert torch.allclose(out, torch.tensor(NT_PREDICT[t], dtype=torch.float64), rtol=0, atol=1e-10)


def test_empirical_ntk_is_the_jacobian_contraction_and_tends_to_the_infinite_one():
    x = _x()
    net = EmpiricalNTK(12, 16, 2, seed=0)
    got = net.gram(net.features(x[:3]), net.features(x[3:5]))
    params = net.params()
    jac = vmap(jacrev(EmpiricalNTK.forward), in_dims=(None, 0))  # per-image ∂f/∂θ, every parameter tensor
    j1, j2 = jac(params, x[:3]), jac(params, x[3:5])
    assert torch.allclose(got, sum(j1[k].flatten(1) @ j2[k].flatten(1).T for k in params), atol=1e-12)

    limit = infinite_ntk(x[:3], x[3:5], 1, readout=True)
    err = {w: max((EmpiricalNTK(12, w, 1, seed=s).gram(*[EmpiricalNTK(12, w, 1, seed=s).features(v)
                                                          for v in (x[:3], x[3:5])]) - limit).abs().max().item()
                  for s in range(3)) for w in (16, 4096)}
    assert err[4096] < 0.05 * limit.abs().max().item() < err[16]


def test_blocks_cover_the_set_once_and_hold_out_other_images():
    p = build_protector("ntga", block_size=30, held_out=40)
    blocks = p.blocks(100, seed=0)
    assert len(blocks) == 4 and sorted(np.concatenate([b for b, _ in blocks]).tolist()) == list(range(100))
    assert all(len(h) == 40 and not set(b) & set(h) for b, h in blocks)
    small = build_protector("ntga").blocks(10, seed=0)  # one block's worth: two halves, each the other's held-out
    assert [len(b) for b, _ in small] == [5, 5] and set(small[0][1]) == set(small[1][0])
    assert [b.tolist() for b, _ in p.blocks(100, seed=1)] != [b.tolist() for b, _ in blocks]


@pytest.fixture(scope="module")
def published(digits_small, tmp_path_factory):
    p = build_protector("ntga", **TINY)
    result = p.protect(digits_small, device="cpu", progress=False, seed=0)
    return p, result, publish(result, digits_small, tmp_path_factory.mktemp("ntga") / "set", formats=("npz", "png"))


def _flat(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).double().div(255).permute(0, 3, 1, 2).flatten(1)


def test_the_attack_raises_kernel_regressions_held_out_loss(published, digits_small):
    """On the saved (8-bit) files: every block's held-out loss, with the same kernel and held-out set, is higher
    than with the clean block, and by far more than uniform noise of the same budget moves it."""
    p, _, folder = published
    saved = read_published(folder, prefer="png").data.images
    noise = build_protector("random").protect(digits_small, seed=0).protected.images
    labels, kernel = torch.from_numpy(digits_small.labels).long(), p.ntk(64)
    clean, x = _flat(digits_small.images), {"ntga": _flat(saved), "random": _flat(noise)}
    rises = {"ntga": [], "random": []}
    for block, held in p.blocks(len(digits_small), seed=0):
        test = kernel[0](clean[held])

        def loss(xb, block=block, held=held, test=test):
            return p.heldout_loss(kernel, xb, labels[block], test, labels[held], 10).item()

        base = loss(clean[block])
        for k, images in x.items():
            rises[k].append(loss(images[block]) - base)
    assert min(rises["ntga"]) > 0
    assert np.mean(rises["ntga"]) > 5 * np.abs(rises["random"]).mean()


def test_budget_holds_on_the_saved_files_and_the_manifest_states_the_kernel(published, digits_small):
    _, result, folder = published
    for fmt in ("npz", "png"):
        saved = read_published(folder, prefer=fmt)
        assert np.array_equal(saved.data.images, result.protected.images)
        assert np.array_equal(saved.data.labels, digits_small.labels)
    levels = np.abs(saved.data.images.astype(int) - digits_small.images.astype(int)).max()
    m = saved.manifest
    assert 1 <= levels <= m["rho_levels"] == math.floor(255 * 8 / 255 + 1e-9) == 8
    assert m["method"] == "ntga" and m["params"]["kernel"] == "infinite" and m["params"]["block_size"] == 32
    assert [h["images"] for h in m["history"]] == [25] * 4 and all(h["loss"] > h["loss_clean"] for h in m["history"])
    assert verify(folder, digits_small).ok


def test_the_empirical_kernel_runs_from_the_runs_seed(digits_small):
    p = build_protector("ntga", **TINY, kernel="empirical", width=32, depth=2, steps=2)
    a, b = (p.protect(digits_small, device="cpu", progress=False, seed=s).protected.images for s in (0, 0))
    assert np.array_equal(a, b) and not np.array_equal(a, digits_small.images)


@pytest.mark.parametrize("params, name", [
    ({"rho": 0.0}, "rho"), ({"kernel": "ntk"}, "kernel"), ({"block_size": 1}, "block_size"),
    ({"block_size": 64.0}, "block_size"), ({"held_out": 0}, "held_out"), ({"steps": 0}, "steps"),
    ({"step_size": -1.0}, "step_size"), ({"t": 0.0}, "t"), ({"t": None, "ridge": 0.0}, "ridge"),
    ({"ridge": -1e-4}, "ridge"), ({"loss": "l2"}, "loss"), ({"width": 0}, "width"), ({"depth": 0}, "depth"),
    ({"seed": 3}, "seed")])
def test_bad_parameters_are_one_line_config_errors(params, name):
    with pytest.raises(ConfigError, match=name) as e:
        build_protector("ntga", **params)
    assert "\n" not in str(e.value) and "ntga" in str(e.value)


def test_cli_protects_and_verifies_with_ntga(tmp_path, capsys):
    from uge.cli import main

    out = tmp_path / "ntga"
    assert main(["protect", "--data", "digits", "--per-class", "4", "--out", str(out), "--method", "ntga",
                 "--rho", "4/255", "--param", "block_size=16", "--param", "t=null", "--format", "npz", "--quiet",
                 "--device", "cpu"]) == 0
    m = read_published(out).manifest
    assert m["params"]["t"] is None and m["rho_levels"] == 4 and m["seeds"]["streams"]["surrogate"] == 40_000
    assert main(["verify", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["protect", "--data", "digits", "--out", str(tmp_path / "x"), "--method", "ntga",
                 "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs does not apply to --method ntga" in err[0] and "block_size" in err[0]


def test_one_image_is_a_one_line_error(digits_small):
    with pytest.raises(ConfigError, match="at least 2 images") as e:
        build_protector("ntga").protect(digits_small.subset([0]), device="cpu", progress=False)
    assert "\n" not in str(e.value)
