"""Protector registry: ``register_protector``, ``build_protector``, ``list_protectors`` (like the model registry).

A *protector* turns a clean :class:`~uge.data.ImageDataset` into a :class:`~uge.result.Protection` that
:func:`uge.published.publish` writes and :func:`uge.published.verify` checks. Every method — UGE and the
unlearnable-example baselines of the paper's Table 3 — has the same call shape::

    p = build_protector("em", pgd_steps=10)          # parameters as plain values (config files, CLI)
    result = p.protect(train, device="auto", seed=0)  # -> Protection, 8-bit images in result.protected
    p.name, p.norm_bounded, p.rho                      # "em", True, 8/255 (rho None when not norm-bounded)

Every protector's parameters are named fields (:meth:`Protector.parameter_names`): a dataclass's fields, UGE's
those of its :class:`~uge.config.ProtectConfig`. The command line's flags and a benchmark's tables set them by
name, and a name the method does not have is an error. The type of every field and the ranges from
:meth:`Protector.limits` are checked on construction, so a bad value fails before any work. ``seed`` means one
thing for every method: the run's seed, from which every random draw derives (:mod:`uge.seeds`).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..data.dataset import ImageDataset
from ..data.store import StoreWriter, open_images
from ..errors import ConfigError
from ..params import Param, param, specs, validate
from ..pgd import cell_means, dct_band
from ..result import Protection, quantize
from ..utils import resolve_device
from ..weights import build_network

_REGISTRY: dict[str, type[Protector]] = {}


def band_cell():
    """The ``cell`` field of a :class:`NoiseBand` protector (declared last in each, after the paper's fields)."""
    return param(1, low=1, high=64)


class NoiseBand:
    """The subspace an optimized noise (EM, REM, TAP) is confined to; not in the papers. The protector declares
    ``cell: int = band_cell()``: constant over cells of that many pixels on the image's grid (8: JPEG's block
    means, which JPEG and the blanket removal of every AC coefficient keep); and ``luminance: bool = False``: one
    value for every channel (which grayscale keeps). 1 and False: every pixel and channel (the papers'). A protector
    may also declare ``band: int | None = None``: only the 8×8-block DCT coefficients (v, u) with v + u ≤ band
    (:func:`uge.pgd.dct_band`; with ``cell`` 1), the low frequencies natural images have most power in."""

    cell: int
    luminance: bool
    band: int | None = None

    def subspace(self):
        """The projection onto the noise's subspace (None: every pixel and channel)."""
        if self.band is not None:
            return lambda d: dct_band(cell_means(d, 1, self.luminance), self.band)
        if self.cell == 1 and not self.luminance:
            return None
        return lambda d: cell_means(d, self.cell, self.luminance)


class PretrainedSource:
    """A source network (EM, REM, TAP) that may start from a weights file (``init``, e.g. from
    ``scripts/pretrain.py``) and train only its linear head (``probe``): noise for fixed pretrained features, the
    linear probe a hacker with features of its own runs (ours; the papers' sources start at random). The protector
    declares ``arch``, ``init: str | None = None`` and ``probe: bool = False``."""

    arch: str
    init: str | None
    probe: bool

    def source_model(self, data: ImageDataset, seed: int, device, pretrained: bool = True) -> torch.nn.Module:
        """The untrained source network for ``data`` on ``device``; a probe's features stay fixed. ``pretrained``
        False: from random init, every layer trained, whatever ``init`` and ``probe`` say."""
        model = build_network(self.arch, data.num_classes, data.channels, seed=seed,
                              weights=self.init if pretrained else None)
        return (model.freeze_features() if self.probe and pretrained else model).to(resolve_device(device))


class Protector:
    """Base class: a named method with parameters and ``protect(data, ...) -> Protection``.

    Subclasses set ``name`` (the registry key), ``title`` (the paper), ``norm_bounded``, and give ``rho``
    (the L∞ budget on the [0, 1] scale, None when not norm-bounded) as a field or attribute.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    norm_bounded: ClassVar[bool] = True
    # per-sample methods protect a stored set (uge.data.store) chunk by chunk (chunked_result); the others read
    # the set whole, and the command line refuses a stored set larger than memory for them (in_memory_limit)
    streams: ClassVar[bool] = False
    sealed: ClassVar[bool] = False  # only key holders learn from it: `uge protect` always publishes it sealed
    rho: float | None

    def __post_init__(self):  # dataclass subclasses: every field's type and spec, then the cross-field rules
        validate(self, f"protector {self.name!r}")

    def cross_checks(self) -> list[str]:
        """Messages (``"<field> must be ..., got ..."``) for the rules that span fields; [] when they hold.
        Called once every field's own spec holds."""
        return []

    @classmethod
    def specs(cls) -> dict[str, Param]:
        """Parameter name -> its spec (type and allowed values), as :mod:`uge.params` checks them."""
        return specs(cls)

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The names of the parameters (what ``build_protector`` takes, and the command line's flags set)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def describe(cls) -> str:
        """The method's name and title, then one line per parameter: its default and allowed values."""
        defaults, spec = cls.defaults(), cls.specs()
        lines = [f"{k}={defaults[k]!r}" if k in defaults else k for k in cls.parameter_names()]
        return f"{cls.name}: {cls.title}" + "".join(
            f"\n    {line}: {spec[k].allowed()}" for line, k in zip(lines, cls.parameter_names()))

    @classmethod
    def defaults(cls) -> dict:
        """The parameters' default values, as plain values."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def params(self) -> dict:
        """The parameters as plain values (what the manifest records)."""
        return dataclasses.asdict(self)

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        """Protect ``data`` and return the 8-bit result; equal seeds give equal output on one device.

        Args:
            device: "auto", "cpu" or "cuda".
            work_dir: checkpoint folder for resuming (UGE); the baselines run in one go and ignore it.
            progress: show progress bars.
            seed: the run's seed; every random choice (source-network initialization, noise start, filters,
                trajectories) derives from it through :mod:`uge.seeds`, and the manifest records it.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


def register_protector(cls: type[Protector]) -> type[Protector]:
    """Register a :class:`Protector` subclass under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_protectors() -> list[str]:
    """Names of all registered protectors, sorted."""
    return sorted(_REGISTRY)


def protector_class(name: str) -> type[Protector]:
    """The registered class of protector ``name`` (its ``title``, ``norm_bounded``, parameter names)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown protector {name!r}; known protectors: {', '.join(list_protectors())}")
    return _REGISTRY[name]


def build_protector(name: str, **params) -> Protector:
    """The protector ``name`` with ``params`` (plain values); unknown names or parameters are ConfigErrors."""
    cls = protector_class(name)
    allowed = cls.parameter_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)} for protector {name!r}; "
                          f"allowed: {', '.join(allowed)}")
    return cls(**params)


