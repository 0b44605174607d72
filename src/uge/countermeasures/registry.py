"""The countermeasure registry and the spec syntax ``NAME[:key=value[,key=value]]`` joined by ``+``.

A countermeasure is a trick a hacker applies when training on protected data. Each one has a *kind* that
says where it acts:

- ``input``: an :class:`InputTransform`, applied once to the training set (uint8 images in and out, labels
  untouched) before training; e.g. JPEG compression.
- ``batch``: a :class:`BatchAugment`, applied to every training batch inside :func:`uge.training.train`
  after its crop and flip; may turn labels into soft targets (mixup, cutmix).
- ``task``: a :class:`TaskWrapper` that wraps the training task (supervised or distillation); e.g. PGD
  adversarial training.
- ``model``: a :class:`ModelAdapter` that changes the hacker's network before training, knowing the
  authorized networks; e.g. copying the authorized network's input stage.

Parameters are declared with :class:`~uge.params.Param` (the one parameter spec of the package, which the
protectors' fields use too); parsing checks names, keys, types and ranges and raises
:class:`~uge.errors.ConfigError` with a one-line message that names what is wrong and what is allowed.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import torch

from ..config import COUNTERMEASURE_SYNTAX
from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..params import Param

KINDS = ("input", "batch", "task", "model")
SYNTAX = COUNTERMEASURE_SYNTAX

_REGISTRY: dict[str, type[Countermeasure]] = {}


class Countermeasure:
    """Base class: a named, parameterized trick of the hacker. Subclass one of the three kinds below.

    Instances are immutable value objects: ``Countermeasure(**params)`` validates and fills defaults;
    :attr:`spec` is the canonical text (every parameter spelled out), and ``parse(c.spec)`` gives back an
    equal object.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    summary: ClassVar[str] = ""

    def __init__(self, **values):
        unknown = set(values) - set(self.params)
        if unknown:
            raise ConfigError(f"countermeasure {self.name!r} has no parameter {', '.join(map(repr, sorted(unknown)))}; "
                              f"parameters: {self._param_list()}")
        v = {k: (p.convert(self.name, k, values[k]) if values.get(k) is not None else p.default)
             for k, p in self.params.items()}
        self.values = self.resolve(v)
        for k, x in self.values.items():
            setattr(self, k, x)

    def resolve(self, values: dict) -> dict:
        """Fill derived (``default=None``) parameters; override where a countermeasure has them."""
        return values

    @classmethod
    def _param_list(cls) -> str:
        return "; ".join(p.describe(k) for k, p in cls.params.items()) or "none"

    @property
    def spec(self) -> str:
        """Canonical text, e.g. ``jpeg:quality=10``."""
        args = ",".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{self.name}:{args}" if args else self.name

    def __repr__(self) -> str:
        return f"<countermeasure {self.spec}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Countermeasure) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class InputTransform(Countermeasure):
    """Applied once to the training images: uint8 (N, H, W, C) in, the same shape and dtype out.

    ``at_test``: the hacker's network also sees transformed test images (e.g. a network trained on
    grayscale images is tested on grayscale images); transforms that only clean the training data leave
    the test set alone.
    """

    kind = "input"
    at_test: ClassVar[bool] = False

    def transform(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, data: ImageDataset, reference: ImageDataset | None = None, test: bool = False) -> ImageDataset:
        """The transformed set. ``reference``: clean images from elsewhere (an adaptive transform compares the
        published set's statistics with theirs); ``test``: ``data`` is the test set (an ``at_test`` transform)."""
        out = self.apply(data, reference, test)
        assert out.shape == data.images.shape and out.dtype == np.uint8, self.name
        return ImageDataset(out, data.labels.copy(), list(data.classes))

    def apply(self, data: ImageDataset, reference: ImageDataset | None, test: bool) -> np.ndarray:
        """The transformed images; a transform that needs the labels or a reference overrides this."""
        return self.transform(data.images)


