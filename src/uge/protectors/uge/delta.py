"""UGE's per-sample parametrization: δ of every image optimised directly on L_all (PGD), optionally in rounds
that match at the authorized networks' runs on the protected set of the round before."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ...config import ProtectConfig
from ...data.dataset import ImageDataset
from ...pgd import pgd, uniform_start
from ...result import quantize
from ...seeds import derive
from .loop import Parametrization, optimize
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


class _DeltaOptimisation(Parametrization):
    """δ of every image optimised directly on L_all, one batch a unit; ``gm_rounds`` passes over the set."""

    name, stream, unit = "delta", "delta_batch", "batch"

    def __init__(self, objective: UGEObjective, cfg: ProtectConfig, data: ImageDataset, device, work: _Workdir,
                 progress: bool):
        self.objective, self.cfg, self.data, self.device, self.work, self.progress = (objective, cfg, data, device,
                                                                                      work, progress)
        self.images, self.labels = data.tensors(device)
        self.n, self.bs = len(data), min(cfg.batch_size, len(data))
        self.delta = uniform_start(self.images.shape, cfg.rho, cfg.seed, device)
        self.sums: list[dict] = [dict() for _ in range(cfg.delta.steps)]
        self.step_size = 2.5 * cfg.rho / cfg.delta.steps
        self.starts = list(range(0, self.n, self.bs))
        self.rounds = cfg.delta.gm_rounds

    def units(self) -> int:
        return len(self.starts)

    def seed_index(self, r: int, b: int) -> tuple[int, ...]:
        return (b, r)

    def label(self, r: int) -> str:
        return "δ" if self.rounds == 1 else f"δ, round {r + 1}"

    def begin_round(self, r: int) -> None:
        if r > 0:
            x_u = quantize((self.images.float() / 255 + self.delta).clamp(0, 1), self.images, self.cfg.rho)
            data_u = ImageDataset(x_u.permute(0, 2, 3, 1).cpu().numpy(), self.data.labels.copy(),
                                  list(self.data.classes))
            _protected_trajectories(self.objective, self.cfg, data_u, self.device, self.work, self.progress, r)

    def reset_round(self, r: int) -> None:
        self.sums = [dict() for _ in range(self.cfg.delta.steps)]

    def step(self, r: int, b: int, rng: np.random.Generator) -> None:
        sl = slice(self.starts[b], self.starts[b] + self.bs)
        x, y = self.images[sl].float().div_(255), self.labels[sl]
        calls, objective, n = iter(self.sums), self.objective, self.n  # one loss call per step: add its terms

        def loss(x_u):
            terms, entry = objective.terms(x, x_u.clamp(0, 1), y, rng), next(calls)
            for k, v in terms.items():
                entry[k] = entry.get(k, 0.0) + v.item() * len(y) / n
            return sum(terms.values())

        self.delta[sl] = pgd(loss, x, self.delta[sl], self.cfg.rho, self.cfg.delta.steps, self.step_size,
                             minimize=True)

    def state_dict(self) -> dict:
        return {"delta": self.delta, "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.delta, self.sums = state["delta"], state["sums"]


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
    opt = _DeltaOptimisation(objective, cfg, data, device, work, progress)
    optimize(opt, work.file("delta.pt"), cfg.seed, device, progress)
    history = [{"epoch": i + 1, **s, "total": sum(s.values())} for i, s in enumerate(opt.sums)]
    if cfg.delta.gm_rounds > 1:
        for h in history:
            h["round"] = cfg.delta.gm_rounds
    x_u = (opt.images.float() / 255 + opt.delta).clamp(0, 1)
    if cfg.diagnostics:
        idx = _diagnostic_indices(data, cfg, device)
        history[-1].update(objective.diagnose(opt.images[idx].float() / 255, x_u[idx], opt.labels[idx]))
    return x_u.cpu(), history