# ------------------------------------------------------------------ helpers shared by the baselines

def add_noise(data: ImageDataset, delta: torch.Tensor, rho: float) -> ImageDataset:
    """``data`` + ``delta`` (float (N, C, H, W) on the [0, 1] scale), rounded to 8 bits within ±floor(255ρ)
    levels of each clean pixel (:func:`uge.result.quantize`), so the budget holds on the saved files."""
    images, _ = data.tensors("cpu")
    x_u = quantize(images.float() / 255 + delta.detach().cpu().float(), images, rho)
    return ImageDataset(x_u.permute(0, 2, 3, 1).numpy(), data.labels.copy(), list(data.classes))


def noise_result(protector: Protector, data: ImageDataset, delta: torch.Tensor, seed: int, **fields) -> Protection:
    """The :class:`Protection` of a norm-bounded protector: ``data`` + ``delta``, see :func:`add_noise`."""
    return image_result(protector, data, add_noise(data, delta, protector.rho).images, seed, **fields)


def image_result(protector: Protector, data: ImageDataset, images: np.ndarray, seed: int, **fields) -> Protection:
    """A :class:`Protection` holding ``images`` (uint8 (N, H, W, C)) with ``data``'s labels and classes."""
    return result_of(protector, ImageDataset(images, data.labels.copy(), list(data.classes)), seed, **fields)


def noise_chunk(rho: float, delta_of, content=None):
    """``protect_chunk`` for :func:`chunked_result` of a norm-bounded protector: images + ``delta_of(start, k)``
    (float (k, C, H, W) on the [0, 1] scale, called once per chunk, in order), rounded as :func:`add_noise`.
    ``content(start, x)``, if given, adds a change that depends on the images x themselves (same scale)."""
    def protect_chunk(start: int, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        delta = delta_of(start, len(images)).detach().cpu().float()
        if content is not None:
            delta = delta + content(start, x.float() / 255)
        x_u = quantize(x.float() / 255 + delta, x, rho)
        return x_u.permute(0, 2, 3, 1).numpy()
    return protect_chunk


def chunked_result(protector: Protector, data: ImageDataset, protect_chunk, seed: int,
                   work_dir: str | Path | None = None, **fields) -> Protection:
    """The :class:`Protection` of a per-sample protector: ``protect_chunk(start, images)`` maps uint8 (k, H, W, C)
    images ``start`` … ``start + k − 1`` to their protected images, called once per chunk, in order.

    An in-memory set is one chunk. A stored set (:mod:`uge.data.store`) is protected chunk by chunk into
    ``<work_dir>/protected.npy`` (a new temporary folder without ``work_dir``), and the result's images are a
    memmap of that file: nothing is held whole in memory."""
    if not data.stored:
        return image_result(protector, data, protect_chunk(0, data.images), seed, **fields)
    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="uge-protect-"))
    with StoreWriter(folder / "protected.npy", data.images.shape) as w:
        for start, chunk in data.chunks():
            w.write(start, protect_chunk(start, chunk))
    protected = ImageDataset(open_images(folder / "protected.npy"), data.labels.copy(), list(data.classes))
    return result_of(protector, protected, seed, **fields)


def in_memory_limit(protector: Protector, data: ImageDataset, limit_bytes: int | None = None) -> ImageDataset:
    """``data`` as ``protector`` takes it: a stored set stays stored for a protector that streams; for one that
    needs the whole set (EM, TAP, REM, NTGA, UGE) it is read into memory up to ``limit_bytes`` (default: half
    the machine's memory), and refused (one line) above."""
    if not data.stored or protector.streams:
        return data
    if limit_bytes is None:
        limit_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    if data.images.nbytes > limit_bytes:
        raise ConfigError(f"protector {protector.name!r} needs the whole set in memory "
                          f"({data.images.nbytes / 2**30:.1f} GiB of images, above the limit of "
                          f"{limit_bytes / 2**30:.1f} GiB); the methods that protect a set larger than memory chunk by "
                          "chunk are random, patch, jpeg-patch, cuda and keyed")
    return data.in_memory()


def result_of(protector: Protector, protected: ImageDataset, seed: int, **fields) -> Protection:
    """The one place a :class:`Protection` is built: what the protector is (name, title, parameters, budget),
    the run's seed, and ``fields`` (authorized networks, θ0, recipe, history, seconds, feature space)."""
    return Protection(protected, method=protector.name, params=protector.params(), rho=protector.rho, seed=seed,
                      title=protector.title, **fields)
