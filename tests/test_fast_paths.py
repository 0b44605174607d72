"""The fast paths of the generator step compute what the straightforward reference computes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch.func import replace_all_batch_norm_modules_

from uge.models import create_model
from uge.protectors.uge import CleanGradientCache, UGEObjective
from uge.protectors.uge.losses import (
    clean_gradient,
    gradient_distance,
    gradient_distance_reference,
    gradient_matching_input_grad,
    gradient_matching_loss,
    matched_parameters,
)


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (32, 32, 1, 1), (10, 32)]
    a = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    a[1][3] = 0  # a channel whose gradient vanishes (a dead ReLU): cos is 0 there in both versions
    return a, b


def test_batched_distance_equals_the_per_tensor_loop():
    a, b = _grads()
    fast, ref = gradient_distance(a, b), gradient_distance_reference(a, b)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-12)
    g_fast = torch.autograd.grad(fast, b)
    g_ref = torch.autograd.grad(ref, b)
    for x, y in zip(g_fast, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert gradient_distance(a, [t.detach() for t in a]).item() == pytest.approx(1 / 32 / 4, abs=1e-12)  # the dead row


def test_a_channel_without_gradient_gives_finite_gradients():
    a, b = _grads(2)
    b = [t.detach().clone() for t in b]
    b[2][5] = 0  # the perturbed batch's gradient vanishes on a channel too
    b = [t.requires_grad_() for t in b]
    grads = torch.autograd.grad(gradient_distance(a, b), b)
    ref = torch.autograd.grad(gradient_distance_reference(a, b), b)
    for k, (g, r) in enumerate(zip(grads, ref)):
        assert torch.isfinite(g).all()
        if k == 2:  # at an exactly zero row the cosine has no derivative; both versions return a finite stand-in
            g, r = torch.cat([g[:5], g[6:]]), torch.cat([r[:5], r[6:]])
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_batched_distance_float32_within_precision():
    a, b = _grads(1)
    a, b = [t.float() for t in a], [t.detach().float() for t in b]
    assert gradient_distance(a, b).item() == pytest.approx(gradient_distance_reference(a, b).item(), rel=1e-5)


def test_reused_clean_gradient_gives_the_same_loss_and_input_gradient():
    torch.manual_seed(0)
    model = create_model("cnn", 10, 3, seed=0).train()
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    noise = 0.03 * torch.randn_like(x)
    outs = []
    for reuse in (False, True):
        x_u = (x + noise).requires_grad_()
        params = matched_parameters(model)
        g = clean_gradient(model, x, y, params) if reuse else None
        loss = gradient_matching_loss(model, x, x_u, y, params, g_clean=g)
        outs.append((loss.detach(), torch.autograd.grad(loss, x_u)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-7)


def test_cache_reuses_within_budget_and_recomputes_beyond():
    calls = []
    cache = CleanGradientCache(max_bytes=2 * 4 * 10)  # room for two 10-float entries

    def compute():
        calls.append(1)
        return [torch.zeros(10)]

    for key in ("a", "b", "c", "a", "b", "c", None, None):
        cache.get(key, compute)
    assert len(calls) == 6  # a, b cached; c (over budget) and None (unnamed batch) recomputed each time
    assert cache.hits == 2 and cache.used == 80


def test_objective_reuses_clean_targets_across_epochs(digits_small):
    cfg = tiny_config(losses=("gm",))
    models = [create_model("cnn", 10, 1, seed=s).train() for s in (0, 1)]
    obj = UGEObjective(cfg, [models], [], None, None)
    images, labels = digits_small.tensors()
    x, y = images[:20].float() / 255, labels[:20]
    x_u = (x + 0.02).clamp(0, 1)
    first = obj.terms(x, x_u, y, np.random.default_rng(3), batch_id=0)["gm"]
    again = obj.terms(x, x_u, y, np.random.default_rng(3), batch_id=0)["gm"]  # same checkpoint drawn
    fresh = UGEObjective(cfg, [models], [], None, None).terms(x, x_u, y, np.random.default_rng(3))["gm"]
    assert obj.grad_cache.hits == 1
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, fresh)


@pytest.mark.parametrize("arch", ["cnn", "resnetc20"])  # resnetc20: BatchNorm with batch statistics
def test_forward_over_reverse_gives_the_double_backward_input_gradient(arch):
    torch.manual_seed(0)
    model = create_model(arch, 10, 3, seed=0).double().train()
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    y = torch.arange(8) % 10
    x_u = (x + 0.03 * torch.randn_like(x)).clamp(0, 1).requires_grad_()
    params = matched_parameters(model)
    g_clean = clean_gradient(model, x, y, params)
    loss = gradient_matching_loss(model, x, x_u, y, params, g_clean=g_clean)
    (ref,) = torch.autograd.grad(loss, x_u)
    fwd_model = replace_all_batch_norm_modules_(copy.deepcopy(model))
    loss_f, grad_f = gradient_matching_input_grad(fwd_model, x_u, y, matched_parameters(fwd_model), g_clean)
    assert loss_f.item() == pytest.approx(loss.item(), rel=1e-10)
    assert ref.abs().max() > 0
    torch.testing.assert_close(grad_f, ref, rtol=1e-8, atol=1e-12 * ref.abs().max().item())
