"""Experiment grids as small TOML files: data, recipes, protection variants, hackers, the paper's numbers.

A config is validated completely when it is read (unknown keys, wrong types, bad values, unknown
architectures), so a typo fails in a second instead of after an hour of training.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AuthorizedSpec
from ..countermeasures import canonical_countermeasures
from ..errors import ConfigError
from ..evaluate import HACKER_SYNTAX, HackerSpec
from ..models.registry import known_model, list_models
from ..params import from_dict
from ..protectors import build_protector, list_protectors, protector_class
from ..training import Recipe
from ..utils import slug

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass
class DataSpec:
    """Where the training and test images come from, and which class-balanced subsets to use."""

    source: str = "digits"
    split: str = "train"
    test_source: str | None = None  # default: ``source``'s test split
    test_split: str = "test"
    per_class: int | None = None  # None: every training image
    test_per_class: int | None = None
    subset_seed: int = 0

    def __post_init__(self):
        for name in ("per_class", "test_per_class"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be positive (or left out for every image)")


@dataclass
class Variant:
    """One way of producing the training set: the clean originals, or a protector with its parameters.

    ``overrides`` are the protector's own fields (:mod:`uge.protectors`; ``build_protector`` checks them) on top
    of the config's ``[protect]`` table, whose keys apply to every protector that has them; ``authorized``
    names the networks the variant is evaluated with (and, for UGE, protected for). ``federated`` splits the
    classes between servers that each protect their own part with the same protector (Table 9); the union is
    evaluated.
    """

    name: str
    protector: str = "uge"
    federated: list[list[int]] | None = None
    overrides: dict = field(default_factory=dict)
    repeats: int = 1  # evaluate the grid this many times with other training seeds and hacker inits (the noise)
    hackers: list[HackerSpec] | None = None  # None: the config's hackers; [] trains the authorized networks only
    # None: every countermeasure of [evaluate]; else the ones of those this variant is screened with
    countermeasures: list[str] | None = None

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass
class BenchmarkConfig:
    """A whole experiment: every variant is evaluated with the same authorized networks and hackers."""

    name: str
    description: str = ""
    device: str = "auto"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    recipe: Recipe = field(default_factory=Recipe)  # the authorized (published) recipe; hackers' default
    recipes: dict[str, Recipe] = field(default_factory=dict)  # per-architecture hacker recipes
    protect: dict = field(default_factory=dict)  # fields of the variants' protectors (each takes those it has)
    hackers: list[HackerSpec] = field(default_factory=list)
    countermeasures: list[str] = field(default_factory=lambda: [""])  # canonical texts; "" is none
    countermeasures_authorized: bool = True  # the authorized networks train with the same countermeasure
    variants: list[Variant] = field(default_factory=list)
    # issue 4's recipe sweep: label -> Recipe overrides; the authorized networks of every variant are trained
    # again with each (the published recipe stays the one the generator matched), hackers are not
    authorized_recipes: dict[str, dict] = field(default_factory=dict)
    # fresh training seeds of the authorized networks beside ``seed`` (which replays the trajectory's own run)
    authorized_seeds: list[int] = field(default_factory=list)
    paper: dict = field(default_factory=dict)  # the paper's numbers, shown beside ours by the report

    def authorized(self, variant: Variant) -> list[AuthorizedSpec]:
        """The authorized networks a variant is evaluated with (and UGE protects for): the variant's
        ``authorized``, else the ``[protect]`` table's, else ResNet-18 from seed 0."""
        specs = variant.overrides.get("authorized", self.protect.get("authorized", ["resnet18:0"]))
        return [AuthorizedSpec.parse(a) if isinstance(a, str) else AuthorizedSpec(**a) for a in specs]

    def params(self, variant: Variant) -> dict:
        """A variant's protector parameters: the ``[protect]`` table's keys that the protector has, the
        bench's ``authorized`` networks and published ``recipe`` where it has those fields, then the variant's
        own keys (``encoder_epochs`` is shorthand for ``encoder_recipe.epochs``)."""
        names = set(protector_class(variant.protector).parameter_names())
        d = {k: copy.deepcopy(v) for k, v in self.protect.items() if k in names}
        d.update(copy.deepcopy({k: v for k, v in variant.overrides.items() if k != "authorized"}))
        if "authorized" in names:
            d["authorized"] = [vars(a) for a in self.authorized(variant)]
        if "recipe" in names:
            d["recipe"] = self.recipe.to_dict()
        epochs = variant.overrides.get("encoder_epochs", self.protect.get("encoder_epochs"))
        d.pop("encoder_epochs", None)
        if epochs is not None and "encoder_recipe" in names:
            d["encoder_recipe"] = {**d.get("encoder_recipe", {}), "epochs": epochs}
        return d

    def recipe_sweep(self) -> list[tuple[str, Recipe]]:
        """The sweep's (label, full recipe) pairs: the published recipe with each label's overrides."""
        return [(label, Recipe.from_dict({**self.recipe.to_dict(), **ov})) for label, ov in self.authorized_recipes.items()]

    def _evaluate_dict(self) -> dict:
        d = {"hackers": [h.spec for h in self.hackers]}
        if self.countermeasures != [""]:  # only when used, so older run folders keep matching their config
            d["countermeasures"] = self.countermeasures
            d["countermeasures_authorized"] = self.countermeasures_authorized
        if self.authorized_recipes:
            d["authorized_recipes"] = self.authorized_recipes
        if self.authorized_seeds:
            d["authorized_seeds"] = self.authorized_seeds
        return d

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "device": self.device, "seed": self.seed,
                "data": vars(self.data), "recipe": self.recipe.to_dict(),
                "recipes": {k: r.to_dict() for k, r in self.recipes.items()}, "protect": self.protect,
                "evaluate": self._evaluate_dict(),
                "variant": [{"name": v.name, "protector": v.protector, "federated": v.federated, **v.overrides,
                             **({"repeats": v.repeats} if v.repeats != 1 else {}),
                             **({"hackers": [h.spec for h in v.hackers]} if v.hackers is not None else {}),
                             **({"countermeasures": v.countermeasures} if v.countermeasures is not None else {})}
                            for v in self.variants], "paper": self.paper}


