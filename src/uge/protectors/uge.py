"""The UGE protector: trajectory → generator training (Eq. 4) → protected images (Algorithm 1).

Registered as ``uge``, with its L_fd-only variant ``fd`` (the paper's "Ours (L_fd)" row of Table 3).

Long runs are resumable: the trajectories, the feature encoder and the generator (after every epoch) are
checkpointed in a work folder, and a rerun with the same config picks up where the last one stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import AuthorizedSpec, ProtectConfig
from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..features import build_feature_space
from ..losses import (
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
from ..models import Generator, create_model
from ..result import Protection, quantize
from ..seeds import derive, sequence
from ..training import augment, record_trajectory, train
from ..utils import atomic_file, atomic_write_text, from_dict, resolve_device
from ..weights import build_network, load_weights, save_weights
from .base import Protector, register_protector, result_of
from ..pgd import pgd, uniform_start

log = logging.getLogger("uge")
TITLE = "Ungeneralizable Examples (Ye & Wang, CVPR 2024)"


class _Workdir:
    """Checkpoints of one protection run; refuses to mix runs with different configs."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        cfg_file = path / "config.json"
        if cfg_file.exists():
            if json.loads(cfg_file.read_text()) != config:
                raise ConfigError(f"work folder {path} holds a run with another config; "
                                  "delete it or rerun with the same config to resume")
        else:
            atomic_write_text(cfg_file, json.dumps(config, indent=2))

    def file(self, name: str) -> Path:
        return self.path / name


def _trajectory(k, spec, cfg, data, device, work, progress, j: int = 0):
    """θ0..θT of authorized network k (its j-th data order), from the work folder or by training."""
    f = work.file(f"trajectory_{k}.safetensors" if j == 0 else f"trajectory_{k}_{j}.safetensors")
    if f.exists():
        log.info("authorized %d (%s): trajectory resumed from %s", k, spec.arch, f)
    return _recorded(f, spec, cfg, data, device, derive(cfg.seed, "trajectory", k, j), progress)


def _recorded(f: Path, spec: AuthorizedSpec, cfg, data: ImageDataset, device, seed: int, progress) -> list[dict]:
    """θ0..θT of ``spec`` trained on ``data`` with ``seed``: read from ``f``, or recorded and saved there."""
    if f.exists():
        states = [{} for _ in range(cfg.trajectory_epochs + 1)]
        for key, v in load_weights(f).items():
            t, _, name = key.partition("/")
            states[int(t)][name] = v
        return states
    model = build_network(spec.arch, data.num_classes, data.channels, spec.seed, spec.theta0)
    states = record_trajectory(model, data, cfg.recipe, cfg.trajectory_epochs, device=device, seed=seed,
                               progress=progress)
    save_weights(f, {f"{t}/{name}": v for t, s in enumerate(states) for name, v in s.items()})
    return states


def _trained(k, spec, cfg, data, device, work, progress) -> dict:
    """Authorized network k trained from θ0 with the whole published recipe on the clean data (L_ud's teacher)."""
    f = work.file(f"trained_{k}.safetensors")
    if f.exists():
        return load_weights(f)
    model = build_network(spec.arch, data.num_classes, data.channels, spec.seed, spec.theta0)
    train(model, data, cfg.recipe, device=device, seed=derive(cfg.seed, "teacher", k), progress=progress,
          desc="authorized (L_ud)")
    save_weights(f, model.state_dict())
    return model.state_dict()


