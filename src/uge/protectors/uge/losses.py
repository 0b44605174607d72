"""The three losses of Ungeneralizable Examples (Eqs. 6–11).

All functions take logits / features as tensors and return a scalar mean over the batch. The distillation
loss (Eq. 10), which L_ud builds on and the hackers train with, is :func:`uge.training.kd_loss`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...training import kd_loss


def matched_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that gradient matching compares: conv and linear weights (ndim > 1).

    Biases and normalization parameters are skipped, as in dataset condensation (Zhao et al., ICLR 2021).
    """
    return [p for p in model.parameters() if p.ndim > 1]


def gradient_distance(g_a: Sequence[torch.Tensor], g_b: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Cosine distance between two network gradients (Dist in Eq. 6).

    Each weight tensor is split into its output channels (rows of the (out, -1) view); the distance is
    1 − cos per output channel, averaged over channels, then averaged over tensors. The result lies in
    [0, 2]: 0 when the gradients point the same way channel by channel, 1 when orthogonal.
    (Zhao et al. sum instead of averaging; the mean keeps L_gm on the scale of one cosine distance, which
    is the scale the paper's λ weights assume.)

    All channels of all tensors are reduced at once (one flat vector, segment sums per channel): a
    handful of kernels instead of several per tensor. :func:`gradient_distance_reference` is the
    per-tensor loop it must equal.
    """
    if len(g_a) != len(g_b) or not g_a:
        raise ValueError("gradient lists must be non-empty and of equal length")
    flat_a = torch.cat([a.reshape(-1) for a in g_a])
    flat_b = torch.cat([b.reshape(-1) for b in g_b])
    row_len, rows = _segments(tuple(tuple(a.shape) for a in g_a), flat_a.device)
    dot = torch.segment_reduce(flat_a * flat_b, "sum", lengths=row_len)
    sq = torch.segment_reduce(flat_a * flat_a, "sum", lengths=row_len) * \
        torch.segment_reduce(flat_b * flat_b, "sum", lengths=row_len)
    # clamp before the square root: a channel with no gradient (dead ReLU) would otherwise get sqrt'(0) = inf
    per_row = 1 - dot / sq.clamp(min=eps * eps).sqrt()
    return torch.segment_reduce(per_row, "mean", lengths=rows).mean()


_SEGMENTS: dict = {}


def _segments(shapes: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(length of every output-channel row, number of rows of every tensor), cached per shape list."""
    key = (shapes, str(device))
    if key not in _SEGMENTS:
        row_len = [int(torch.Size(s[1:]).numel()) for s in shapes for _ in range(s[0])]
        _SEGMENTS[key] = (torch.tensor(row_len, device=device), torch.tensor([s[0] for s in shapes], device=device))
    return _SEGMENTS[key]


def gradient_distance_reference(g_a: Sequence[torch.Tensor], g_b: Sequence[torch.Tensor],
                                eps: float = 1e-8) -> torch.Tensor:
    """The straightforward per-tensor loop of :func:`gradient_distance` (tests and benchmarks compare them)."""
    if len(g_a) != len(g_b) or not g_a:
        raise ValueError("gradient lists must be non-empty and of equal length")
    per_tensor = []
    for a, b in zip(g_a, g_b):
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        per_tensor.append((1 - F.cosine_similarity(a2, b2, dim=1, eps=eps)).mean())
    return torch.stack(per_tensor).mean()


def clean_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   params: Sequence[nn.Parameter] | None = None) -> list[torch.Tensor]:
    """∇θ CE(f(x), y) of the batch's mean loss: the constant target of L_gm (no graph kept)."""
    params = list(params) if params is not None else matched_parameters(model)
    return [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)]


