"""UGE's objective L_all = L_gm + λ_fd·L_fd + λ_ud·L_ud (Eq. 4) and the frozen pieces it is built from:
the authorized networks' trajectory checkpoints and teachers, the L_fd feature space, a random hacker network.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from ... import distributed
from ...config import ProtectConfig
from ...data.dataset import ImageDataset
from ...models import create_model
from ...seeds import derive, sequence
from ...training import augment, train
from ...weights import build_network, load_weights, save_weights
from .features import build_feature_space
from .losses import (
    clean_gradient,
    feature_distance_loss,
    freeze_batchnorm,
    gradient_matching_loss,
    least_similar_class,
    matched_parameters,
    measured_gradient_distance,
    per_class_gradient_distance,
    per_sample_gradient_distance,
    undistill_loss,
)
from .workdir import _trained, _trajectory, _Workdir

log = logging.getLogger("uge")


def _feature_space(cfg, data, device, work, progress):
    """The L_fd feature space: CLIP (the paper) or an encoder trained on the clean data (offline fallback)."""
    if cfg.fd.space == "clip":
        return build_feature_space("clip", classes=data.classes, device=device, model_name=cfg.fd.clip_model,
                                   pretrained=cfg.fd.clip_checkpoint)
    log.warning("L_fd uses the offline fallback feature space (a %s encoder trained on the clean data, "
                "class means as class features), not CLIP as in the paper", cfg.fd.encoder_arch)
    encoder = create_model(cfg.fd.encoder_arch, data.num_classes, data.channels, seed=derive(cfg.seed, "encoder"))
    f = work.file("encoder.safetensors")
    if f.exists():
        encoder.load_state_dict(load_weights(f))
    else:
        train(encoder, data, cfg.fd.encoder_recipe, device=device, seed=derive(cfg.seed, "encoder"), progress=progress,
              desc="feature encoder")
        distributed.on_main(save_weights, f, encoder.state_dict())
    return build_feature_space("encoder", classes=data.classes, train_set=data, device=device, model=encoder,
                               arch=cfg.fd.encoder_arch)


def _frozen(model: nn.Module, device) -> nn.Module:
    return model.to(device).eval().requires_grad_(False)


class CleanGradientCache:
    """Clean gradients ∇θ CE(f_θt(x), y) by (network, checkpoint, batch), kept up to a memory budget.

    The clean target of L_gm depends only on the checkpoint and the clean batch, not on the generator, so
    when the generator sees the same batches every epoch each target is computed once instead of once per
    epoch. Entries are never evicted: once the budget is full, further targets are recomputed each time.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used, self.hits, self.misses = max_bytes, 0, 0, 0
        self._store: dict = {}

    def get(self, key, compute) -> list[torch.Tensor]:
        g = self._store.get(key)
        if g is not None:
            self.hits += 1
            return g
        self.misses += 1
        g = compute()
        size = sum(t.numel() * t.element_size() for t in g)
        if key is not None and self.used + size <= self.max_bytes:
            self._store[key] = g
            self.used += size
        return g


