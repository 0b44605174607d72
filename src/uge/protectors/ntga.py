"""Neural tangent generalization attack (NTGA): Yuan & Wu, "Neural Tangent Generalization Attacks", ICML 2021.

The authors' code (lionelmessi6410/ntga, ``generate_attack.py``) is followed where it pins a choice: the FNN
surrogate (5 × [Dense, Erf], σ_w² = 1.76, σ_b² = 0.18) on raw [0, 1] pixels, kernel regression at training time
t = 64 with a diagonal regularizer of 1e-4 × the mean diagonal, cross-entropy on the held-out labels, 10 signed
steps of 1.1ρ/10 from δ = 0, over blocks of the training set ("B-NTGA").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..params import budget, param
from ..pgd import pgd
from ..result import Protection
from ..seeds import derive, sequence
from ..utils import resolve_device
from .base import Protector, noise_result, register_protector

W_VAR, B_VAR = 1.76, 0.18  # σ_w², σ_b² of the authors' surrogate (their W_std = √1.76, b_std = √0.18)
KERNELS = ("infinite", "empirical")
LOSSES = ("ce", "mse")


# ------------------------------------------------------------------------------------------- kernels
# Both kernels of the fully connected surrogate x -> [Dense -> Erf] × depth (NTK parametrization: a Dense layer
# is z = σ_w/√fan_in · W h + σ_b · b with W, b ~ N(0, 1)), on flattened images (N, D) in float64.


def _erf_kernels(s11: torch.Tensor, s12: torch.Tensor, s22: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[erf(u) erf(v)] and E[erf'(u) erf'(v)] for (u, v) ~ N(0, [[s11, s12], [s12, s22]]) (Williams 1997):
    (2/π)·asin(2 s12 / √((1 + 2 s11)(1 + 2 s22))) and (4/π) / √((1 + 2 s11)(1 + 2 s22) − 4 s12²)."""
    a = (1 + 2 * s11) * (1 + 2 * s22)
    return (2 / math.pi) * torch.asin(2 * s12 / a.sqrt()), (4 / math.pi) / (a - 4 * s12 ** 2).sqrt()


def infinite_ntk(x1: torch.Tensor, x2: torch.Tensor, depth: int, readout: bool = False) -> torch.Tensor:
    """The infinite-width NTK Θ(x1, x2) (n, m) of [Dense -> Erf] × ``depth`` (+ a Dense readout when ``readout``),
    exactly what ``neural_tangents.stax`` computes for the authors' ``DenseGroup(depth, ·, √1.76, √0.18)``:

        Dense:  Σ ← σ_w² Σ̂ + σ_b² (Σ̂ = x·x'/D at the input),   Θ ← σ_w² Θ + Σ
        Erf:    Σ̂, Σ̇ ← E[erf erf], E[erf' erf'] under Σ,        Θ ← Θ ⊙ Σ̇

    Differentiable in both arguments; the per-image variances (the diagonal) ride along.
    """
    d = x1.shape[1]
    s11, s22 = W_VAR * (x1 * x1).sum(1, keepdim=True) / d + B_VAR, W_VAR * (x2 * x2).sum(1) / d + B_VAR
    s12 = W_VAR * (x1 @ x2.T) / d + B_VAR
    theta = s12
    for layer in range(depth):
        nngp, dot = _erf_kernels(s11, s12, s22)
        theta = theta * dot
        if layer < depth - 1 or readout:  # the next Dense layer
            s11 = W_VAR * _erf_kernels(s11, s11, s11)[0] + B_VAR
            s22 = W_VAR * _erf_kernels(s22, s22, s22)[0] + B_VAR
            s12 = W_VAR * nngp + B_VAR
            theta = W_VAR * theta + s12
    return theta


class EmpiricalNTK:
    """The NTK of one finite draw of the surrogate with a scalar Dense readout, f(x) = Dense(1)(h_depth(x)):
    Θ(x, x') = ⟨∂f(x)/∂θ, ∂f(x')/∂θ⟩ over all weights and biases. Its infinite-width limit is
    ``infinite_ntk(·, ·, depth, readout=True)``.

    Computed layer by layer instead of from the Jacobian: ∂f/∂W_l = g_l ⊗ (σ_w/√fan_in) h_{l−1} with
    g_l = ∂f/∂z_l, so Θ = Σ_l ⟨g_l, g_l'⟩ · (σ_w²/fan_in ⟨h_{l−1}, h_{l−1}'⟩ + σ_b²) — the same number as the
    Jacobian contraction (tests/test_ntga.py checks it against ``torch.func``), without (N, #params) Jacobians.
    """

    def __init__(self, dim: int, width: int, depth: int, seed: int, device="cpu"):
        g = torch.Generator().manual_seed(derive(seed, "surrogate"))
        fans = [dim] + [width] * depth
        self.weights = [torch.randn(fans[i + 1], fans[i], generator=g, dtype=torch.float64).to(device)
                        for i in range(depth)] + [torch.randn(1, width, generator=g, dtype=torch.float64).to(device)]
        self.biases = [torch.randn(f, generator=g, dtype=torch.float64).to(device) for f in fans[1:] + [1]]

    def params(self) -> dict[str, torch.Tensor]:
        """The weights and biases by name (``w0``…, ``b0``…; the readout last), for :meth:`forward`."""
        return {**{f"w{i}": w for i, w in enumerate(self.weights)}, **{f"b{i}": b for i, b in enumerate(self.biases)}}

    @staticmethod
    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f(x) for one flattened image (D,) or a batch (N, D): the network as a function of its parameters."""
        h, n = x, len(params) // 2
        for i in range(n):
            z = (W_VAR / h.shape[-1]) ** 0.5 * h @ params[f"w{i}"].T + B_VAR ** 0.5 * params[f"b{i}"]
            h = torch.erf(z) if i < n - 1 else z
        return h.squeeze(-1)

    def features(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer l, (the layer's input h_{l−1} scaled by σ_w/√fan_in, g_l = ∂f/∂z_l), each (N, ·)."""
        hs, zs, h = [], [], x
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            hs.append(h)
            zs.append((W_VAR / h.shape[1]) ** 0.5 * h @ w.T + B_VAR ** 0.5 * b)
            h = torch.erf(zs[-1])
        hs.append(h)
        gs = [torch.ones(len(x), 1, dtype=x.dtype, device=x.device)]  # ∂f/∂(readout pre-activation)
        for w, z, fan in zip(reversed(self.weights), reversed(zs), reversed([t.shape[1] for t in hs[1:]])):
            gs.append((W_VAR / fan) ** 0.5 * (gs[-1] @ w) * (2 / math.sqrt(math.pi)) * torch.exp(-z ** 2))
        return [((W_VAR / h.shape[1]) ** 0.5 * h, g) for h, g in zip(hs, reversed(gs))]

    @staticmethod
    def gram(a: list, b: list) -> torch.Tensor:
        """Θ between two sets of :meth:`features` (n, m)."""
        return sum((ga @ gb.T) * (ha @ hb.T + B_VAR) for (ha, ga), (hb, gb) in zip(a, b))


# ----------------------------------------------------------------------------------------- protector