_EVALUATE_KEYS = {"hackers", "countermeasures", "countermeasures_authorized", "authorized_recipes", "authorized_seeds"}
_TOP_KEYS = {"name", "description", "device", "seed", "data", "recipe", "recipes", "protect", "evaluate",
             "variant", "paper"}


def parse_config(d: dict, where: str = "config") -> BenchmarkConfig:
    """Build and validate a :class:`BenchmarkConfig` from a parsed TOML/JSON document."""
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TOP_KEYS))}")
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise ConfigError(f"{where}: 'name' (a non-empty string) is required")
    try:
        ev = d.get("evaluate", {})
        if set(ev) - _EVALUATE_KEYS:
            raise ConfigError(f"unknown evaluate key(s): {', '.join(sorted(set(ev) - _EVALUATE_KEYS))}; "
                              f"known: {', '.join(sorted(_EVALUATE_KEYS))}")
        cms = _settings(ev.get("countermeasures", ["none"]), "evaluate.countermeasures")
        if len(set(cms)) != len(cms):
            raise ConfigError(f"evaluate.countermeasures lists the same setting twice: {cms}")
        if not isinstance(ev.get("countermeasures_authorized", True), bool):
            raise ConfigError("evaluate.countermeasures_authorized must be true or false")
        sweep = ev.get("authorized_recipes", {})
        if not isinstance(sweep, dict) or not all(isinstance(o, dict) and o for o in sweep.values()):
            raise ConfigError("evaluate.authorized_recipes must be a table of label = {recipe overrides}, e.g. "
                              f"{{\"batch 32\" = {{batch_size = 32}}}}, got {sweep!r}")
        for label, ov in sweep.items():
            try:
                Recipe.from_dict({**d.get("recipe", {}), **ov})
            except ConfigError as e:
                raise ConfigError(f"evaluate.authorized_recipes.{label!r}: {e}") from None
        seeds = ev.get("authorized_seeds", [])
        if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) \
                or len(set(seeds)) != len(seeds) or d.get("seed", 0) in seeds:
            raise ConfigError(f"evaluate.authorized_seeds must be a list of distinct integer training seeds other than "
                              f"the config's seed {d.get('seed', 0)} (which replays the trajectory), got {seeds!r}")
        labels = {slug(k) for k in sweep}
        if len(labels) != len(sweep) or "" in labels:
            raise ConfigError(f"evaluate.authorized_recipes labels must be distinct as file names: {list(sweep)}")
        cfg = BenchmarkConfig(
            name=d["name"], description=d.get("description", ""), device=d.get("device", "auto"),
            seed=d.get("seed", 0), data=from_dict(DataSpec, d.get("data", {}), "data"),
            recipe=Recipe.from_dict(d.get("recipe", {})),
            recipes={k: Recipe.from_dict({**d.get("recipe", {}), **v}) for k, v in d.get("recipes", {}).items()},
            protect=dict(d.get("protect", {})), hackers=[HackerSpec.parse(h) for h in ev.get("hackers", [])],
            countermeasures=cms, countermeasures_authorized=ev.get("countermeasures_authorized", True),
            variants=[_variant(v) for v in d.get("variant", [])], authorized_recipes=dict(sweep),
            authorized_seeds=list(seeds), paper=dict(d.get("paper", {})))
        _check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _settings(cms, what: str) -> list[str]:
    """A list of countermeasure settings in their canonical texts ("" for none)."""
    if not isinstance(cms, list) or not cms or not all(isinstance(c, str) for c in cms):
        raise ConfigError(f"{what} must be a non-empty list of texts such as [\"none\", \"jpeg:quality=10\"], "
                          f"got {cms!r}")
    return [canonical_countermeasures(c) for c in cms]


def _variant(v: dict) -> Variant:
    if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"].strip():
        raise ConfigError(f"every [[variant]] needs a 'name', got {v!r}")
    rest = dict(v)
    repeats = rest.pop("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= 10:
        raise ConfigError(f"variant {v['name']!r}: repeats must be an integer in 1..10, got {repeats!r}")
    hackers = rest.pop("hackers", None)
    if hackers is not None and (not isinstance(hackers, list) or not all(isinstance(h, str) for h in hackers)):
        raise ConfigError(f"variant {v['name']!r}: hackers must be a list of hacker specs ({HACKER_SYNTAX}), "
                          f"got {hackers!r}")
    cms = rest.pop("countermeasures", None)
    if cms is not None:
        cms = _settings(cms, f"variant {v['name']!r}: countermeasures (a part of evaluate.countermeasures)")
    return Variant(name=rest.pop("name"), protector=rest.pop("protector", "uge"),
                   federated=rest.pop("federated", None), overrides=rest, repeats=repeats,
                   hackers=None if hackers is None else [HackerSpec.parse(h) for h in hackers], countermeasures=cms)


def _check(cfg: BenchmarkConfig) -> None:
    if not cfg.variants:
        raise ConfigError("at least one [[variant]] is needed")
    slugs = [v.slug for v in cfg.variants]
    if len(set(slugs)) != len(slugs) or "" in slugs:
        raise ConfigError(f"variant names must be distinct (as folder names): {[v.name for v in cfg.variants]}")
    archs = {h.arch for h in cfg.hackers} | set(cfg.recipes)
    protectors = ["clean", *list_protectors()]
    shared = {"authorized", "encoder_epochs"}  # the [protect] table's keys: some protector's fields, or these
    for name in list_protectors():
        shared |= set(protector_class(name).parameter_names())
    if set(cfg.protect) - shared:
        raise ConfigError(f"[protect]: unknown key(s) {', '.join(sorted(set(cfg.protect) - shared))}; the table "
                          "sets the fields of every variant's protector that has them, and the authorized networks")
    for v in cfg.variants:
        if v.countermeasures is not None and (set(v.countermeasures) - set(cfg.countermeasures)
                                              or len(set(v.countermeasures)) != len(v.countermeasures)):
            raise ConfigError(f"variant {v.name!r}: countermeasures must be distinct settings of "
                              f"evaluate.countermeasures {cfg.countermeasures}, got {v.countermeasures}")
        if v.protector not in protectors:
            raise ConfigError(f"variant {v.name!r}: unknown protector {v.protector!r}; available: "
                              f"{', '.join(protectors)}")
        archs |= {h.arch for h in v.hackers or []} | {a.arch for a in cfg.authorized(v)}
        if v.protector == "clean":
            if v.overrides.keys() - {"authorized"} or v.federated:
                raise ConfigError(f"variant {v.name!r}: the clean variant takes no protect options "
                                  f"(got {sorted(v.overrides.keys() - {'authorized'}) or 'federated'})")
            continue
        try:
            params = build_protector(v.protector, **cfg.params(v)).params()  # validates every parameter
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r}: {e}") from None
        archs |= {params[k] for k in ("arch", "encoder_arch", "hacker_arch") if params.get(k)}
        if v.federated is not None:
            _check_groups(v)
    missing = {a for a in archs if not known_model(a)}
    if missing:
        raise ConfigError(f"unknown architecture(s) {', '.join(sorted(missing))}; available: "
                          f"{', '.join(list_models())} (and blind-<model> for each)")


def _check_groups(v: Variant) -> None:
    groups = v.federated
    ok = isinstance(groups, list) and len(groups) >= 2 and all(
        isinstance(g, list) and len(g) >= 2 and all(isinstance(c, int) and not isinstance(c, bool) for c in g)
        for g in groups)
    flat = [c for g in groups for c in g] if ok else []
    if not ok or len(set(flat)) != len(flat) or min(flat) < 0:
        raise ConfigError(f"variant {v.name!r}: federated must list two or more disjoint groups of at least two "
                          f"class indices, e.g. [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]; got {groups!r}")


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: tables merge key by key, everything else (lists included) is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_toml(path: Path, seen: tuple = ()) -> dict:
    """A TOML document; ``base = "other.toml"`` (relative to this file) inherits everything it does not set."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    base = doc.pop("base", None)
    if base is None:
        return doc
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    return _merge(_read_toml(path.parent / base, (*seen, path.resolve())), doc)


def load_config(path: str | Path) -> BenchmarkConfig:
    """Read and validate a benchmark config file (TOML, optionally built on a ``base`` config)."""
    return parse_config(_read_toml(Path(path)), str(path))
