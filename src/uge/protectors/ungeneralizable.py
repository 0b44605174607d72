"""UGE itself (``uge``) and its L_fd-only variant (``fd``, the paper's "Ours (L_fd)" row of Table 3)."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ..config import AuthorizedSpec, ProtectConfig
from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..protect import TITLE, protect
from ..result import Protection
from ..utils import from_dict
from .base import Protector, register_protector


@register_protector
class UGEProtector(Protector):
    """Ungeneralizable Examples (Ye & Wang, CVPR 2024): :func:`uge.protect.protect` behind the protector API.

    Parameters are the fields of :class:`~uge.config.ProtectConfig` as plain values (``authorized`` as a
    list of {"arch", "seed", "theta0"} tables or "ARCH:SEED" strings, recipes as tables). The ``seed``
    argument of :meth:`protect` is added to the configured ``seed`` (default 0), so a run's seed can be
    varied without editing the config.
    """

    name = "uge"
    title = TITLE
    fixed: ClassVar[dict] = {}  # ProtectConfig fields this variant pins

    def __init__(self, **params):
        pinned = sorted(set(params) & set(self.fixed))
        if pinned:
            raise ConfigError(f"protector {self.name!r}: parameter(s) {', '.join(pinned)} are fixed "
                              f"({', '.join(f'{k}={v!r}' for k, v in self.fixed.items())}); "
                              f"allowed: {', '.join(self.parameter_names())}")
        params = {**self.defaults(), **params, **self.fixed}
        if isinstance(params.get("authorized"), list):
            params["authorized"] = [AuthorizedSpec.parse(a) if isinstance(a, str) else a
                                    for a in params["authorized"]]
        try:
            self.config = from_dict(ProtectConfig, params, "protect config")
        except ConfigError as e:
            raise ConfigError(f"protector {self.name!r}: {e}") from None
        except TypeError as e:  # a value of the wrong shape inside a nested table
            raise ConfigError(f"protector {self.name!r}: {e}") from None

    @classmethod
    def defaults(cls) -> dict:
        return {}

    @classmethod
    def parameter_names(cls) -> list[str]:
        import dataclasses

        return [f.name for f in dataclasses.fields(ProtectConfig) if f.name not in cls.fixed]

    @property
    def rho(self) -> float:
        return self.config.rho

    def params(self) -> dict:
        return self.config.to_dict()

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        cfg = ProtectConfig.from_dict({**self.config.to_dict(), "seed": self.config.seed + seed})
        result = protect(data, cfg, device=device, work_dir=work_dir, progress=progress)
        result.method, result.params, result.title = self.name, cfg.to_dict(), self.title
        return result


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
        return {"rho": 8 / 255}
