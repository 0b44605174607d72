"""UGE's generator parametrization: the perturbation generator of the paper's supplement (Table 4, Fig. 5),
its training on L_all (Algorithm 1, lines 6–15) and the protected images it makes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...config import ProtectConfig
from ...data.dataset import ImageDataset
from ...result import quantize
from ...seeds import derive, sequence
from ...utils import resolve_device
from .loop import Parametrization, optimize
from .objective import UGEObjective, _diagnostic_indices
from .workdir import _Workdir


def _conv_block(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class _ResBlock(nn.Module):
    """Conv 3x3, BN, LeakyReLU, Dropout, Conv 3x3, BN, plus the identity (Table 4, "Res Block")."""

    def __init__(self, ch: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout(dropout), nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """ResNet-style image-to-image network G with x_u = clamp(G(x), x - ρ, x + ρ) ∩ [0, 1] (Eq. 3).

    Layout (Table 4): Conv 7x7 → 2 × Conv 3x3 stride 2 → ``n_res`` residual blocks at 1/4 resolution →
    2 × transposed Conv 3x3 (×2 each) → Conv to C channels. Every conv is followed by BN + LeakyReLU.

    The paper clamps the generator's image output to the ρ-ball. A raw image output would sit outside the
    ball almost everywhere at the start, where the clamp has zero gradient, so G predicts a residual:
    G(x) = x + ρ·tanh(h(x)). The Eq. 3 clamp is still applied, so the budget holds by construction.

    Args:
        channels: image channels (1 or 3).
        rho: L∞ budget on the [0, 1] scale (paper: 0.04 ≈ 10/255).
        width: channels of the first conv ("ngf"); the residual stage has 4 × width.
        n_res: number of residual blocks (paper: 6).
        dropout: dropout rate inside the residual blocks.
        center: subtract the batch mean of the residual before the clamp, so that no pattern shared by every
            image of a batch survives (issue 10, against the collapse to one universal pattern; not the paper).
    """

    def __init__(self, channels: int = 3, rho: float = 0.04, width: int = 64, n_res: int = 6, dropout: float = 0.5,
                 center: bool = False):
        super().__init__()
        self.rho, self.center = float(rho), bool(center)
        w = width
        self.encode = nn.Sequential(_conv_block(channels, w, 7), _conv_block(w, 2 * w, 3, 2),
                                    _conv_block(2 * w, 4 * w, 3, 2))
        self.res = nn.Sequential(*[_ResBlock(4 * w, dropout) for _ in range(n_res)])
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(2 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(2 * w, w, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, channels, 7, 1, 3))

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """The raw residual h(x) in (-∞, ∞), resized back to x's size for sizes not divisible by 4."""
        h = self.decode(self.res(self.encode(x * 2 - 1)))
        if h.shape[-2:] != x.shape[-2:]:
            h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Protected images x_u in [0, 1] with ‖x_u − x‖∞ ≤ ρ, for images x in [0, 1] of shape (B, C, H, W)."""
        h = torch.tanh(torch.nan_to_num(self.perturbation(x)))  # an overflow must not let NaN escape the ball
        if self.center and len(h) > 1:
            h = h - h.mean(0, keepdim=True)
        g = x + self.rho * h
        return project(g, x, self.rho)


def project(x_u: torch.Tensor, x: torch.Tensor, rho: float) -> torch.Tensor:
    """Clamp x_u to the L∞ ball of radius ρ around x (Eq. 3), then to [0, 1]."""
    return torch.clamp(torch.minimum(torch.maximum(x_u, x - rho), x + rho), 0.0, 1.0)


class _GeneratorTraining(Parametrization):
    """Algorithm 1, lines 6–15, one epoch a unit: minimize L_all over the generator's weights (Adam).

    Under torchrun (DDP) every rank draws the same batches and takes its equal part of each: L_fd and L_ud are
    means over samples, so their averaged gradients are the global batch's; L_gm matches each part's gradient
    (one process matches the whole batch's), and the generator's BatchNorm sees each part's statistics.
    """

    name, stream, unit = "generator", "generator_epoch", "epoch"

    def __init__(self, objective: UGEObjective, cfg: ProtectConfig, data: ImageDataset, device):
        self.objective, self.cfg, self.data, self.device = objective, cfg, data, device
        torch.manual_seed(derive(cfg.seed, "generator"))
        self.gen = Generator(data.channels, cfg.rho, width=cfg.generator.width, center=cfg.generator.center).to(device)
        self.net = distributed.wrap(self.gen, device)  # the generator itself in one process
        self.opt = torch.optim.Adam(self.gen.parameters(), lr=cfg.generator.lr)
        self.history: list[dict] = []
        self.images, self.labels = data.tensors(device)
        n = len(data)
        self.bs = min(cfg.batch_size, n)
        self.steps = max(1, n // self.bs)
        self.part = distributed.shard(self.bs)  # this rank's part of every batch (None: one process, all of it)
        # With a clean-gradient cache the batches are one fixed partition visited in a new order every epoch
        # (so clean targets repeat); without it, every epoch reshuffles the images (the reference behaviour).
        self.fixed = cfg.gm.cache_mb > 0 and "gm" in cfg.losses
        self.partition = torch.from_numpy(np.random.default_rng(sequence(cfg.seed, "partition")).permutation(n)).to(
            device)

    def units(self) -> int:
        return self.cfg.generator.epochs

    def seed_index(self, r: int, u: int) -> tuple[int, ...]:
        return (u,)

    def step(self, r: int, epoch: int, rng: np.random.Generator) -> dict:
        cfg, gen, images, labels, bs = self.cfg, self.gen, self.images, self.labels, self.bs
        gen.train()
        sums: dict[str, torch.Tensor] = {}
        batch_order = rng.permutation(self.steps) if self.fixed else range(self.steps)
        order = self.partition if self.fixed else torch.from_numpy(rng.permutation(len(self.data))).to(self.device)
        for i in range(self.steps):
            j = int(batch_order[i])
            idx = order[j * bs:(j + 1) * bs]
            if self.part is not None:
                idx = idx[self.part]
            x, y = images[idx].float().div_(255), labels[idx]
            terms = self.objective.terms(x, self.net(x), y, rng, batch_id=j if self.fixed else None,
                                         gm=epoch >= cfg.generator.gm_warmup_epochs)
            terms["total"] = loss = sum(terms.values())
            self.opt.zero_grad(set_to_none=True)
            loss.backward(inputs=list(gen.parameters()))  # the networks inside the losses stay untouched
            self.opt.step()
            for k, v in terms.items():  # summed on the device: one synchronization per epoch, not per step
                sums[k] = sums.get(k, 0) + v.detach()
        sums = {k: distributed.mean(v).item() for k, v in sums.items()}  # the ranks' mean: one history
        if not all(np.isfinite(v) for v in sums.values()) or not all(torch.isfinite(p).all() for p in gen.parameters()):
            raise FloatingPointError(f"generator training diverged in epoch {epoch + 1} (losses {sums}); "
                                     "lower generator_lr, or report this with the config")
        record = {"epoch": epoch + 1, **{k: v / self.steps for k, v in sums.items()}}
        if cfg.diagnostics:
            idx = _diagnostic_indices(self.data, cfg, self.device)
            xd = images[idx].float().div_(255)
            with torch.no_grad():
                xd_u = gen(xd)
            record.update(self.objective.diagnose(xd, xd_u, labels[idx]))
        self.history.append(record)
        return {k: v for k, v in record.items() if k != "epoch"}

    def state_dict(self) -> dict:
        return {"generator": self.gen.state_dict(), "optimizer": self.opt.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.gen.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["optimizer"])
        self.history = state["history"]


def _train_generator(objective: UGEObjective, cfg: ProtectConfig, data: ImageDataset, device, work: _Workdir,
                     progress: bool) -> tuple[Generator, list[dict]]:
    """Algorithm 1, lines 6–15: minimize L_all over the generator, checkpointing after every epoch."""
    training = _GeneratorTraining(objective, cfg, data, device)
    optimize(training, work.file("generator.pt"), cfg.seed, device, progress)
    return training.gen, training.history


@torch.no_grad()
def recalibrate_batchnorm(gen: Generator, data: ImageDataset, device="auto", batch_size: int = 500) -> None:
    """Set the generator's BatchNorm running statistics to their exact averages over ``data``.

    The generator is optimized in train mode (batch statistics); its running averages lag behind after few
    steps, so an eval-mode generator could output much weaker perturbations than the one that was trained.
    One pass with cumulative averaging (``momentum=None``) and dropout off makes eval mode match training.
    """
    device = resolve_device(device)
    gen.to(device).eval()
    norms = [m for m in gen.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    images, _ = data.tensors("cpu")
    for i in range(0, len(images), batch_size):
        gen(images[i:i + batch_size].to(device).float() / 255)
    for m in norms:
        m.momentum = 0.1
    gen.eval()


@torch.no_grad()
def generate(gen: Generator, data: ImageDataset, device="auto", batch_size: int = 500) -> ImageDataset:
    """Apply a trained generator to every image and quantize to 8 bits within the budget."""
    device = resolve_device(device)
    gen.to(device).eval()
    images, _ = data.tensors("cpu")
    out = []
    for i in range(0, len(images), batch_size):
        x8 = images[i:i + batch_size].to(device)
        out.append(quantize(gen(x8.float() / 255), x8, gen.rho).cpu())
    protected = torch.cat(out).permute(0, 2, 3, 1).numpy()
    return ImageDataset(protected, data.labels.copy(), list(data.classes))
