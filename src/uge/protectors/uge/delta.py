"""UGE's per-sample parametrization: δ of every image optimised directly on L_all (PGD), optionally in rounds
that match at the authorized networks' runs on the protected set of the round before."""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ...config import ProtectConfig
from ...data.dataset import ImageDataset
from ...pgd import pgd, uniform_start
from ...result import quantize
from ...seeds import derive, sequence
from ...utils import atomic_file
from .losses import matched_parameters
from .objective import UGEObjective, _diagnostic_indices, _load
from .workdir import _recorded, _Workdir

log = logging.getLogger("uge")


def _protected_trajectories(objective: UGEObjective, cfg: ProtectConfig, data_u: ImageDataset, device,
                            work: _Workdir, progress: bool, r: int) -> None:
    """Round ``r`` of on-trajectory matching: every authorized network trained from θ0 on the current protected
    set ``data_u`` for T epochs; its checkpoints θ1..θT join that network's L_gm checkpoints (saved, so a resumed
    run adds the same ones)."""
    for k, spec in enumerate(cfg.authorized):
        states = _recorded(work.file(f"trajectory_{k}_round{r}.safetensors"), spec, cfg, data_u, device,
                           derive(cfg.seed, "trajectory", k, cfg.gm.trajectories + r), progress)
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
    n, bs, rho = len(data), min(cfg.batch_size, len(data)), cfg.rho
    delta = uniform_start(images.shape, rho, cfg.seed, device)
    ckpt, start_round, done = work.file("delta.pt"), 0, 0
    sums = [dict() for _ in range(cfg.delta.steps)]
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        delta, done, sums, start_round = state["delta"], state["done"], state["sums"], state.get("round", 0)
    step = 2.5 * rho / cfg.delta.steps
    starts = list(range(0, n, bs))
    for r in range(cfg.delta.gm_rounds):
        if r > 0:
            x_u = quantize((images.float() / 255 + delta).clamp(0, 1), images, cfg.rho)
            data_u = ImageDataset(x_u.permute(0, 2, 3, 1).cpu().numpy(), data.labels.copy(), list(data.classes))
            _protected_trajectories(objective, cfg, data_u, device, work, progress, r)
        if r < start_round:
            continue
        if r > start_round:
            done, sums = 0, [dict() for _ in range(cfg.delta.steps)]
        for b in tqdm(range(done, len(starts)), desc="δ" if cfg.delta.gm_rounds == 1 else f"δ, round {r + 1}",
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

            delta[sl] = pgd(loss, x, delta[sl], rho, cfg.delta.steps, step, minimize=True)
            with atomic_file(ckpt) as tmp:
                torch.save({"delta": delta, "done": b + 1, "sums": sums, "round": r}, tmp)
    history = [{"epoch": i + 1, **s, "total": sum(s.values())} for i, s in enumerate(sums)]
    if cfg.delta.gm_rounds > 1:
        for h in history:
            h["round"] = cfg.delta.gm_rounds
    x_u = (images.float() / 255 + delta).clamp(0, 1)
    if cfg.diagnostics:
        idx = _diagnostic_indices(data, cfg, device)
        history[-1].update(objective.diagnose(images[idx].float() / 255, x_u[idx], labels[idx]))
    return x_u.cpu(), history
