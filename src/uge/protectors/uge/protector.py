"""The UGE protector: trajectory → generator training (Eq. 4) → protected images (Algorithm 1).

Registered as ``uge``, with its L_fd-only variant ``fd`` (the paper's "Ours (L_fd)" row of Table 3).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import ClassVar

from ... import distributed
from ...config import FLAT_KEYS, AuthorizedSpec, ProtectConfig
from ...data.dataset import ImageDataset
from ...errors import ConfigError
from ...models import create_model
from ...params import Param
from ...result import Protection, quantize
from ...utils import resolve_device
from ..base import Protector, register_protector, result_of
from .delta import _optimize_delta
from .generator import _train_generator, generate, recalibrate_batchnorm
from .objective import _objective
from .workdir import _Workdir

TITLE = "Ungeneralizable Examples (Ye & Wang, CVPR 2024)"


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
    device = distributed.rank_device(resolve_device(device))
    for a in cfg.authorized:  # fail on a bad name before any training
        create_model(a.arch, data.num_classes, data.channels)
    if distributed.world().size > 1 and work_dir is None:
        raise ConfigError("under torchrun the ranks share one work folder: give work_dir")
    if distributed.world().size > 1 and cfg.parametrization == "delta":
        raise ConfigError("UGE's per-sample δ parametrization runs in one process; under torchrun use the "
                          "generator (parametrization 'generator', the default)")
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
        distributed.on_main(shutil.rmtree, work.path, ignore_errors=True)
    space_name = objective.space.name if objective.space is not None else "none"
    return {"protected": protected, "theta0": theta0, "feature_space": space_name, "history": history,
            "seconds": seconds, "authorized": list(cfg.authorized), "recipe": cfg.recipe}



# ------------------------------------------------------------------ behind the protector API (uge.protectors)

@register_protector
class UGEProtector(Protector):
    """Ungeneralizable Examples (Ye & Wang, CVPR 2024): :func:`protect` behind the protector API.

    Parameters are the flat keys of :class:`~uge.config.ProtectConfig` (:data:`~uge.config.FLAT_KEYS`) but
    ``seed`` (the run's seed is :meth:`protect`'s, as for every method), as plain values (``authorized`` as a list of
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
            self.config = ProtectConfig.from_dict(params)
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
        return [k for k in FLAT_KEYS if k not in cls.fixed and k != "seed"]

    @classmethod
    def specs(cls) -> dict[str, Param]:
        """ProtectConfig's specs of the parameters (what :func:`uge.params.validate` checks on construction)."""
        names = cls.parameter_names()
        return {k: v for k, v in ProtectConfig.flat_specs().items() if k in names}

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
