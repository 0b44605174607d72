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
from .params import Param, budget, check_plain, field_spec, from_dict, param, validate
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


# ---- UGE's settings: a ProtectConfig of nested parts, one per piece of the method (issue 19)

@dataclass
class GradientMatching:
    """L_gm (Eq. 6): how the protected batch's gradients are matched to the clean batch's at the authorized
    networks' checkpoints. The readings beyond the paper (issue 10) are measured on the selectivity bench."""

    # the gradients of the batch's mean loss, of each class's, or of every sample (Eq. 6 as written)
    granularity: str = param("batch", choices=CHOICES["gm_granularity"])
    # checkpoints in train mode (batch statistics) or frozen at the clean batch's
    batchnorm: str = param("train", choices=CHOICES["gm_batchnorm"])
    augment: bool = False  # match gradients under the recipe's crop + flip (the same draw for x and x_u)
    # trajectories from θ0 with different data orders (an expectation over the recipe)
    trajectories: int = param(1, low=1)
    # memory for reusing the clean gradients across epochs; 0: recompute
    cache_mb: int = param(1024, low=0)


@dataclass
class FeatureDistance:
    """L_fd (Eqs. 7–9): the triplet loss in a feature space that pulls x_u to another class's feature."""

    weight: float = param(1.0, low=0)  # λ_fd of Eq. 4
    alpha: float = param(0.1, low=0)  # triplet margin of ℓ_tri
    # the target class: least similar to the image (Eq. 9), or y + 1
    target: str = param("least_similar", choices=CHOICES["fd_target"])
    space: str = param("encoder", choices=FEATURE_SPACES)  # "clip" (the paper) or "encoder" (offline)
    clip_model: str = "ViT-B-32"
    clip_checkpoint: str | None = None
    encoder_arch: str = "resnetc20"
    encoder_recipe: Recipe = param(  # noqa: RUF009 (param() is a dataclasses.field with a spec)
        default_factory=lambda: Recipe(epochs=10), words="a table of Recipe fields")

    def __post_init__(self):
        if isinstance(self.encoder_recipe, dict):
            self.encoder_recipe = Recipe.from_dict(self.encoder_recipe)


@dataclass
class Undistillation:
    """L_ud (Eq. 11): the authorized network's outputs kept apart from a random hacker network's."""

    weight: float = param(0.1, low=0)  # λ_ud of Eq. 4
    omega: float = param(0.1, low=0)  # weight of the KL term
    temperature: float = param(4.0, low=0, low_open=True)  # softmax temperature of the KL term
    # the authorized network: θT, or θ0 trained with the whole recipe
    teacher: str = param("checkpoint", choices=CHOICES["ud_teacher"])
    hacker_arch: str | None = None  # f'_θA; default: the first authorized architecture, another seed


@dataclass
class GeneratorOpt:
    """Parametrization "generator": a generator G(x) trained on L_all (the paper)."""

    epochs: int = param(50, low=1)
    lr: float = param(1e-3, low=0, low_open=True)
    width: int = param(64, low=1)
    # the first epochs train on L_fd (+ L_ud) without L_gm
    gm_warmup_epochs: int = param(0, low=0, note="(below generator_epochs)")
    center: bool = False  # the generator's perturbation minus its batch mean (no universal pattern)


@dataclass
class DeltaOpt:
    """Parametrization "delta": a per-sample δ optimised directly on L_all (PGD)."""

    steps: int = param(10, low=1)  # signed-gradient steps per batch
    # passes over the set; before each pass after the first, the authorized network is trained from θ0 on the
    # current protected set and that run's checkpoints join L_gm's (on-trajectory matching)
    gm_rounds: int = param(1, low=1)


PARTS = {"gm": GradientMatching, "fd": FeatureDistance, "ud": Undistillation, "generator": GeneratorOpt,
         "delta": DeltaOpt}

# The one spelling rule. Outside Python (the command line's flags, a --config file, a benchmark's [protect] table
# and variants, a manifest's ``params``, a run's config.json) UGE's settings are flat keys, the names they always
# had; this table says where each lives in ProtectConfig: (part, field), part None for ProtectConfig's own field.
# Its order is the order of ProtectConfig.to_dict() (the manifests' and work folders' ``params``).
FLAT_KEYS: dict[str, tuple[str | None, str]] = {
    "authorized": (None, "authorized"), "recipe": (None, "recipe"), "rho": (None, "rho"),
    "trajectory_epochs": (None, "trajectory_epochs"), "losses": (None, "losses"),
    "lambda_fd": ("fd", "weight"), "lambda_ud": ("ud", "weight"), "alpha": ("fd", "alpha"),
    "omega": ("ud", "omega"), "temperature": ("ud", "temperature"), "hacker_arch": ("ud", "hacker_arch"),
    "generator_epochs": ("generator", "epochs"), "generator_lr": ("generator", "lr"),
    "generator_batch_size": (None, "batch_size"), "generator_width": ("generator", "width"),
    "feature_space": ("fd", "space"), "clip_model": ("fd", "clip_model"), "clip_checkpoint": ("fd", "clip_checkpoint"),
    "encoder_arch": ("fd", "encoder_arch"), "encoder_recipe": ("fd", "encoder_recipe"),
    "clean_grad_cache_mb": ("gm", "cache_mb"), "seed": (None, "seed"),
    "gm_granularity": ("gm", "granularity"), "gm_batchnorm": ("gm", "batchnorm"), "gm_augment": ("gm", "augment"),
    "gm_trajectories": ("gm", "trajectories"), "ud_teacher": ("ud", "teacher"), "fd_target": ("fd", "target"),
    "parametrization": (None, "parametrization"), "delta_steps": ("delta", "steps"),
    "gm_rounds": ("delta", "gm_rounds"), "gm_warmup_epochs": ("generator", "gm_warmup_epochs"),
    "generator_center": ("generator", "center"), "diagnostics": (None, "diagnostics"),
}
# Options of one parametrization's part that the other refuses when set (anything but the default). The
# generator's epochs, lr and width are left out: a benchmark's [protect] table sets them for every UGE variant,
# δ variants included, and committed runs carry them. gm_rounds has its own rule (it needs L_gm too).
EXCLUSIVE = {"generator": ("gm_warmup_epochs", "generator_center"), "delta": ("delta_steps",)}


