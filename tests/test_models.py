"""Tests of the classifier zoo and its registry (CPU, small inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from uge.errors import ConfigError
from uge.models import create_model, list_models

EXPECTED = {"cnn", "smallcnn", "lenet", "resnetc20", "resnetc32", "resnet18", "mobilenetv2", "shufflenetv2"}


def test_zoo_is_registered():
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 8)])
def test_forward_backward(name, in_channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=in_channels, seed=1)
    assert isinstance(model.body.head, nn.Linear)
    x = torch.rand(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.body.head.in_features)


@pytest.mark.parametrize("name", list_models())
def test_seeded_init_is_deterministic_and_private(name):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    a = create_model(name, 10, 3, seed=5).state_dict()
    b = create_model(name, 10, 3, seed=5).state_dict()
    c = create_model(name, 10, 3, seed=6).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_name_lists_known_models():
    with pytest.raises(ConfigError) as info:
        create_model("no_such_net", 10)
    for name in EXPECTED:
        assert name in str(info.value)


def test_bad_in_channels():
    with pytest.raises(ConfigError):
        create_model("cnn", 10, in_channels=2)


def test_normalization_is_inside_the_model():
    model = create_model("cnn", 10, 3)
    buffers = dict(model.named_buffers())
    assert buffers["mean"].shape == buffers["std"].shape == (1, 3, 1, 1)
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    model.eval()
    x = torch.rand(2, 3, 16, 16)
    expected = model.body.head(model.body.forward_features((x - model.mean) / model.std))
    assert torch.allclose(model(x), expected)


def test_cnn_learns_a_separable_task():
    # Class = which half (left/right) of a noisy 16x16 image is brighter.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = 0.4 * torch.rand(64, 3, 16, 16, generator=g)
    x[y == 0, :, :, :8] += 0.5
    x[y == 1, :, :, 8:] += 0.5
    model = create_model("cnn", 2, 3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(60):
        idx = torch.randint(0, 64, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc
