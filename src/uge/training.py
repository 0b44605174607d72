"""The one training loop: SGD + momentum, a warmup/decay schedule, crop + flip augmentation on the device.

A *task* turns a batch into a loss (supervised cross-entropy, distillation from a frozen teacher, or PGD
adversarial training around either), so normal training, distillation, a hacker's countermeasures and
trajectory recording all run through :func:`train`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import SCHEDULES, Recipe  # noqa: F401  (Recipe lives in the config layer; re-exported)
from .data.dataset import ImageDataset
from .distributed import is_main, mean, on_main, rank_device, shard, sync_buffers, wrap
from .errors import ConfigError
from .pgd import pgd
from .utils import resolve_device
from .weights import load_weights, read_metadata, save_weights

log = logging.getLogger("uge")


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


def augment(x: torch.Tensor, crop: bool = True, flip: bool = True, *, batch: int | None = None,
            part: slice | None = None) -> torch.Tensor:
    """Random crop (zero padding of size/8, at least 1 px) and horizontal flip of a batch, on its device.

    With ``part``, x is that slice of a batch of ``batch`` samples (one rank's under DDP): the random numbers
    are drawn for the whole batch and sliced, so the ranks together augment it exactly as one process does.
    """
    b, c, h, w = x.shape
    draw, take = (b, slice(None)) if part is None else (batch, part)
    if crop:
        p = max(1, round(min(h, w) / 8))
        xp = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (draw, 1), device=x.device)[take]
        ox = torch.randint(0, 2 * p + 1, (draw, 1), device=x.device)[take]
        rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None, None],
               torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(draw, 1, 1, 1, device=x.device)[take] < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x


def autocast(device: torch.device):
    """bf16 autocast on a GPU; on the CPU a no-op (full precision)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(model: nn.Module, data: ImageDataset, recipe: Recipe, *, task=None, device="auto", seed: int = 0,
          stop_after: int | None = None, on_epoch: Callable[[int, nn.Module], None] | None = None,
          progress: bool = True, desc: str = "train",
          batch_augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
          checkpoint: str | os.PathLike | None = None, sync_bn: bool = False) -> nn.Module:
    """Train ``model`` in place on ``data`` with ``recipe`` and return it.

    Args:
        task: :class:`SupervisedTask` (default), :class:`DistillTask` or :class:`AdversarialTask`.
        seed: fixes the shuffling and augmentation; the same seed repeats the run on the same device.
        batch_augment: ``(x, y) -> (x, y)`` applied to every batch after the recipe's crop and flip; x is
            float (B, C, H, W) in [0, 1] on the device, y int64 labels (B,); it may return soft targets
            (B, K). A hacker's countermeasures (:func:`uge.countermeasures.make_batch_augment`) come in here.
        stop_after: stop after this many epochs while keeping the schedule of ``recipe.epochs``
            (trajectory recording uses the first T epochs of the authorized recipe).
        on_epoch: called as ``on_epoch(epoch, model)`` after each epoch trained in this call (epoch counts from 1).
        checkpoint: a file written after every epoch (the model, the optimizer's momentum, the random states of
            the data order and the augmentation) and resumed from when it exists, so a rerun of a killed run
            ends with the parameters of one never stopped; a checkpoint of another run is refused.
        sync_bn: under DDP on GPUs, BatchNorm with the global batch's statistics (torch's SyncBatchNorm).

    Under ``torchrun`` (:mod:`uge.distributed`) every rank draws the same data order and augmentation from
    ``seed`` and trains on its equal part of each global batch of ``recipe.batch_size``; DDP averages the
    ranks' gradients, the gradient of the global batch's mean loss, so a network without BatchNorm ends as in
    one process up to float rounding. BatchNorm normalizes each part by its own statistics (unless
    ``sync_bn``) and keeps rank 0's running statistics. ``batch_augment`` and adversarial training draw their
    random numbers per part: the same kind of training, not one process's draws. Rank 0 writes the checkpoint
    and every rank resumes from it.
    """
    device = rank_device(resolve_device(device))
    task = task or SupervisedTask()
    task.to(device)  # tasks that hold networks (a distillation teacher) move them to the device
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    images, labels = data.batch_source(device)  # a stored set: each batch's rows read from its file
    n, bs = len(data), min(recipe.batch_size, len(data))
    part = shard(bs)  # this rank's slice of every global batch (None: one process, all of it)
    steps_per_epoch = n // bs  # drop the last partial batch: BatchNorm needs more than one sample
    total = steps_per_epoch * recipe.epochs
    epochs = recipe.epochs if stop_after is None else min(stop_after, recipe.epochs)
    opt = _optimizer(model, recipe)
    gen = torch.Generator().manual_seed(seed)
    run = {"recipe": recipe.to_dict(), "seed": seed, "samples": n, "task": task.name}  # what a checkpoint must match
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        done = _resume(checkpoint, run, model, opt, gen, device) if checkpoint else 0
        net = wrap(model, device, sync_bn)  # the model itself in one process
        step = done * steps_per_epoch
        bar = tqdm(range(done + 1, epochs + 1), desc=desc, disable=None if progress and is_main() else True,
                   leave=False)
        for epoch in bar:
            order = torch.randperm(n, generator=gen).to(device)
            running = torch.zeros((), device=device)
            for i in range(steps_per_epoch):
                idx = order[i * bs:(i + 1) * bs]
                if part is not None:
                    idx = idx[part]
                x = augment(images[idx].float().div_(255), recipe.crop, recipe.flip, batch=bs, part=part)
                y = labels[idx]
                if batch_augment is not None:
                    x, y = batch_augment(x, y)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = recipe.lr_at(step, total)
                with autocast(device):
                    loss = task.loss(net, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.detach()
                step += 1
            loss_value = mean(running / steps_per_epoch).item()  # every rank: all stop together on divergence
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training diverged at epoch {epoch} (loss {loss_value}); lower the lr")
            bar.set_postfix(loss=f"{loss_value:.3f}")
            sync_buffers(model)  # one network on every rank, for on_epoch and the checkpoint
            if on_epoch is not None:
                on_epoch(epoch, model)
            if checkpoint:
                on_main(_save_checkpoint, checkpoint, run, epoch, model, opt, gen, device)
    return model.eval()


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with the recipe's momentum; weight decay on weights only, not on biases and norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0)


def _save_checkpoint(path, run: dict, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
                     gen: torch.Generator, device: torch.device) -> None:
    """Everything a rerun needs to go on after ``epoch`` as if never stopped (safetensors, atomically)."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        tensors.update({f"opt/{i}/{k}": v for k, v in state.items() if torch.is_tensor(v)})
    tensors.update({"rng/order": gen.get_state(), "rng/cpu": torch.get_rng_state()})
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    save_weights(path, tensors, metadata={"epoch": str(epoch), "run": json.dumps(run, sort_keys=True)})


def _resume(path, run: dict, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
            device: torch.device) -> int:
    """Load the checkpoint at ``path`` into the run's state; the epochs it had trained (0 without one)."""
    if not Path(path).is_file():
        return 0
    meta = read_metadata(path)
    if json.loads(meta.get("run", "null")) != json.loads(json.dumps(run)):
        raise ConfigError(f"checkpoint {path} is of another run ({meta.get('run')}; now {json.dumps(run)}); "
                          "delete it, or rerun with the same settings to resume")
    saved = load_weights(path)
    part = lambda prefix: {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}  # noqa: E731
    model.load_state_dict(part("model/"))
    state = {}
    for key, v in part("opt/").items():
        i, _, name = key.partition("/")
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({**opt.state_dict(), "state": state})
    gen.set_state(saved["rng/order"])
    torch.set_rng_state(saved["rng/cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng/cuda"], device)
    log.info("%s: resumed after epoch %s", path, meta["epoch"])
    return int(meta["epoch"])


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits (float32) of uint8 or [0, 1] float images (N, C, H, W), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        with autocast(device):
            out.append(model(x).float())
    return torch.cat(out)


def accuracy(model: nn.Module, data: ImageDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy (in %) of ``model`` on ``data``."""
    device = next(model.parameters()).device
    if data.stored:  # chunk by chunk, never the whole set
        hits = sum(int((predict(model, torch.from_numpy(x.transpose(0, 3, 1, 2)).to(device), batch_size).argmax(1).cpu()
                        == torch.from_numpy(data.labels[a:a + len(x)])).sum()) for a, x in data.chunks())
        return hits / len(data) * 100
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
