"""The record of one trained network: one type, one writer, one reader (evaluation, benchmark, report).

A record is a JSON file written as soon as its network finishes (numbers as numbers). :class:`Record` names
every field; :func:`write_record` and :func:`read_record` are the only ways in and out, so the evaluation,
the benchmark runner and the report agree on the fields by construction, not by convention. Records from
before the schema was written down (no ``schema_version``) read as version 1: their fields are the same.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .errors import DataError
from .utils import write_json

SCHEMA_VERSION = 1


class AuthorizedNet(NamedTuple):
    """An authorized network as the evaluation takes it: its architecture, the network at θ0 (left untouched:
    a copy is trained) and a label of where θ0 came from (recorded as the record's ``init``)."""

    arch: str
    net: Any  # a Classifier at θ0
    init: str = "theta0"


@dataclass
class Record:
    """One trained network's evaluation (clean test accuracy on the test set), and how it was obtained."""

    # what was trained, on what
    data: str  # the data label: "clean", "protected", or a benchmark variant's folder name
    role: str  # "authorized" or "hacker"
    arch: str
    mode: str  # "normal" or "distill"
    init: str  # "theta0", "seed:S", "theta0:..." labels, or θ0 plus noise
    n_train: int
    n_test: int
    recipe: dict
    # what came out
    test_acc: float
    train_acc: float
    seconds: float
    train_seed: int | None = None  # the training seed (batch order, augmentation); not recorded before stop 8
    countermeasures: str | None = None
    curve: list[float] | None = None  # test accuracy after every epoch (authorized networks)
    # where and with what
    device: str = ""
    versions: dict = field(default_factory=dict)
    index: int | None = None  # which authorized network
    fresh: bool = False  # an authorized network trained with a fresh seed (not the trajectory's replay)
    init_noise: float | None = None
    recipe_label: str | None = None
    repeat: int = 0
    # set by the benchmark runner
    variant: str | None = None
    protector: str | None = None
    rho: float | None = None
    losses: list[str] | None = None
    federated: list[list[int]] | None = None
    benchmark: str | None = None
    # set by ``uge evaluate``: the published set's folder and the SHA-256 of its checksums.sha256
    published: str | None = None
    checksums_sha256: str | None = None
    schema_version: int = SCHEMA_VERSION

    # fields left out of the file when they hold their default (the shape records always had)
    _OMIT_DEFAULT = ("curve", "index", "fresh", "init_noise", "recipe_label", "repeat", "train_seed", "published",
                     "checksums_sha256")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for k in self._OMIT_DEFAULT:
            if d[k] == defaults[k]:
                del d[k]
        if self.variant is None:  # not from a benchmark
            for k in ("variant", "protector", "rho", "losses", "federated", "benchmark"):
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "record") -> Record:
        version = d.get("schema_version", 1)
        if version > SCHEMA_VERSION:
            raise DataError(f"{where} has schema version {version}; this uge reads up to {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in d)
        if unknown or missing:
            raise DataError(f"{where} is not a uge record: " + "; ".join(
                p for p in (f"unknown field(s) {', '.join(unknown)}" if unknown else "",
                            f"missing field(s) {', '.join(missing)}" if missing else "") if p))
        return cls(**{**d, "schema_version": SCHEMA_VERSION})


def write_record(path: str | Path, record: Record) -> None:
    """Write ``record`` as JSON (atomically)."""
    write_json(path, record.to_dict())


def read_record(path: str | Path) -> Record:
    """Read and check one record file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    return Record.from_dict(d, str(path))
