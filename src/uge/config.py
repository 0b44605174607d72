"""Configuration dataclasses — the training recipe and the protector's settings — readable from and written to JSON.

Plain Python (no torch): the command line builds its parser from these without loading the numerical stack.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .params import budget, from_dict, param, validate
from .utils import slug

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class Recipe:
    """How a network is trained. Published with θ0 as the authorized recipe.

    ``schedule``: lr warms up linearly over the first ``warmup`` fraction of steps, then decays to 0
    ("linear", "cosine") or stays ("constant"). ``crop``: random-crop with zero padding of 1/8 of the
    image size; ``flip``: random horizontal flip.
    """

    epochs: int = param(30, low=1)
    batch_size: int = param(128, low=2)
    lr: float = param(0.1, low=0, low_open=True)
    momentum: float = param(0.9, low=0, high=1, high_open=True)
    nesterov: bool = True
    weight_decay: float = param(5e-4, low=0)
    warmup: float = param(0.1, low=0, high=1, high_open=True)
    schedule: str = param("linear", choices=SCHEDULES)
    crop: bool = True
    flip: bool = True
    temperature: float = param(4.0, low=0, low_open=True)  # distillation softmax temperature

    def __post_init__(self):
        validate(self, "recipe", types=False)  # types: from_dict checks plain values

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return from_dict(cls, d, "recipe")

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate at optimizer step ``step`` of ``total``."""
        warm = int(self.warmup * total)
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.schedule == "constant":
            return self.lr
        frac = (step - warm) / max(1, total - warm)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        return self.lr * (1 - frac)


HACKER_MODES = ("normal", "distill")  # trained on the labels, or distilled from the authorized network
HACKER_SYNTAX = ("ARCH[:MODE[:SEED]], ARCH:MODE:theta0+SIGMA[:SEED] or ARCH:MODE:@FILE.safetensors, e.g. cnn:distill, "
                 "resnet18:normal:theta0+0.1 or resnetc20:normal:@pretrained.safetensors")


@dataclass(frozen=True)
class HackerSpec:
    """A hacker network: an architecture, a training mode ("normal" or "distill") and its initialization.

    By default the init is random from ``seed``. With ``init_noise`` = σ (not None) the hacker knows the
    authorized architecture and θ0 approximately: it starts from the θ0 of the (first) authorized network
    of the same architecture plus relative Gaussian noise of size σ drawn with ``seed``
    (:func:`uge.countermeasures.perturb_init`), and trains with the authorized recipe, so σ = 0 repeats
    the authorized network exactly. Sweeping σ measures how close an init must be to count as authorized.
    With ``theta0`` (a safetensors file) the hacker starts from those weights instead: a hacker with its own
    pretrained network.
    """

    arch: str
    mode: str = "normal"
    seed: int = 1
    init_noise: float | None = None
    theta0: str | None = None

    def __post_init__(self):
        if self.mode not in HACKER_MODES:
            raise ConfigError(f"unknown hacker mode {self.mode!r} in {self}; modes: {', '.join(HACKER_MODES)}")
        if self.init_noise is not None and not self.init_noise >= 0:
            raise ConfigError(f"the θ0 noise of hacker {self.arch} must be >= 0, got {self.init_noise}")

    @classmethod
    def parse(cls, text: str) -> "HackerSpec":
        """Parse ``ARCH[:MODE[:SEED]]`` (e.g. ``resnet18:distill:3``) or ``ARCH:MODE:theta0+SIGMA[:SEED]``
        (e.g. ``cnn:normal:theta0+0.05``: θ0 plus noise σ = 0.05 drawn with seed SEED, default 1), or
        ``ARCH:MODE:@FILE`` (the init read from a safetensors file)."""
        parts = text.strip().split(":")
        if len(parts) == 3 and parts[2].startswith("@") and parts[0] and len(parts[2]) > 1:
            return cls(parts[0], parts[1], theta0=parts[2][1:])
        noisy = len(parts) > 2 and parts[2].startswith("theta0")
        if not parts[0] or len(parts) > (4 if noisy else 3):
            raise ConfigError(f"bad hacker spec {text!r}; expected {HACKER_SYNTAX}")
        mode = parts[1] if len(parts) > 1 else "normal"
        try:
            if noisy:
                sigma = parts[2][len("theta0"):]
                if sigma and not sigma.startswith("+"):
                    raise ValueError
                return cls(parts[0], mode, int(parts[3]) if len(parts) > 3 else 1, float(sigma[1:] or 0))
            return cls(parts[0], mode, int(parts[2]) if len(parts) > 2 else 1)
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"bad seed or θ0 noise in hacker spec {text!r}; expected {HACKER_SYNTAX}") from None

    @property
    def spec(self) -> str:
        """The text :meth:`parse` reads back into this spec."""
        if self.theta0 is not None:
            return f"{self.arch}:{self.mode}:@{self.theta0}"
        if self.init_noise is None:
            return f"{self.arch}:{self.mode}:{self.seed}"
        return f"{self.arch}:{self.mode}:theta0+{self.init_noise!r}:{self.seed}"

    @property
    def key(self) -> str:
        if self.theta0 is not None:
            return f"{self.arch}_{self.mode}_at-{slug(Path(self.theta0).name.removesuffix('.safetensors'))}"
        noise = "" if self.init_noise is None else f"_theta0+{self.init_noise!r}"
        return f"{self.arch}_{self.mode}{noise}_s{self.seed}"