def _feature_space(cfg, data, device, work, progress):
    """The L_fd feature space: CLIP (the paper) or an encoder trained on the clean data (offline fallback)."""
    if cfg.feature_space == "clip":
        return build_feature_space("clip", classes=data.classes, device=device, model_name=cfg.clip_model,
                                   pretrained=cfg.clip_checkpoint)
    log.warning("L_fd uses the offline fallback feature space (a %s encoder trained on the clean data, "
                "class means as class features), not CLIP as in the paper", cfg.encoder_arch)
    encoder = create_model(cfg.encoder_arch, data.num_classes, data.channels, seed=derive(cfg.seed, "encoder"))
    f = work.file("encoder.safetensors")
    if f.exists():
        encoder.load_state_dict(load_weights(f))
    else:
        train(encoder, data, cfg.encoder_recipe, device=device, seed=derive(cfg.seed, "encoder"), progress=progress,
              desc="feature encoder")
        save_weights(f, encoder.state_dict())
    return build_feature_space("encoder", classes=data.classes, train_set=data, device=device, model=encoder,
                               arch=cfg.encoder_arch)


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
        self.grad_cache = CleanGradientCache(cfg.clean_grad_cache_mb * 2 ** 20)

    def target(self, f_clean: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_fd's target class per sample: the least similar class (Eq. 9) or y + 1 (``fd_target``)."""
        if self.cfg.fd_target == "next":
            return (y + 1) % self.class_feats.shape[0]
        return least_similar_class(f_clean, self.class_feats, y)

    def gm_distance(self, model: nn.Module, params, x, x_u, y, key=None) -> torch.Tensor:
        """Eq. 6 at one checkpoint, in the configured reading (granularity, BatchNorm mode)."""
        cfg = self.cfg
        if cfg.gm_batchnorm == "frozen":
            freeze_batchnorm(model, x)
        else:
            model.train()
        if cfg.gm_granularity == "sample":
            return per_sample_gradient_distance(model, x, x_u, y, params)
        if cfg.gm_granularity == "class":
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
            if cfg.gm_augment:  # one crop + flip draw for each pair (x, x_u): the recipe's view of both
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
            terms["fd"] = cfg.lambda_fd * feature_distance_loss(f_clean, self.space.image_features(x_u),
                                                                self.class_feats, y, cfg.alpha,
                                                                target=self.target(f_clean, y))
        if self.ud_models:  # Eq. 11, averaged over authorized networks (Eq. 12)
            h = self.hacker(x_u)
            terms["ud"] = cfg.lambda_ud * torch.stack([undistill_loss(m(x_u), h, y, cfg.omega, cfg.temperature)
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
            more = [s for j in range(1, cfg.gm_trajectories)
                    for s in _trajectory(k, spec, cfg, data, device, work, progress, j)[1:-1]]
            gm_models.append([_load(spec.arch, data, s, device).train() for s in states[:-1] + more])
        if "ud" in use:
            teacher = states[-1] if cfg.ud_teacher == "checkpoint" else _trained(k, spec, cfg, data, device, work,
                                                                               progress)
            ud_models.append(_frozen(_load(spec.arch, data, teacher, device), device))
    seconds["trajectory"], timer = time.perf_counter() - timer, time.perf_counter()
    space = _frozen(_feature_space(cfg, data, device, work, progress), device) if "fd" in use else None
    hacker = None
    if "ud" in use:
        hacker = _frozen(create_model(cfg.hacker_arch or cfg.authorized[0].arch, data.num_classes, data.channels,
                                      seed=derive(cfg.seed, "hacker")), device)
    seconds["feature_space"] = time.perf_counter() - timer
    probe = None
    if cfg.diagnostics and gm_models:
        probe = create_model(cfg.authorized[0].arch, data.num_classes, data.channels,
                             seed=derive(cfg.seed, "probe")).to(device)
    return UGEObjective(cfg, gm_models, ud_models, space, hacker, probe), theta0


def _train_generator(objective: UGEObjective, cfg: ProtectConfig, data: ImageDataset, device, work: _Workdir,
                     progress: bool) -> tuple[Generator, list[dict]]:
    """Algorithm 1, lines 6–15: minimize L_all over the generator, checkpointing after every epoch."""
    torch.manual_seed(derive(cfg.seed, "generator"))
    gen = Generator(data.channels, cfg.rho, width=cfg.generator_width, center=cfg.generator_center).to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.generator_lr)
    history, start = [], 0
    ckpt = work.file("generator.pt")
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        gen.load_state_dict(state["generator"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        log.info("generator resumed after epoch %d of %d", start, cfg.generator_epochs)
    images, labels = data.tensors(device)
    n, bs = len(data), min(cfg.generator_batch_size, len(data))
    steps = max(1, n // bs)
    # With a clean-gradient cache the batches are one fixed partition visited in a new order every epoch
    # (so clean targets repeat); without it, every epoch reshuffles the images (the reference behaviour).
    fixed = cfg.clean_grad_cache_mb > 0 and "gm" in cfg.losses
    partition = torch.from_numpy(np.random.default_rng(sequence(cfg.seed, "partition")).permutation(n)).to(device)
    bar = tqdm(range(start, cfg.generator_epochs), desc="generator", disable=None if progress else True, leave=False,
               initial=start, total=cfg.generator_epochs)
    for epoch in bar:
        # Every epoch draws from its own seeds (numpy: batch order and checkpoints; torch: dropout, augmentation),
        # so a run resumed from the checkpoint of the epoch before publishes the same bytes as one never stopped.
        rng = np.random.default_rng(sequence(cfg.seed, "generator_epoch", epoch))
        torch.manual_seed(derive(cfg.seed, "generator_epoch", epoch))
        gen.train()
        sums: dict[str, torch.Tensor] = {}
        batch_order = rng.permutation(steps) if fixed else range(steps)
        order = partition if fixed else torch.from_numpy(rng.permutation(n)).to(device)
        for i in range(steps):
            j = int(batch_order[i])
            idx = order[j * bs:(j + 1) * bs]
            x, y = images[idx].float().div_(255), labels[idx]
            terms = objective.terms(x, gen(x), y, rng, batch_id=j if fixed else None,
                                    gm=epoch >= cfg.gm_warmup_epochs)
            terms["total"] = loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=list(gen.parameters()))  # the networks inside the losses stay untouched
            opt.step()
            for k, v in terms.items():  # summed on the device: one synchronization per epoch, not per step
                sums[k] = sums.get(k, 0) + v.detach()
        sums = {k: v.item() for k, v in sums.items()}
        if not all(np.isfinite(v) for v in sums.values()) or not all(torch.isfinite(p).all() for p in gen.parameters()):
            raise FloatingPointError(f"generator training diverged in epoch {epoch + 1} (losses {sums}); "
                                     "lower generator_lr, or report this with the config")
        record = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}}
        if cfg.diagnostics:
            idx = _diagnostic_indices(data, cfg, device)
            xd = images[idx].float().div_(255)
            with torch.no_grad():
                xd_u = gen(xd)
            record.update(objective.diagnose(xd, xd_u, labels[idx]))
        history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch"})
        with atomic_file(ckpt) as tmp:  # a kill mid-save must not corrupt the resume point
            torch.save({"generator": gen.state_dict(), "optimizer": opt.state_dict(), "history": history,
                        "epoch": epoch + 1}, tmp)
    return gen, history


def _diagnostic_indices(data: ImageDataset, cfg: ProtectConfig, device, n: int = 128) -> torch.Tensor:
    """A fixed random batch of images on which the diagnostics are measured, every epoch the same."""
    return torch.from_numpy(np.random.default_rng(sequence(cfg.seed, "diagnostics")).permutation(len(data))[:n]).to(device)


def _protected_trajectories(objective: UGEObjective, cfg: ProtectConfig, data_u: ImageDataset, device,
                            work: _Workdir, progress: bool, r: int) -> None:
    """Round ``r`` of on-trajectory matching: every authorized network trained from θ0 on the current protected
    set ``data_u`` for T epochs; its checkpoints θ1..θT join that network's L_gm checkpoints (saved, so a resumed
    run adds the same ones)."""
    for k, spec in enumerate(cfg.authorized):
        states = _recorded(work.file(f"trajectory_{k}_round{r}.safetensors"), spec, cfg, data_u, device,
                           derive(cfg.seed, "trajectory", k, cfg.gm_trajectories + r), progress)
        models = [_load(spec.arch, data_u, s, device).train() for s in states[1:]]
        objective.gm_models[k].extend(models)
        objective.gm_params[k].extend(matched_parameters(m) for m in models)
        log.info("round %d: authorized %d matched at %d checkpoints of its run on the protected set", r, k,
                 len(models))


def _optimize_delta(objective: UGEObjective, cfg: ProtectConfig, data: ImageDataset, device, work: _Workdir,
                    progress: bool) -> tuple[torch.Tensor, list[dict]]:
    """The per-sample parametrization: δ of every image optimised directly on L_all, batch by batch.

    Each batch takes ``delta_steps`` signed-gradient steps of size 2.5ρ/steps from a uniform random start
    in the ball (PGD, Madry et al.), every step on a new random checkpoint. With ``gm_rounds`` > 1 the set is
    passed over again, each pass starting from the last δ, after the authorized networks were trained on the
    protected set of the pass before (:func:`_protected_trajectories`). Progress is saved after every batch,
    so an interrupted run resumes. Returns x_u (N, C, H, W) in [0, 1] on the CPU, and a history with the mean
    loss terms after each step of the last pass (``epoch`` counts steps; ``round`` the pass) plus the
    diagnostics of the final δ.
    """
    images, labels = data.tensors(device)
    n, bs, rho = len(data), min(cfg.generator_batch_size, len(data)), cfg.rho
    delta = uniform_start(images.shape, rho, cfg.seed, device)
    ckpt, start_round, done = work.file("delta.pt"), 0, 0
    sums = [dict() for _ in range(cfg.delta_steps)]
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        delta, done, sums, start_round = state["delta"], state["done"], state["sums"], state.get("round", 0)
    step = 2.5 * rho / cfg.delta_steps
    starts = list(range(0, n, bs))
    for r in range(cfg.gm_rounds):
        if r > 0:
            x_u = quantize((images.float() / 255 + delta).clamp(0, 1), images, cfg.rho)
            data_u = ImageDataset(x_u.permute(0, 2, 3, 1).cpu().numpy(), data.labels.copy(), list(data.classes))
            _protected_trajectories(objective, cfg, data_u, device, work, progress, r)
        if r < start_round:
            continue
        if r > start_round:
            done, sums = 0, [dict() for _ in range(cfg.delta_steps)]
        for b in tqdm(range(done, len(starts)), desc="δ" if cfg.gm_rounds == 1 else f"δ, round {r + 1}",
                      disable=None if progress else True, leave=False, initial=done, total=len(starts)):
            # Each batch draws from its own seeds: a resumed run repeats an uninterrupted one exactly.
            rng = np.random.default_rng(sequence(cfg.seed, "delta_batch", b, r))
            torch.manual_seed(derive(cfg.seed, "delta_batch", b, r))
            sl = slice(starts[b], starts[b] + bs)
            x, y = images[sl].float().div_(255), labels[sl]
            calls = iter(sums)  # one loss call per step: add the step's terms to its history entry

            def loss(x_u, x=x, y=y, calls=calls):
                terms, entry = objective.terms(x, x_u.clamp(0, 1), y, rng), next(calls)
                for k, v in terms.items():
                    entry[k] = entry.get(k, 0.0) + v.item() * len(y) / n
                return sum(terms.values())

            delta[sl] = pgd(loss, x, delta[sl], rho, cfg.delta_steps, step, minimize=True)
            with atomic_file(ckpt) as tmp:
                torch.save({"delta": delta, "done": b + 1, "sums": sums, "round": r}, tmp)
    history = [{"epoch": i + 1, **s, "total": sum(s.values())} for i, s in enumerate(sums)]
    if cfg.gm_rounds > 1:
        for h in history:
            h["round"] = cfg.gm_rounds
    x_u = (images.float() / 255 + delta).clamp(0, 1)
    if cfg.diagnostics:
        idx = _diagnostic_indices(data, cfg, device)
        history[-1].update(objective.diagnose(images[idx].float() / 255, x_u[idx], labels[idx]))
    return x_u.cpu(), history


def protect(data: ImageDataset, config: ProtectConfig, *, device="auto", work_dir: str | Path | None = None,
            progress: bool = True, keep_work: bool = False) -> Protection:
    """Train a UGE generator on ``data`` and return the protected (8-bit) set; the run's seed is ``config.seed``.

    The same as ``UGEProtector.from_config(config).protect(data, seed=config.seed)``.

    Args:
        data: the clean training set.
        config: hyperparameters, authorized networks and which losses are on.
        device: "auto", "cpu" or "cuda".
        work_dir: checkpoint folder for resuming (a temporary one is used when None and deleted at the end).
        keep_work: keep ``work_dir`` after success (otherwise it is deleted).
    """
    return UGEProtector.from_config(config).protect(data, device=device, work_dir=work_dir, progress=progress,
                                                    seed=config.seed, keep_work=keep_work)


def _run(data: ImageDataset, cfg: ProtectConfig, device, work_dir, progress: bool, keep_work: bool) -> dict:
    """Algorithm 1 with ``cfg`` (its ``seed`` the run's): the protected set and what the result records."""
    device = resolve_device(device)
    for a in cfg.authorized:  # fail on a bad name before any training
        create_model(a.arch, data.num_classes, data.channels)
    work = _Workdir(Path(work_dir or tempfile.mkdtemp(prefix="uge-work-")), cfg.to_dict())
    seconds = {}
    objective, theta0 = _objective(cfg, data, device, work, progress, seconds)
    timer = time.perf_counter()
    if cfg.parametrization == "delta":
        x_u, history = _optimize_delta(objective, cfg, data, device, work, progress)
        seconds["generator"] = time.perf_counter() - timer  # the optimisation stage, whatever its form
        images, _ = data.tensors("cpu")
        protected = ImageDataset(quantize(x_u, images, cfg.rho).permute(0, 2, 3, 1).numpy(), data.labels.copy(),
                                 list(data.classes))
    else:
        gen, history = _train_generator(objective, cfg, data, device, work, progress)
        seconds["generator"] = time.perf_counter() - timer
        timer = time.perf_counter()
        recalibrate_batchnorm(gen, data, device)
        protected = generate(gen, data, device)
        seconds["generate"] = time.perf_counter() - timer
    if not keep_work:
        shutil.rmtree(work.path, ignore_errors=True)
    space_name = objective.space.name if objective.space is not None else "none"
    return {"protected": protected, "theta0": theta0, "feature_space": space_name, "history": history,
            "seconds": seconds, "authorized": list(cfg.authorized), "recipe": cfg.recipe}


def _load(arch: str, data: ImageDataset, state: dict, device) -> nn.Module:
    model = create_model(arch, data.num_classes, data.channels)
    model.load_state_dict(state)
    return model.to(device)


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


# ------------------------------------------------------------------ behind the protector API (uge.protectors)

@register_protector
class UGEProtector(Protector):
    """Ungeneralizable Examples (Ye & Wang, CVPR 2024): :func:`protect` behind the protector API.

    Parameters are the fields of :class:`~uge.config.ProtectConfig` but ``seed`` (the run's seed is
    :meth:`protect`'s, as for every method), as plain values (``authorized`` as a list of
    {"arch", "seed", "theta0"} tables or "ARCH:SEED" strings, recipes as tables).
    """

    name = "uge"
    title = TITLE
    fixed: ClassVar[dict] = {}  # ProtectConfig fields this variant pins

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.parameter_names()))
        if unknown:
            pinned = [k for k in unknown if k in self.fixed]
            raise ConfigError(f"protector {self.name!r}: unknown parameter(s) {', '.join(unknown)}"
                              + (f" ({', '.join(f'{k}={self.fixed[k]!r}' for k in pinned)} fixed)" if pinned else "")
                              + f"; allowed: {', '.join(self.parameter_names())}")
        params = {**self.defaults(), **params, **self.fixed}
        if isinstance(params.get("authorized"), list):
            params["authorized"] = [AuthorizedSpec.parse(a) if isinstance(a, str) else a
                                    for a in params["authorized"]]
        try:
            self.config = from_dict(ProtectConfig, params, "protect config")
        except (ConfigError, TypeError) as e:  # TypeError: a value of the wrong shape inside a nested table
            raise ConfigError(f"protector {self.name!r}: {e}") from None

    @classmethod
    def from_config(cls, config: ProtectConfig) -> "UGEProtector":
        """The protector with ``config``'s settings (its ``seed`` is the run's: give it to :meth:`protect`)."""
        d = config.to_dict()
        d.pop("seed")
        return cls(**d)

    @classmethod
    def defaults(cls) -> dict:
        return {k: v for k, v in ProtectConfig().to_dict().items() if k in cls.parameter_names()}

    @classmethod
    def parameter_names(cls) -> list[str]:
        import dataclasses

        return [f.name for f in dataclasses.fields(ProtectConfig) if f.name not in cls.fixed and f.name != "seed"]

    @property
    def rho(self) -> float:
        return self.config.rho

    def params(self) -> dict:
        d = self.config.to_dict()
        d.pop("seed")
        return d

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0, keep_work: bool = False) -> Protection:
        cfg = dataclasses.replace(self.config, seed=seed)
        fields = _run(data, cfg, device, work_dir, progress, keep_work)
        return result_of(self, fields.pop("protected"), seed, **fields)


@register_protector
class FDProtector(UGEProtector):
    """UGE's L_fd alone (Eqs. 7–9): the unlearnable-example variant of Table 3, "Ours (L_fd)".

    ``losses`` is pinned to ("fd",), and ρ defaults to 8/255, the budget of the other baselines. The
    authorized network's θ0 is still published (the UGE layout), but no trajectory is trained.
    """

    name = "fd"
    title = "UGE's feature-distance loss L_fd alone (Ye & Wang, CVPR 2024, Table 3)"
    fixed: ClassVar[dict] = {"losses": ["fd"]}

    @classmethod
    def defaults(cls) -> dict:
        return {**super().defaults(), "rho": 8 / 255}
