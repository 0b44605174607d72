"""UGE's work folder: one run's checkpoints, and the authorized networks' trajectories kept in it.

Long runs are resumable: the trajectories, the feature encoder and the generator (after every epoch) are
checkpointed in a work folder, and a rerun with the same config picks up where the last one stopped. Under
torchrun every rank reads the folder and rank 0 alone writes it (:mod:`uge.distributed`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ... import distributed
from ...config import AuthorizedSpec
from ...data.dataset import ImageDataset
from ...errors import ConfigError
from ...seeds import derive
from ...training import record_trajectory, train
from ...utils import atomic_write_text
from ...weights import build_network, load_weights, save_weights

log = logging.getLogger("uge")


class _Workdir:
    """Checkpoints of one protection run; refuses to mix runs with different configs."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        cfg_file = path / "config.json"
        found = cfg_file.exists()
        distributed.barrier()  # under torchrun every rank looks before rank 0 writes: they agree on what they saw
        if found:
            if json.loads(cfg_file.read_text()) != config:
                raise ConfigError(f"work folder {path} holds a run with another config; "
                                  "delete it or rerun with the same config to resume")
        else:
            distributed.on_main(atomic_write_text, cfg_file, json.dumps(config, indent=2))

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
    distributed.on_main(save_weights, f, {f"{t}/{name}": v for t, s in enumerate(states) for name, v in s.items()})
    return states


def _trained(k, spec, cfg, data, device, work, progress) -> dict:
    """Authorized network k trained from θ0 with the whole published recipe on the clean data (L_ud's teacher)."""
    f = work.file(f"trained_{k}.safetensors")
    if f.exists():
        return load_weights(f)
    model = build_network(spec.arch, data.num_classes, data.channels, spec.seed, spec.theta0)
    train(model, data, cfg.recipe, device=device, seed=derive(cfg.seed, "teacher", k), progress=progress,
          desc="authorized (L_ud)")
    distributed.on_main(save_weights, f, model.state_dict())
    return model.state_dict()