class BatchAugment(Countermeasure):
    """Applied to every training batch: ``augment(x, y, num_classes) -> (x, y)``.

    ``x``: float (B, C, H, W) in [0, 1] on any device; ``y``: int64 labels (B,) or soft targets (B, K) that
    sum to 1. Randomness comes from torch's global RNG, which :func:`uge.training.train` seeds.
    """

    kind = "batch"

    def augment(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TaskWrapper(Countermeasure):
    """Wraps the training task (``loss(model, x, y)``) into another one, e.g. adversarial training."""

    kind = "task"

    def wrap(self, task):
        raise NotImplementedError


class ModelAdapter(Countermeasure):
    """Changes the hacker's network before training: ``adapt(model, authorized) -> model``, where
    ``authorized`` are the authorized networks at θ0 (what the published set gives a hacker)."""

    kind = "model"

    def adapt(self, model, authorized: list):
        raise NotImplementedError


def register_countermeasure(cls: type[Countermeasure]) -> type[Countermeasure]:
    """Class decorator: register a countermeasure under ``cls.name``."""
    if not getattr(cls, "name", None) or getattr(cls, "kind", None) not in KINDS:
        raise TypeError(f"{cls.__name__} needs a name and a kind in {KINDS}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"countermeasure {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_countermeasures() -> list[str]:
    """Names of all registered countermeasures, sorted."""
    return sorted(_REGISTRY)


def get_countermeasure(name: str) -> type[Countermeasure]:
    """The class registered under ``name``; ConfigError naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown countermeasure {name!r}; known: {', '.join(list_countermeasures())}")
    return _REGISTRY[name]


def describe_countermeasures() -> str:
    """One line per countermeasure: name, kind, summary and parameters with ranges and defaults."""
    return "\n".join(f"{n} ({c.kind}): {c.summary} Parameters: {c._param_list()}."
                     for n, c in sorted(_REGISTRY.items()))


def parse_countermeasures(text: str | list | None) -> list[Countermeasure]:
    """Parse ``NAME[:key=value[,key=value]]`` specs joined by ``+`` into countermeasure objects.

    ``None``, ``""`` and ``"none"`` give ``[]``; a list of countermeasures is returned as a list. The order
    is kept (input transforms run in their order, then batch augmentations in theirs); at most one
    ``task`` countermeasure is allowed. Example: ``parse_countermeasures("grayscale+cutout:size=8")``.
    """
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        if not all(isinstance(c, Countermeasure) for c in text):
            raise ConfigError("a countermeasure list must hold Countermeasure objects (or pass the text)")
        out = list(text)
    else:
        text = str(text).strip()
        if text in ("", "none"):
            return []
        out = [_parse_one(part, text) for part in text.split("+")]
    tasks = [c.name for c in out if c.kind == "task"]
    if len(tasks) > 1:
        raise ConfigError(f"at most one training-task countermeasure may be used, got {' and '.join(tasks)}")
    return out


def _parse_one(part: str, whole: str) -> Countermeasure:
    part = part.strip()
    name, _, args = part.partition(":")
    name = name.strip()
    if not name or (":" in part and not args.strip()):
        raise ConfigError(f"bad countermeasure {part!r} in {whole!r}; expected {SYNTAX}")
    cls = get_countermeasure(name)
    values: dict[str, str] = {}
    for item in filter(None, (a.strip() for a in args.split(","))) if args else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise ConfigError(f"bad parameter {item!r} of countermeasure {name!r}; expected key=value "
                              f"({SYNTAX}); parameters: {cls._param_list()}")
        if key in values:
            raise ConfigError(f"parameter {key!r} given twice for countermeasure {name!r}")
        values[key] = value
    return cls(**values)


def format_countermeasures(cms: list[Countermeasure]) -> str:
    """Canonical text of a list (every parameter spelled out); ``""`` for no countermeasure."""
    return "+".join(c.spec for c in cms)


def canonical_countermeasures(text: str | None) -> str:
    """The canonical text of a countermeasure list given as text (``"knownbasis"`` ->
    ``"knownbasis:bases=10,dct=0"``), as records and run configs hold it; ``""`` for none."""
    return format_countermeasures(parse_countermeasures(text))


def countermeasure_slug(cms: list[Countermeasure]) -> str:
    """A file-name form of :func:`format_countermeasures`: ``jpeg:quality=10`` -> ``jpeg-quality10``."""
    return format_countermeasures(cms).replace(":", "-").replace("=", "").replace(",", "-")


# ------------------------------------------------------------------ applying a list


def transform_data(cms: list[Countermeasure], data: ImageDataset, *, test: bool = False,
                   reference: ImageDataset | None = None) -> ImageDataset:
    """Apply the input transforms of ``cms`` in order (for a test set: only those with ``at_test``).

    ``reference``: clean images the hacker has from elsewhere, for the adaptive transforms (only their pixel
    statistics are used); the training set must be transformed before the test set (a fitted transform, such
    as a projection estimated on the training set, is applied to the test set as fitted).
    """
    for c in cms:
        if isinstance(c, InputTransform) and (c.at_test or not test):
            data = c(data, reference, test)
    return data


def make_batch_augment(cms: list[Countermeasure], num_classes: int) \
        -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """The batch augmentations of ``cms`` chained into one ``(x, y) -> (x, y)`` callable, or None."""
    augs = [c for c in cms if isinstance(c, BatchAugment)]
    if not augs:
        return None

    def batch_augment(x: torch.Tensor, y: torch.Tensor):
        for a in augs:
            x, y = a.augment(x, y, num_classes)
        return x, y

    return batch_augment


def wrap_task(cms: list[Countermeasure], task):
    """``task`` wrapped by the task countermeasure of ``cms`` (if there is one)."""
    for c in cms:
        if isinstance(c, TaskWrapper):
            task = c.wrap(task)
    return task


def adapt_model(cms: list[Countermeasure], model, authorized: list):
    """``model`` changed by the model countermeasures of ``cms`` in order (``authorized``: θ0 networks)."""
    for c in cms:
        if isinstance(c, ModelAdapter):
            model = c.adapt(model, authorized)
    return model


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-probability targets (B, K) float: one-hot for int labels, unchanged for soft targets."""
    if y.ndim == 2:
        return y
    return torch.nn.functional.one_hot(y, num_classes).float()
