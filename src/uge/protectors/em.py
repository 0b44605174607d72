"""Error-minimizing noise (EM): Huang et al., "Unlearnable Examples: Making Personal Data Unexploitable",
ICLR 2021 — the sample-wise variant."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.dataset import ImageDataset
from ..models import list_models
from ..params import budget, param
from ..pgd import pgd, uniform_start
from ..result import Protection
from ..seeds import derive
from ..training import Recipe, SupervisedTask, accuracy, train
from ..utils import resolve_device
from .base import NoiseBand, PretrainedSource, Protector, add_noise, band_cell, noise_result, register_protector


@register_protector
@dataclass
class ErrorMinimizing(NoiseBand, PretrainedSource, Protector):
    """Sample-wise error-minimizing noise: min over δ (‖δ‖∞ ≤ ρ) of min over θ of the training loss on x + δ.

    The bi-level problem is solved by alternation (Huang et al., Sec. 3): train a source network on x + δ
    for ``train_steps`` SGD steps, then run ``pgd_steps`` signed-gradient steps on every δ that *lower* its
    cross-entropy; stop once the network's accuracy on x + δ reaches ``stop_acc`` % (or after
    ``max_rounds``). The noise becomes a shortcut that fits the labels, so networks trained on the data
    learn the noise instead of the images. Paper (CIFAR-10, ResNet-18 source): ρ = 8/255, 20 PGD steps of
    0.8/255, 10 training steps per round, stop at 99 % accuracy. The source here trains through
    :func:`uge.training.train` (SGD + momentum, constant lr, no augmentation); its momentum restarts each round.

    ``init`` and ``probe`` (:class:`PretrainedSource`) fit the noise to fixed pretrained features (ours).

    Example: ``build_protector("em", arch="cnn", max_rounds=5).protect(train)``.
    """

    name = "em"
    title = "Error-minimizing noise, sample-wise (Huang et al., ICLR 2021)"
    rho: float = budget(8 / 255)
    arch: str = param("resnetc20", choices=list_models)  # source network
    train_steps: int = param(10, low=1)  # source-network SGD steps per round (paper: 10)
    pgd_steps: int = param(20, low=1)  # noise steps per round (paper: 20)
    step_size: float = param(0.8 / 255, low=0, low_open=True)  # paper: ρ/10
    max_rounds: int = param(10, low=1)
    # % accuracy of the source network on x + δ; None: always max_rounds
    stop_acc: float | None = param(99.0, low=0, high=100, low_open=True)
    batch_size: int = param(128, low=2)
    lr: float = param(0.1, low=0, low_open=True)
    cell: int = band_cell()  # the noise's subspace (NoiseBand; not in the papers)
    luminance: bool = False
    init: str | None = None  # the source's θ0 from a safetensors file instead of a random init (see above)
    probe: bool = False

    # The two pieces REM changes: how the source network trains, and what the noise minimizes.
    def task(self):
        return SupervisedTask()

    def noise_loss(self, model: nn.Module, x_u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x_u), y)

    def minimize_noise(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       delta: torch.Tensor) -> torch.Tensor:
        """``pgd_steps`` steps on every δ of the set (uint8 ``images`` (N, C, H, W)) against a fixed ``model``."""
        learns = [p.requires_grad for p in model.parameters()]
        model.eval().requires_grad_(False)  # eval: the noise must fit the network as it predicts
        out = torch.empty_like(delta)
        subspace = self.subspace()
        for i in range(0, len(images), self.batch_size):
            x, y = images[i:i + self.batch_size].float() / 255, labels[i:i + self.batch_size]
            out[i:i + len(x)] = pgd(lambda x_u, y=y: self.noise_loss(model, x_u, y), x, delta[i:i + len(x)],
                                    self.rho, self.pgd_steps, self.step_size, minimize=True, subspace=subspace)
        for p, g in zip(model.parameters(), learns):
            p.requires_grad_(g)  # a probe's features stay fixed
        return out

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        device = resolve_device(device)
        model = self.source_model(data, seed, device)
        images, labels = data.tensors(device)
        delta = uniform_start(images.shape, self.rho, seed, device)  # Huang et al. start from random noise
        if (subspace := self.subspace()) is not None:
            delta = subspace(delta)
        bs = min(self.batch_size, len(data))
        recipe = Recipe(epochs=1, batch_size=bs, lr=self.lr, warmup=0.0, schedule="constant", crop=False,
                        flip=False)
        rng, history, start = np.random.default_rng(seed), [], time.perf_counter()
        bar = tqdm(range(self.max_rounds), desc=self.name, disable=None if progress else True, leave=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # REM's attacks start at random points
            for r in bar:
                poisoned = add_noise(data, delta, self.rho)  # the source trains on what would be published
                # train_steps batches: one "epoch" over a random draw of train_steps·bs images
                need = self.train_steps * bs
                draw = np.concatenate([rng.permutation(len(data)) for _ in range(-(-need // len(data)))])[:need]
                train(model, poisoned.subset(draw), recipe, task=self.task(), device=device,
                      seed=derive(seed, "em_round", r), progress=False)
                delta = self.minimize_noise(model, images, labels, delta)
                acc = accuracy(model, add_noise(data, delta, self.rho))
                history.append({"round": r + 1, "source_acc": round(acc, 2)})
                bar.set_postfix(source_acc=f"{acc:.1f}%")
                if self.stop_acc is not None and acc >= self.stop_acc:
                    break
        return noise_result(self, data, delta, seed, history=history, seconds={"noise": time.perf_counter() - start})