@register_protector
@dataclass
class NeuralTangentGeneralization(Protector):
    """Perturbations that maximize the held-out loss of kernel regression with the neural tangent kernel.

    A network trained by gradient descent on (X, Y) behaves, in the wide limit, like kernel regression with its
    NTK Θ: at time t the held-out predictions are f(X') = Θ(X', X) Θ⁻¹ (I − exp(−t Θ / (n·K))) Y (Lee et al.,
    NeurIPS 2019). NTGA takes projected signed-gradient *ascent* steps on δ (‖δ‖∞ ≤ ρ,
    x + δ in [0, 1]) to maximize the loss of f on held-out data, so that networks trained on X + δ generalize
    badly. B-NTGA does this over blocks: the set is shuffled into blocks of about ``block_size`` images; each
    block's perturbed images with their one-hot labels are the regression's training set, and ``held_out`` clean
    images drawn from the *rest of the set* (all of it when fewer remain), their labels the targets, are the
    held-out set (the authors use a validation split that is not published; every image here is published).
    With one block's worth of images or fewer, the set is split into two blocks, each held out for the other.

    ``kernel`` (decided by measuring, issue 23):
      - ``"infinite"`` (default): the infinite-width NTK of the authors' FNN surrogate, in closed form in torch
        (:func:`infinite_ntk`; equal to neural-tangents' to 1e-12, tests/test_ntga.py). neural-tangents itself
        installs (2.6 GB with TensorFlow) but fails on import with jax 0.10; it runs once jax is pinned back
        to 0.4.30 and tf2jax to 0.3.6 (results/ntga-speed/README.md).
      - ``"empirical"``: a deviation, the NTK of one finite draw of the surrogate (``width`` units per layer,
        a scalar readout, initialized from the run's seed; :class:`EmpiricalNTK`).
    ``t`` = None is infinite training time (kernel ridge regression, then ``ridge`` must be > 0). ``ridge`` is
    relative to the mean of Θ's diagonal, as neural-tangents' ``diag_reg``. Left out: the authors' CNN surrogate.

    Example: ``build_protector("ntga", block_size=128).protect(train)``.
    """

    name = "ntga"
    title = "Neural tangent generalization attack, B-NTGA (Yuan & Wu, ICML 2021)"
    rho: float = budget(8 / 255)
    # "infinite" (the authors' kernel, closed form) or "empirical" (a finite network)
    kernel: str = param("infinite", choices=KERNELS)
    depth: int = param(5, low=1)  # [Dense -> Erf] layers of the surrogate (authors' FNN: 5)
    width: int = param(512, low=1)  # units per layer of the finite network (kernel="empirical" only)
    block_size: int = param(512, low=2)  # images per block (authors: 512)
    # held-out images per block, drawn from the rest of the set (authors: a 10,000 split)
    held_out: int = param(1024, low=1)
    steps: int = param(10, low=1)  # authors: 10
    step_size: float | None = param(None, low=0, low_open=True)  # None: 1.1 ρ / steps (authors)
    # training time of the kernel regression (authors: 64); None: infinite time
    t: float | None = param(64.0, low=0, low_open=True, note="(None: infinite time)")
    # diagonal regularizer, × the mean of Θ's diagonal (authors: 1e-4)
    ridge: float = param(1e-4, low=0, note="(> 0 when t is None)")
    loss: str = param("ce", choices=LOSSES)  # "ce" (authors) or "mse" on the held-out one-hot labels

    def cross_checks(self):
        if self.t is None and self.ridge == 0:
            return [f"ridge must be > 0 when t is None (infinite time: kernel ridge regression), got {self.ridge!r}"]
        return []

    # -------------------------------------------------------------------------- the pieces, for tests too

    def blocks(self, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """(block, held-out) index arrays for a set of ``n`` images: a seeded shuffle cut into
        max(2, ⌈n / block_size⌉) blocks of near-equal size; each block's held-out images are ``held_out`` of the
        others, drawn without replacement (sorted)."""
        rng = np.random.default_rng(sequence(seed, "ntga_blocks"))
        order = rng.permutation(n)
        out = []
        for block in np.array_split(order, max(2, -(-n // self.block_size))):
            rest = np.setdiff1d(order, block)
            held = rest if len(rest) <= self.held_out else np.sort(rng.choice(rest, self.held_out, replace=False))
            out.append((np.sort(block), held))
        return out

    def ntk(self, dim: int, seed: int = 0, device="cpu"):
        """The kernel as (features, gram): ``gram(features(x1), features(x2))`` is Θ(x1, x2) for flattened
        float64 images (N, ``dim``) in [0, 1]; features of fixed images can be computed once."""
        if self.kernel == "infinite":
            return (lambda x: x), (lambda a, b: infinite_ntk(a, b, self.depth))
        net = EmpiricalNTK(dim, self.width, self.depth, seed, device)
        return net.features, net.gram

    def predict(self, k_train: torch.Tensor, k_test_train: torch.Tensor, y_train: torch.Tensor) -> torch.Tensor:
        """Kernel regression's held-out outputs (m, K) at time ``t``, from Θ(train, train) (n, n),
        Θ(test, train) (m, n) and one-hot ``y_train`` (n, K): Θ_te,tr Θ_r⁻¹ (I − exp(−t Θ_r / (n·K))) Y with
        Θ_r = Θ + ridge · mean(diag Θ) · I (neural-tangents' ``gradient_descent_mse``, learning rate 1)."""
        n = len(k_train)
        eye = torch.eye(n, dtype=k_train.dtype, device=k_train.device)
        k_reg = k_train + self.ridge * k_train.diagonal().mean() * eye
        if self.t is None:
            rhs = y_train
        else:  # Θ_r⁻¹ and exp(−t Θ_r / (n·K)) commute: one solve either way
            rhs = (eye - torch.linalg.matrix_exp(-self.t / y_train.numel() * k_reg)) @ y_train
        return k_test_train @ torch.linalg.solve(k_reg, rhs)

    def heldout_loss(self, kernel, x_train: torch.Tensor, y_train: torch.Tensor, test, y_test: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
        """The attacked objective: the loss on the held-out set of kernel regression on flattened ``x_train``
        (n, D) in [0, 1] with labels ``y_train`` (n,); ``test`` is the held-out images' features (``kernel[0]``
        of their flattened images, computed once), ``y_test`` (m,) their labels."""
        features, gram = kernel
        a = features(x_train)
        out = self.predict(gram(a, a), gram(test, a), F.one_hot(y_train, num_classes).to(x_train.dtype))
        if self.loss == "ce":
            return F.cross_entropy(out, y_test)
        return 0.5 * ((out - F.one_hot(y_test, num_classes).to(out.dtype)) ** 2).sum(1).mean()

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        if len(data) < 2:
            raise ConfigError(f"protector 'ntga' needs at least 2 images (a block and its held-out set), "
                              f"got {len(data)}")
        device, start = resolve_device(device), time.perf_counter()
        images, labels = data.tensors(device)
        x = images.double() / 255  # float64: the kernel matrices are solved, as the authors do (jax_enable_x64)
        kernel = self.ntk(x[0].numel(), seed, device)
        delta = torch.zeros_like(x)  # the authors start at δ = 0
        step = self.step_size or 1.1 * self.rho / self.steps
        history = []
        for i, (block, held) in enumerate(tqdm(self.blocks(len(data), seed), desc="NTGA blocks",
                                               disable=None if progress else True, leave=False)):
            b, h = torch.from_numpy(block).to(device), torch.from_numpy(held).to(device)
            test = kernel[0](x[h].flatten(1))  # the held-out side is fixed: its features once per block
            y_b, y_h = labels[b], labels[h]

            def objective(x_u, y_b=y_b, y_h=y_h, test=test):
                return self.heldout_loss(kernel, x_u.flatten(1), y_b, test, y_h, data.num_classes)

            with torch.no_grad():
                clean = objective(x[b]).item()
            delta[b] = pgd(objective, x[b], delta[b], self.rho, self.steps, step, minimize=False)
            with torch.no_grad():
                final = objective(x[b] + delta[b]).item()
            history.append({"block": i, "images": len(block), "held_out": len(held), "loss_clean": round(clean, 6),
                            "loss": round(final, 6)})
        return noise_result(self, data, delta, seed, history=history, seconds={"noise": time.perf_counter() - start})