def rho_levels(rho: float) -> int:
    """The budget ρ on the [0, 1] scale as whole 8-bit levels: floor(255ρ) (ρ = 0.04 → 10 levels).

    The small tolerance keeps a ρ typed as ``k / 255`` at k levels despite floating-point rounding.
    """
    return math.floor(255 * rho + 1e-9)


def parse_budget(text: str | float) -> float:
    """An L∞ budget as a user types it, on the [0, 1] pixel scale: ``0.04`` or ``10/255`` (8-bit levels)."""
    s = str(text).strip()
    num, slash, den = s.partition("/")
    try:
        if slash and den.strip() != "255":
            raise ValueError
        value = float(num) / 255 if slash else float(s)
    except ValueError:
        raise ConfigError(f"a budget is a number on the [0, 1] scale (0.04) or 8-bit levels (10/255), "
                          f"got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"a budget must be finite, got {text!r}")
    return value


COUNTERMEASURE_SYNTAX = "NAME[:key=value[,key=value]] joined by '+', e.g. jpeg:quality=10+cutout:size=8"
FORMATS = ("npz", "png")  # the file formats a published set can hold
LOSSES = ("gm", "fd", "ud")
FEATURE_SPACES = ("encoder", "clip")
CHOICES = {  # option -> its values; the first is the paper's reading (as this project implemented it first)
    "gm_granularity": ("batch", "class", "sample"),
    "gm_batchnorm": ("train", "frozen"),
    "ud_teacher": ("checkpoint", "trained"),
    "fd_target": ("least_similar", "next"),
    "parametrization": ("generator", "delta"),
}


@dataclass
class AuthorizedSpec:
    """One authorized network: an architecture and its initial weights θ0 (from ``seed``, or a file)."""

    arch: str = "resnet18"
    seed: int = 0
    theta0: str | None = None  # a safetensors file holding θ0; overrides ``seed``

    @classmethod
    def parse(cls, text: str) -> "AuthorizedSpec":
        """Parse ``ARCH``, ``ARCH:SEED`` or ``ARCH:PATH.safetensors``."""
        arch, _, rest = text.partition(":")
        if not rest:
            return cls(arch=arch)
        if rest.lstrip("-").isdigit():
            return cls(arch=arch, seed=int(rest))
        return cls(arch=arch, theta0=rest)


_DEFAULT_DELTA_STEPS = 10


@dataclass
class ProtectConfig:
    """Everything that determines a protection run (hyperparameters: supplement Tables 5–6)."""

    authorized: list[AuthorizedSpec] = param(  # noqa: RUF009 (param() is a dataclasses.field with a spec)
        default_factory=lambda: [AuthorizedSpec()], test=len,
        words="a non-empty list of networks (ARCH[:SEED] or {arch, seed, theta0} tables)")
    # the authorized training recipe, published with θ0
    recipe: Recipe = param(  # noqa: RUF009 (as above)
        default_factory=Recipe, test=lambda r: isinstance(r, Recipe), words="a table of Recipe fields")
    rho: float = budget(0.04)  # L∞ budget on the [0, 1] scale
    # T: checkpoints θ0..θT from the first T epochs of ``recipe``
    trajectory_epochs: int = param(4, low=1, note="(at most recipe.epochs)")
    losses: tuple[str, ...] = param(LOSSES, choices=LOSSES, many=True)  # which of L_gm, L_fd, L_ud are on (Table 1)
    lambda_fd: float = param(1.0, low=0)
    lambda_ud: float = param(0.1, low=0)
    alpha: float = param(0.1, low=0)  # triplet margin of ℓ_tri
    omega: float = param(0.1, low=0)  # weight of the KL term in L_ud
    temperature: float = param(4.0, low=0, low_open=True)  # softmax temperature of the KL term in L_ud
    hacker_arch: str | None = None  # f'_θA of L_ud; default: the first authorized architecture, another seed
    generator_epochs: int = param(50, low=1)
    generator_lr: float = param(1e-3, low=0, low_open=True)
    generator_batch_size: int = param(128, low=1)
    generator_width: int = param(64, low=1)
    feature_space: str = param("encoder", choices=FEATURE_SPACES)  # "clip" (the paper) or "encoder" (offline)
    clip_model: str = "ViT-B-32"
    clip_checkpoint: str | None = None
    encoder_arch: str = "resnetc20"
    encoder_recipe: Recipe = param(  # noqa: RUF009 (as above)
        default_factory=lambda: Recipe(epochs=10), words="a table of Recipe fields")
    # memory for reusing L_gm's clean gradients across epochs; 0: recompute
    clean_grad_cache_mb: int = param(1024, low=0)
    seed: int = 0  # the run's seed (uge.seeds); the protector API takes it as protect(seed=...), not a parameter
    # --- readings of the paper and variants beyond it (issue 10); each is measured on the selectivity bench
    # L_gm of the batch's mean loss, per class, or per sample (Eq. 6 as written)
    gm_granularity: str = param("batch", choices=CHOICES["gm_granularity"])
    # checkpoints in train mode (batch statistics) or frozen at the clean batch's
    gm_batchnorm: str = param("train", choices=CHOICES["gm_batchnorm"])
    gm_augment: bool = False  # match gradients under the recipe's crop + flip (the same draw for x and x_u)
    # trajectories from θ0 with different data orders (an expectation over the recipe)
    gm_trajectories: int = param(1, low=1)
    # L_ud's authorized network: θT, or θ0 trained with the whole recipe
    ud_teacher: str = param("checkpoint", choices=CHOICES["ud_teacher"])
    # L_fd's target class: least similar to the image (Eq. 9), or y + 1
    fd_target: str = param("least_similar", choices=CHOICES["fd_target"])
    # a generator G(x) (the paper), or a per-sample δ optimised directly
    parametrization: str = param("generator", choices=CHOICES["parametrization"])
    delta_steps: int = param(_DEFAULT_DELTA_STEPS, low=1)  # parametrization "delta": signed-gradient steps per batch
    # parametrization "delta": passes over the set; before each pass after the first, the authorized network is
    # trained from θ0 on the current protected set and that run's checkpoints join L_gm's (on-trajectory matching)
    gm_rounds: int = param(1, low=1)
    # parametrization "generator": the first epochs train on L_fd (+ L_ud) without L_gm
    gm_warmup_epochs: int = param(0, low=0, note="(below generator_epochs)")
    generator_center: bool = False  # the generator's perturbation minus its batch mean (no universal pattern)
    diagnostics: bool = True  # per-epoch diagnostics in the history (a few batches' worth of extra work)

    def __post_init__(self):
        self.authorized = [a if isinstance(a, AuthorizedSpec) else AuthorizedSpec(**a) for a in self.authorized]
        self.losses = tuple(self.losses)
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        if isinstance(self.encoder_recipe, dict):
            self.encoder_recipe = Recipe.from_dict(self.encoder_recipe)
        validate(self, "protect config", types=False)  # types: from_dict checks plain values

    def cross_checks(self) -> list[str]:
        """The rules that span fields, in :func:`uge.params.validate`'s words (each field's range holds)."""
        out = []
        if self.trajectory_epochs > self.recipe.epochs:
            out.append(f"trajectory_epochs must be <= recipe.epochs={self.recipe.epochs}, got {self.trajectory_epochs}")
        if self.gm_warmup_epochs >= self.generator_epochs:
            out.append(f"gm_warmup_epochs must be < generator_epochs={self.generator_epochs}, "
                       f"got {self.gm_warmup_epochs}")
        if self.gm_granularity == "sample" and self.gm_batchnorm != "frozen":
            out.append("gm_granularity 'sample' needs gm_batchnorm 'frozen' (one sample has no batch statistics)")
        if self.gm_rounds > 1 and (self.parametrization != "delta" or "gm" not in self.losses):
            out.append("gm_rounds > 1 needs parametrization 'delta' and L_gm in losses")
        others = {"generator": [k for k in ("delta_steps",) if getattr(self, k) != _DEFAULT_DELTA_STEPS],
                  "delta": [k for k in ("gm_warmup_epochs", "generator_center") if getattr(self, k)]}
        if others.get(self.parametrization):  # an option the chosen parametrization would silently ignore
            out.append(f"{', '.join(others[self.parametrization])} is an option of the other parametrization "
                       f"than {self.parametrization!r}; leave it out")
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["losses"] = list(self.losses)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ProtectConfig":
        return from_dict(cls, d, "protect config")

    @classmethod
    def from_json(cls, path: str | Path) -> "ProtectConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