class UGEObjective:
    """L_all = L_gm + λ_fd·L_fd + λ_ud·L_ud (Eq. 4), with the losses that are switched off left out.

    Holds the frozen pieces the losses need: the trajectory checkpoints θ0..θT-1 of every authorized
    network (L_gm), their trained θT and a random hacker network (L_ud), and the feature space (L_fd).
    """

    def __init__(self, cfg: ProtectConfig, gm_models, ud_models, space, hacker, probe=None):
        self.cfg, self.gm_models, self.ud_models, self.space, self.hacker = cfg, gm_models, ud_models, space, hacker
        self.probe = probe  # a network of the authorized architecture from another init (diagnostics only)
        self.class_feats = space.class_features() if space is not None else None
        self.gm_params = [[matched_parameters(m) for m in models] for models in gm_models]
        self.grad_cache = CleanGradientCache(cfg.gm.cache_mb * 2 ** 20)

    def target(self, f_clean: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_fd's target class per sample: the least similar class (Eq. 9) or y + 1 (``fd_target``)."""
        if self.cfg.fd.target == "next":
            return (y + 1) % self.class_feats.shape[0]
        return least_similar_class(f_clean, self.class_feats, y)

    def gm_distance(self, model: nn.Module, params, x, x_u, y, key=None) -> torch.Tensor:
        """Eq. 6 at one checkpoint, in the configured reading (granularity, BatchNorm mode)."""
        cfg = self.cfg
        if cfg.gm.batchnorm == "frozen":
            freeze_batchnorm(model, x)
        else:
            model.train()
        if cfg.gm.granularity == "sample":
            return per_sample_gradient_distance(model, x, x_u, y, params)
        if cfg.gm.granularity == "class":
            return per_class_gradient_distance(model, x, x_u, y, params)
        g_clean = self.grad_cache.get(key, lambda: clean_gradient(model, x, y, params))
        return gradient_matching_loss(model, x, x_u, y, params, g_clean=g_clean)

    def terms(self, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
              batch_id: int | None = None, gm: bool = True) -> dict:
        """The weighted loss terms of one batch, by name ("gm", "fd", "ud").

        ``batch_id`` names the clean batch when the same batch comes back in later epochs, so its clean
        gradients can be reused (None: always recompute). ``gm=False`` leaves L_gm out (a warm-up epoch).
        """
        cfg, terms = self.cfg, {}
        if self.gm_models and gm:  # Eq. 6, averaged over authorized networks (Eq. 12); a random θt per step
            gm = []
            xa, xua = x, x_u
            if cfg.gm.augment:  # one crop + flip draw for each pair (x, x_u): the recipe's view of both
                xa, xua = augment(torch.cat([x, x_u], 1), cfg.recipe.crop, cfg.recipe.flip).split(x.shape[1], 1)
                batch_id = None
            for k, models in enumerate(self.gm_models):
                t = int(rng.integers(len(models)))
                key = None if batch_id is None else (k, t, batch_id)
                gm.append(self.gm_distance(models[t], self.gm_params[k][t], xa, xua, y, key))
            terms["gm"] = torch.stack(gm).mean()
        if self.space is not None:  # Eqs. 7–9
            with torch.no_grad():
                f_clean = self.space.image_features(x)
            terms["fd"] = cfg.fd.weight * feature_distance_loss(f_clean, self.space.image_features(x_u),
                                                                self.class_feats, y, cfg.fd.alpha,
                                                                target=self.target(f_clean, y))
        if self.ud_models:  # Eq. 11, averaged over authorized networks (Eq. 12)
            h = self.hacker(x_u)
            ud = cfg.ud
            terms["ud"] = ud.weight * torch.stack([undistill_loss(m(x_u), h, y, ud.omega, ud.temperature)
                                                   for m in self.ud_models]).mean()
        return terms

    def diagnose(self, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor) -> dict:
        """Is the perturbation invisible to the authorized network only, and did the feature attack converge?

        On one batch (x, x_u): the gradient distance of Eq. 6 (batch-mean loss, BatchNorm frozen at the clean
        batch: one fixed measure for every variant) averaged over every authorized checkpoint, and the same at
        a network of the authorized architecture from another init (a hacker's θ0); the share of x_u whose
        surrogate feature is nearest to its L_fd target class, and the nearest-class-feature accuracy on x_u.
        """
        out = {}
        x, x_u = x.detach(), x_u.detach()

        def dist(model):
            return measured_gradient_distance(model, x, x_u, y)

        if self.gm_models:
            out["diag_gm_authorized"] = float(np.mean([dist(m) for models in self.gm_models for m in models]))
        if self.probe is not None:
            out["diag_gm_hacker"] = dist(self.probe)
        if self.space is not None:
            with torch.no_grad():
                f_clean, f_u = self.space.image_features(x), self.space.image_features(x_u)
                nearest = (f_u @ self.class_feats.T).argmax(1)
                out["diag_fd_target_rate"] = (nearest == self.target(f_clean, y)).float().mean().item()
                out["diag_surrogate_acc"] = (nearest == y).float().mean().item()
        return out


def _objective(cfg: ProtectConfig, data: ImageDataset, device, work: _Workdir, progress: bool, seconds: dict):
    """Build the objective: trajectories (or θ0 alone), feature space and hacker; returns (objective, θ0s).

    The wall times of the two stages go into ``seconds`` ("trajectory", "feature_space").
    """
    use, timer = set(cfg.losses), time.perf_counter()
    theta0, gm_models, ud_models = [], [], []
    for k, spec in enumerate(cfg.authorized):
        if not use & {"gm", "ud"}:  # L_fd alone needs θ0 only (it is still published)
            net = build_network(spec.arch, data.num_classes, data.channels, spec.seed, spec.theta0)
            theta0.append(net.state_dict())
            continue
        states = _trajectory(k, spec, cfg, data, device, work, progress)
        theta0.append(states[0])
        if "gm" in use:  # θ0..θT-1 of the first data order, θ1..θT-1 of the others (θ0 is shared)
            more = [s for j in range(1, cfg.gm.trajectories)
                    for s in _trajectory(k, spec, cfg, data, device, work, progress, j)[1:-1]]
            gm_models.append([_load(spec.arch, data, s, device).train() for s in states[:-1] + more])
        if "ud" in use:
            teacher = states[-1] if cfg.ud.teacher == "checkpoint" else _trained(k, spec, cfg, data, device, work,
                                                                               progress)
            ud_models.append(_frozen(_load(spec.arch, data, teacher, device), device))
    seconds["trajectory"], timer = time.perf_counter() - timer, time.perf_counter()
    space = _frozen(_feature_space(cfg, data, device, work, progress), device) if "fd" in use else None
    hacker = None
    if "ud" in use:
        hacker = _frozen(create_model(cfg.ud.hacker_arch or cfg.authorized[0].arch, data.num_classes, data.channels,
                                      seed=derive(cfg.seed, "hacker")), device)
    seconds["feature_space"] = time.perf_counter() - timer
    probe = None
    if cfg.diagnostics and gm_models:
        probe = create_model(cfg.authorized[0].arch, data.num_classes, data.channels,
                             seed=derive(cfg.seed, "probe")).to(device)
    return UGEObjective(cfg, gm_models, ud_models, space, hacker, probe), theta0


def _load(arch: str, data: ImageDataset, state: dict, device) -> nn.Module:
    model = create_model(arch, data.num_classes, data.channels)
    model.load_state_dict(state)
    return model.to(device)


def _diagnostic_indices(data: ImageDataset, cfg: ProtectConfig, device, n: int = 128) -> torch.Tensor:
    """A fixed random batch of images on which the diagnostics are measured, every epoch the same."""
    return torch.from_numpy(np.random.default_rng(sequence(cfg.seed, "diagnostics")).permutation(len(data))[:n]).to(device)