def gradient_matching_loss(model: nn.Module, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor,
                           params: Sequence[nn.Parameter] | None = None,
                           g_clean: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """L_gm (Eq. 6) for one checkpoint: Dist(∇θ CE(f(x), y), ∇θ CE(f(x_u), y)).

    The clean gradient is a constant (pass it as ``g_clean`` when it is already known: it depends only on
    the checkpoint and the clean batch); the gradient on x_u keeps its graph (second order) so that the
    loss can be differentiated with respect to x_u and through it the generator. Gradients are those of
    the batch's mean loss, as in dataset condensation.
    """
    params = list(params) if params is not None else matched_parameters(model)
    if g_clean is None:
        g_clean = clean_gradient(model, x, y, params)
    g_u = torch.autograd.grad(F.cross_entropy(model(x_u), y), params, create_graph=True)
    return gradient_distance(g_clean, g_u)


def per_sample_gradient_distance(model: nn.Module, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor,
                                 params: Sequence[nn.Parameter], chunk_size: int | None = 32) -> torch.Tensor:
    """L_gm as Eq. 6 writes it: the mean over samples of Dist(∇θ ℓ(f(x_i), y_i), ∇θ ℓ(f(x_u,i), y_i)).

    Every sample's gradient is compared with its own clean gradient (``torch.func.vmap`` of ``grad``, in
    chunks of ``chunk_size`` samples to bound memory), so the match does not depend on which samples share
    a batch. The model must be in eval mode (one sample has no batch statistics; see
    :func:`freeze_batchnorm`). Differentiable with respect to ``x_u`` (second order).
    """
    from torch.func import functional_call, grad, vmap

    if model.training:
        raise ValueError("per-sample gradient matching needs the model in eval mode (freeze its BatchNorm first)")
    names = {id(p): n for n, p in model.named_parameters()}
    matched = [names[id(p)] for p in params]
    state = {**{n: p.detach() for n, p in model.named_parameters()}, **dict(model.named_buffers())}
    theta = tuple(state[n] for n in matched)

    def loss(th, xi, yi):
        return F.cross_entropy(functional_call(model, {**state, **dict(zip(matched, th))}, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    g_clean = [g.detach() for g in per_sample(theta, x.detach(), y)]
    g_u = per_sample(theta, x_u, y)
    dist = [(1 - F.cosine_similarity(a.flatten(2), b.flatten(2), dim=2, eps=1e-8)).mean(1)  # (B,) per tensor
            for a, b in zip((g.reshape(g.shape[0], g.shape[1], -1) for g in g_clean),
                            (g.reshape(g.shape[0], g.shape[1], -1) for g in g_u))]
    return torch.stack(dist).mean()


def per_class_gradient_distance(model: nn.Module, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor,
                                params: Sequence[nn.Parameter]) -> torch.Tensor:
    """L_gm matched class by class (dataset condensation): Dist between the gradients of each class's mean loss
    on x and on x_u, averaged over the classes present in the batch."""
    out = []
    for c in y.unique():
        m = y == c
        g_clean = clean_gradient(model, x[m], y[m], params)
        out.append(gradient_matching_loss(model, x[m], x_u[m], y[m], params, g_clean=g_clean))
    return torch.stack(out).mean()


@torch.no_grad()
def freeze_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of the batch ``x`` and switch the model to eval mode.

    In train mode BatchNorm normalizes each pass with that pass's own statistics, so a shift shared by the
    whole protected batch is partly normalized away and L_gm sees less of it; dataset condensation instead
    takes the statistics from the real batch and keeps them fixed for both the real and the synthetic pass.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0  # running stats := this batch's stats
    model.train()
    model(x)
    for m, mom in zip(norms, saved):
        m.momentum = mom
    return model.eval()


def measured_gradient_distance(model: nn.Module, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor) -> float:
    """Eq. 6's distance of the batch's mean loss with BatchNorm frozen at the clean batch ``x``: the diagnostics'
    one fixed measure, the same for every variant (no graph kept)."""
    freeze_batchnorm(model, x)
    params = matched_parameters(model)
    return gradient_distance(clean_gradient(model, x, y, params), clean_gradient(model, x_u, y, params)).item()


def least_similar_class(f_clean: torch.Tensor, class_feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each sample, the class c ≠ y whose class feature is least similar to the clean image feature.

    Classes without a feature (NaN rows, e.g. classes absent from one server's part) are never chosen.
    """
    sim = (f_clean @ class_feats.T).nan_to_num(nan=float("inf"))
    sim = sim.scatter(1, y[:, None], float("inf"))  # exclude the true class
    return sim.argmin(dim=1)


def feature_distance_loss(f_clean: torch.Tensor, f_prot: torch.Tensor, class_feats: torch.Tensor,
                          y: torch.Tensor, alpha: float = 0.1, target: torch.Tensor | None = None) -> torch.Tensor:
    """L_fd (Eqs. 7–9): mean of ℓ_feat + ℓ_tri over the batch.

    Args:
        f_clean: F_i, normalized image features of the clean images (B, D), treated as constants.
        f_prot: F'_i, normalized image features of the protected images (B, D).
        class_feats: F_t^c, normalized class ("text") features (K, D).
        y: labels (B,).
        alpha: triplet margin α.
        target: the class each protected feature is pulled to (B,); default: the least similar class F'_t
            of Eq. 9 (:func:`least_similar_class`).

    ℓ_feat = −‖F_i − F'_i‖² pushes protected features away from clean ones (Eq. 8);
    ℓ_tri = ‖F'_i − F'_t‖² + max(0, α − ‖F'_i − F_t‖²) pulls them to the least similar wrong class F'_t
    and pushes them from the true class F_t (Eq. 9).
    """
    f_clean = f_clean.detach()
    l_feat = -(f_clean - f_prot).pow(2).sum(1)
    far = class_feats[least_similar_class(f_clean, class_feats, y) if target is None else target]
    true = class_feats[y]
    l_tri = (f_prot - far).pow(2).sum(1) + torch.clamp(alpha - (f_prot - true).pow(2).sum(1), min=0)
    return (l_feat + l_tri).mean()


def undistill_loss(auth_logits: torch.Tensor, hacker_logits: torch.Tensor, y: torch.Tensor,
                   omega: float = 0.1, temperature: float = 4.0) -> torch.Tensor:
    """L_ud (Eq. 11): CE(f_θ(x_u), y) − ω · KL(f_θ(x_u) ‖ f'_θA(x_u)), the KL taken at temperature τ.

    The KL is the plain one of Eq. 11, without the τ² factor of distillation (:func:`kd_loss`), so ω keeps
    the paper's balance between the two terms (with τ² = 16 folded in, ω = 0.1 would act as 1.6).
    Minimizing it keeps x_u correctly classified by the trained authorized network while pushing the
    authorized network's soft outputs away from those of a random hacker network, so a student distilled
    from the authorized network receives misleading "dark knowledge".
    """
    kl = kd_loss(hacker_logits, auth_logits, temperature) / temperature ** 2
    return F.cross_entropy(auth_logits, y) - omega * kl


def gradient_matching_input_grad(model: nn.Module, x_u: torch.Tensor, y: torch.Tensor,
                                 params: Sequence[nn.Parameter], g_clean: Sequence[torch.Tensor]
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_gm and ∂L_gm/∂x_u by forward-over-reverse, the alternative to double backward (issue 5).

    With g_u = ∇θ CE(f_θ(x_u), y) and v = ∂Dist/∂g_u (both first order, no graph), the chain rule gives
    ∂L_gm/∂x_u = (∂g_u/∂x_u)ᵀ v = d/dt ∇x CE(f_{θ+tv}(x_u), y) at t = 0: one forward-mode derivative
    (``torch.func.jvp``) of the input gradient along v, instead of a backward pass through the graph of a
    backward pass. ``model`` must not track BatchNorm running statistics (prepare a copy with
    ``torch.func.replace_all_batch_norm_modules_``; in train mode it normalizes with batch statistics
    either way). ``scripts/speed.py`` times both; the generator step uses double backward, which it
    measured faster (see results/speed-*).
    """
    from torch.func import functional_call, grad, jvp

    x_u = x_u.detach()
    g_u = [g.requires_grad_() for g in torch.autograd.grad(F.cross_entropy(model(x_u), y), params)]
    loss = gradient_distance(g_clean, g_u)
    v = torch.autograd.grad(loss, g_u)
    name = {id(p): n for n, p in model.named_parameters()}
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    matched = [name[id(p)] for p in params]

    def input_grad(*theta):
        state = {**fixed, **dict(zip(matched, theta))}
        return grad(lambda x: F.cross_entropy(functional_call(model, state, (x,)), y))(x_u)

    _, gx = jvp(input_grad, tuple(fixed[n] for n in matched), tuple(v))
    return loss.detach(), gx
