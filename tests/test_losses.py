"""The three UGE losses on hand-computed cases (Eqs. 6–11)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uge.protectors.uge.losses import (feature_distance_loss, gradient_distance, gradient_matching_loss,
                                      least_similar_class, matched_parameters, undistill_loss)
from uge.training import kd_loss


def test_gradient_distance_hand_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert gradient_distance([a], [a]).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_distance([a], [-a]).item() == pytest.approx(2.0, abs=1e-6)
    # row 0 orthogonal (distance 1), row 1 identical direction (distance 0): mean over channels = 0.5
    b = torch.tensor([[0.0, 3.0], [0.0, 5.0]])
    assert gradient_distance([a], [b]).item() == pytest.approx(0.5, abs=1e-6)
    # two tensors are averaged: (0.5 + 2) / 2
    c = torch.ones(3, 1, 2, 2)
    assert gradient_distance([a, c], [b, -c]).item() == pytest.approx(1.25, abs=1e-6)


def test_gradient_distance_is_per_channel_not_global():
    # scaling one output channel changes a global cosine but not the per-channel one
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    b = a * torch.tensor([[10.0], [0.1]])
    assert gradient_distance([a], [b]).item() == pytest.approx(0.0, abs=1e-6)


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_matched_parameters_skip_biases_and_norms():
    params = matched_parameters(_tiny_net())
    assert [tuple(p.shape) for p in params] == [(4, 3, 3, 3), (3, 4)]


def test_gradient_matching_is_zero_when_protected_equals_clean():
    net = _tiny_net().train()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    assert gradient_matching_loss(net, x, x.clone(), y).item() == pytest.approx(0.0, abs=1e-5)


def test_gradient_matching_is_differentiable_in_the_protected_images():
    net = _tiny_net().train()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    x_u = (x + 0.05 * torch.randn_like(x)).requires_grad_(True)
    loss = gradient_matching_loss(net, x, x_u, y)
    assert loss.item() > 0
    (g,) = torch.autograd.grad(loss, x_u)
    assert g.abs().sum() > 0
    # one gradient step on x_u moves its gradient towards the clean one
    with torch.no_grad():
        x_next = x_u - 0.5 * g / g.abs().max() * 0.01
    assert gradient_matching_loss(net, x, x_next, y).item() < loss.item()


def test_least_similar_class_excludes_true_class():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)  # classes 0, 1, 2
    f = F.normalize(torch.tensor([[1.0, 0.1], [-1.0, 0.0]]), dim=1)
    # sample 0 is closest to class 0, least similar to class 2; sample 1's least similar is class 0 ...
    assert least_similar_class(f, feats, torch.tensor([0, 1])).tolist() == [2, 0]
    # ... unless class 0 is its own label: then the least similar other class is 1
    assert least_similar_class(f[1:], feats, torch.tensor([0])).tolist() == [1]


def test_feature_distance_hand_computed():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    f_clean = torch.tensor([[1.0, 0.0]])  # least similar to class 2 (excluding its label 0)
    f_prot = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    alpha = 0.1
    feat = -((f_clean - f_prot) ** 2).sum()  # -2
    tri = ((f_prot - classes[2]) ** 2).sum() + max(0.0, alpha - ((f_prot - classes[0]) ** 2).sum().item())  # 2 + 0
    assert feature_distance_loss(f_clean, f_prot, classes, y, alpha).item() == pytest.approx((feat + tri).item())
    # the margin term is active when the protected feature sits on its true class
    loss_on_true = feature_distance_loss(f_clean, classes[:1].clone(), classes, y, alpha=0.5)
    assert loss_on_true.item() == pytest.approx(0 + 4 + 0.5)


def test_feature_distance_gradient_pushes_towards_least_similar_class():
    classes = F.normalize(torch.randn(5, 8), dim=1)
    f_clean = F.normalize(torch.randn(4, 8), dim=1)
    y = torch.tensor([0, 1, 2, 3])
    f_prot = f_clean.clone().requires_grad_(True)
    loss = feature_distance_loss(f_clean, f_prot, classes, y)
    loss.backward()
    target = classes[least_similar_class(f_clean, classes, y)]
    # the descent direction has a positive component towards the least similar class feature
    assert ((-f_prot.grad) * (target - f_clean)).sum(1).gt(0).all()


def test_kd_loss_temperature_and_zero():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    for T in (1.0, 4.0):
        p = F.softmax(t / T, 1)
        q = F.softmax(s / T, 1)
        expected = (p * (p.log() - q.log())).sum(1).mean() * T * T
        assert kd_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)


def test_undistill_sign_and_temperature():
    auth, hacker = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    omega, T = 0.1, 4.0
    p = F.softmax(auth / T, 1)
    q = F.softmax(hacker / T, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    expected = F.cross_entropy(auth, y) - omega * kl  # the plain KL of Eq. 11: no τ² factor
    assert undistill_loss(auth, hacker, y, omega, T).item() == pytest.approx(expected.item(), rel=1e-5)
    # identical outputs: the KL term vanishes and only the cross-entropy is left
    assert undistill_loss(auth, auth, y, omega, T).item() == pytest.approx(F.cross_entropy(auth, y).item(), rel=1e-5)
    # a larger disagreement with the hacker lowers the loss (it is rewarded, not penalized)
    assert undistill_loss(auth, -3 * auth, y, omega, T) < undistill_loss(auth, auth, y, omega, T)
    assert math.isfinite(undistill_loss(auth, hacker, y, omega, 0.5).item())


def test_per_sample_gradient_distance_equals_a_loop_over_samples_gradients_included():
    from uge.protectors.uge.losses import (clean_gradient, freeze_batchnorm, gradient_distance_reference,
                                          per_sample_gradient_distance)
    from uge.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", 10, 3, seed=0).double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    freeze_batchnorm(model, x)
    params = matched_parameters(model)
    x_u = (x + 0.03 * torch.randn_like(x)).requires_grad_()
    d = per_sample_gradient_distance(model, x, x_u, y, params, chunk_size=2)
    loop = torch.stack([gradient_distance_reference(
        clean_gradient(model, x[i:i + 1], y[i:i + 1], params),
        torch.autograd.grad(F.cross_entropy(model(x_u[i:i + 1]), y[i:i + 1]), params, create_graph=True))
        for i in range(3)]).mean()
    assert d.item() == pytest.approx(loop.item(), rel=1e-10)
    (g1,) = torch.autograd.grad(d, x_u)
    (g2,) = torch.autograd.grad(loop, x_u)
    assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-12) and g1.abs().max() > 0
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        per_sample_gradient_distance(model, x, x_u, y, params)
