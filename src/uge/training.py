"""The one training loop: SGD + momentum, a warmup/decay schedule, crop + flip augmentation on the device.

A *task* turns a batch into a loss (supervised cross-entropy, distillation from a frozen teacher, or PGD
adversarial training around either), so normal training, distillation, a hacker's countermeasures and
trajectory recording all run through :func:`train`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import SCHEDULES, Recipe  # noqa: F401  (Recipe lives in the config layer; re-exported)
from .data.dataset import ImageDataset
from .errors import ConfigError
from .pgd import pgd
from .utils import resolve_device


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Distillation loss τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), batch mean (Hinton et al.; Eq. 10)."""
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    return kl * temperature ** 2


class SupervisedTask:
    """Cross-entropy on the data set's labels: int64 labels (B,) or class-probability targets (B, K), the
    soft targets of mixup / cutmix."""

    name = "normal"

    def to(self, device) -> "SupervisedTask":
        return self

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


class DistillTask:
    """Knowledge distillation (Eq. 10): KL to a frozen teacher's soft outputs on the same batch; labels unused."""

    name = "distill"

    def __init__(self, teacher: nn.Module, temperature: float = 4.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature

    def to(self, device) -> "DistillTask":
        self.teacher.to(device)
        return self

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x)
        return kd_loss(model(x), t, self.temperature)


class AdversarialTask:
    """PGD adversarial training (Madry et al., ICLR 2018) around another task: the loss of ``task`` at the
    worst case x + δ, ‖δ‖∞ ≤ ``eps``, found by ``steps`` signed-gradient ascent steps of size ``step`` from a
    uniform random start in the ball, staying inside [0, 1].

    ``eps`` and ``step`` are on the [0, 1] pixel scale (8/255 is "8 levels"). The attack maximizes the
    wrapped task's own loss, so soft targets (mixup / cutmix) work as well. Around a :class:`DistillTask`
    it is adversarially robust distillation (ARD, Goldblum et al., AAAI 2020): the teacher's targets come
    from the clean batch, the student's outputs from the perturbed one (a teacher re-run on x + δ would
    move its targets along with the attack, which the attack's gradient cannot see).

    The attack runs the model in **eval mode** (restored afterwards): in train mode every PGD iterate
    would update the BatchNorm running statistics with partially perturbed copies of the batch (``steps``
    extra updates per step, which then drive test-time predictions), and the perturbation would depend on
    the batch's own statistics and on dropout noise rather than on the network being attacked. The
    training step itself then runs in train mode on the final x + δ (as in TRADES and MART).
    """

    name = "adv"

    def __init__(self, task=None, eps: float = 8 / 255, steps: int = 5, step: float | None = None):
        if not eps > 0 or steps < 1 or (step is not None and not step > 0):
            raise ConfigError(f"adversarial training needs eps > 0, steps >= 1, step > 0; got eps={eps}, "
                              f"steps={steps}, step={step}")
        self.task = task or SupervisedTask()
        self.eps, self.steps = eps, steps
        self.step = step if step is not None else 2.5 * eps / steps  # Madry et al.'s rule of thumb

    def to(self, device) -> "AdversarialTask":
        self.task.to(device)
        return self

    def _loss_at(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """x_adv -> the wrapped task's loss of this batch at x_adv (teacher targets fixed on the clean x)."""
        if isinstance(self.task, DistillTask):
            with torch.no_grad():
                t = self.task.teacher(x)
            return lambda xa: kd_loss(model(xa), t, self.task.temperature)
        return lambda xa: self.task.loss(model, xa, y)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_at=None) -> torch.Tensor:
        """The adversarial batch x + δ (detached), ‖δ‖∞ ≤ eps, values in [0, 1]."""
        loss_at = loss_at or self._loss_at(model, x, y)
        was_training = model.training
        model.eval()
        try:
            delta = (torch.rand_like(x) * 2 - 1) * self.eps
            delta = (x + delta).clamp(0, 1) - x
            delta = pgd(loss_at, x, delta, self.eps, self.steps, self.step, minimize=False)
        finally:
            model.train(was_training)
        return (x + delta).detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss_at = self._loss_at(model, x, y)
        return loss_at(self.perturb(model, x, y, loss_at))