def _plain(value):
    """A field's value as plain JSON values (dataclasses as tables, tuples as lists)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _part_field(cls, key: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == key)


@dataclass
class ProtectConfig:
    """Everything that determines a UGE protection run (hyperparameters: supplement Tables 5–6).

    The losses' settings are nested parts (``gm``, ``fd``, ``ud``) and so are those of each parametrization
    (``generator``, ``delta``); outside Python every setting is a flat key (:data:`FLAT_KEYS`): build from them
    with :meth:`from_dict`, write them with :meth:`to_dict`, and read their specs with :meth:`flat_specs`.
    """

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
    gm: GradientMatching = dataclasses.field(default_factory=GradientMatching)
    fd: FeatureDistance = dataclasses.field(default_factory=FeatureDistance)
    ud: Undistillation = dataclasses.field(default_factory=Undistillation)
    # a generator G(x) (the paper), or a per-sample δ optimised directly
    parametrization: str = param("generator", choices=CHOICES["parametrization"])
    generator: GeneratorOpt = dataclasses.field(default_factory=GeneratorOpt)
    delta: DeltaOpt = dataclasses.field(default_factory=DeltaOpt)
    batch_size: int = param(128, low=1)  # the optimisation's batch, in either parametrization
    diagnostics: bool = True  # per-epoch diagnostics in the history (a few batches' worth of extra work)
    seed: int = 0  # the run's seed (uge.seeds); the protector API takes it as protect(seed=...), not a parameter

    def __post_init__(self):
        self.authorized = [a if isinstance(a, AuthorizedSpec) else AuthorizedSpec(**a) for a in self.authorized]
        self.losses = tuple(self.losses)
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        wrong = [f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}" for name, cls in PARTS.items()
                 if not isinstance(getattr(self, name), cls)]
        if wrong:
            raise ConfigError("protect config: " + "; ".join(wrong))
        items = [(key, spec, self._get(key)) for key, spec in self.flat_specs().items()]
        validate(self, "protect config", items=items)  # types: from_dict checks plain values

    def _get(self, key: str):
        part, name = FLAT_KEYS[key]
        return getattr(self if part is None else getattr(self, part), name)

    @classmethod
    def _flat_fields(cls) -> dict[str, tuple[Param, object]]:
        """Flat key -> (its spec, its annotation), for every key of :data:`FLAT_KEYS`."""
        out = {}
        for key, (part, name) in FLAT_KEYS.items():
            owner = cls if part is None else PARTS[part]
            out[key] = (field_spec(owner, name), _part_field(owner, name).type)
        return out

    @classmethod
    def flat_specs(cls) -> dict[str, Param]:
        """Flat key -> the spec of the field it sets (what the command line's help and the checks say)."""
        return {key: spec for key, (spec, _) in cls._flat_fields().items()}

    def cross_checks(self) -> list[str]:
        """The rules that span fields, in :func:`uge.params.validate`'s words (each field's range holds)."""
        out = []
        if self.trajectory_epochs > self.recipe.epochs:
            out.append(f"trajectory_epochs must be <= recipe.epochs={self.recipe.epochs}, got {self.trajectory_epochs}")
        if self.generator.gm_warmup_epochs >= self.generator.epochs:
            out.append(f"gm_warmup_epochs must be < generator_epochs={self.generator.epochs}, "
                       f"got {self.generator.gm_warmup_epochs}")
        if self.gm.granularity == "sample" and self.gm.batchnorm != "frozen":
            out.append("gm_granularity 'sample' needs gm_batchnorm 'frozen' (one sample has no batch statistics)")
        if self.delta.gm_rounds > 1 and (self.parametrization != "delta" or "gm" not in self.losses):
            out.append("gm_rounds > 1 needs parametrization 'delta' and L_gm in losses")
        other = next(p for p in EXCLUSIVE if p != self.parametrization)
        given = [k for k in EXCLUSIVE[other] if self._get(k) != getattr(PARTS[other](), FLAT_KEYS[k][1])]
        if given:  # an option the chosen parametrization would silently ignore
            out.append(f"{', '.join(given)} is an option of the other parametrization than "
                       f"{self.parametrization!r}; leave it out")
        return out

    def to_dict(self) -> dict:
        """The settings as flat keys (:data:`FLAT_KEYS`) and plain values: what a manifest and a work folder hold."""
        return {key: _plain(self._get(key)) for key in FLAT_KEYS}

    @classmethod
    def from_dict(cls, d: dict) -> "ProtectConfig":
        """Build from flat keys (:data:`FLAT_KEYS`; any subset, the rest at their defaults) and plain values."""
        check_plain(d, "protect config", cls._flat_fields())
        own, parts = {}, {name: {} for name in PARTS}
        for key, value in d.items():
            part, name = FLAT_KEYS[key]
            (own if part is None else parts[part])[name] = value
        return cls(**own, **{name: PARTS[name](**values) for name, values in parts.items()})

    @classmethod
    def from_json(cls, path: str | Path) -> "ProtectConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