def augment(x: torch.Tensor, crop: bool = True, flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding of size/8, at least 1 px) and horizontal flip of a batch, on its device."""
    b, c, h, w = x.shape
    if crop:
        p = max(1, round(min(h, w) / 8))
        xp = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b, 1), device=x.device)
        ox = torch.randint(0, 2 * p + 1, (b, 1), device=x.device)
        rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None, None],
               torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(b, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(model: nn.Module, data: ImageDataset, recipe: Recipe, *, task=None, device="auto", seed: int = 0,
          stop_after: int | None = None, on_epoch: Callable[[int, nn.Module], None] | None = None,
          progress: bool = True, desc: str = "train",
          batch_augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
          ) -> nn.Module:
    """Train ``model`` in place on ``data`` with ``recipe`` and return it.

    Args:
        task: :class:`SupervisedTask` (default), :class:`DistillTask` or :class:`AdversarialTask`.
        seed: fixes the shuffling and augmentation; the same seed repeats the run on the same device.
        batch_augment: ``(x, y) -> (x, y)`` applied to every batch after the recipe's crop and flip; x is
            float (B, C, H, W) in [0, 1] on the device, y int64 labels (B,); it may return soft targets
            (B, K). A hacker's countermeasures (:func:`uge.countermeasures.make_batch_augment`) come in here.
        stop_after: stop after this many epochs while keeping the schedule of ``recipe.epochs``
            (trajectory recording uses the first T epochs of the authorized recipe).
        on_epoch: called as ``on_epoch(epoch, model)`` after each epoch (epoch counts from 1).
    """
    device = resolve_device(device)
    task = task or SupervisedTask()
    task.to(device)  # tasks that hold networks (a distillation teacher) move them to the device
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    images, labels = data.tensors(device)
    n, bs = len(data), min(recipe.batch_size, len(data))
    steps_per_epoch = n // bs  # drop the last partial batch: BatchNorm needs more than one sample
    total = steps_per_epoch * recipe.epochs
    epochs = recipe.epochs if stop_after is None else min(stop_after, recipe.epochs)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        bar = tqdm(range(1, epochs + 1), desc=desc, disable=None if progress else True, leave=False)
        for epoch in bar:
            order = torch.randperm(n, generator=gen).to(device)
            running = torch.zeros((), device=device)
            for i in range(steps_per_epoch):
                idx = order[i * bs:(i + 1) * bs]
                x = augment(images[idx].float().div_(255), recipe.crop, recipe.flip)
                y = labels[idx]
                if batch_augment is not None:
                    x, y = batch_augment(x, y)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = recipe.lr_at(step, total)
                with _autocast(device):
                    loss = task.loss(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.detach()
                step += 1
            loss_value = (running / steps_per_epoch).item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training diverged at epoch {epoch} (loss {loss_value}); lower the lr")
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, model)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits (float32) of uint8 or [0, 1] float images (N, C, H, W), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        with _autocast(device):
            out.append(model(x).float())
    return torch.cat(out)


def accuracy(model: nn.Module, data: ImageDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy (in %) of ``model`` on ``data``."""
    device = next(model.parameters()).device
    images, labels = data.tensors(device)
    return (predict(model, images, batch_size).argmax(1) == labels).float().mean().item() * 100


def record_trajectory(model: nn.Module, data: ImageDataset, recipe: Recipe, steps: int, *, device="auto",
                      seed: int = 0, progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """θ0, θ1, …, θT: the model's state (CPU copies) before training and after each of the first T epochs.

    The model is trained in place; on return it holds θT.
    """
    snapshot = lambda m: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}  # noqa: E731
    states = [snapshot(model)]
    train(model, data, recipe, device=device, seed=seed, stop_after=steps,
          on_epoch=lambda e, m: states.append(snapshot(m)), progress=progress, desc="trajectory")
    return states
