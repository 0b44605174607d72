"""Parameter specs: one way to say what values a parameter takes, and one way to check them (issue 19).

A :class:`Param` is a declarative spec — a type, a numeric range, a set of choices, or (rarely) a named rule —
that knows how to say its allowed values in words (:meth:`Param.allowed`). The same spec serves

- the countermeasures' parameters (``params = {"quality": Param(int, 10, 10, 95)}``, parsed from text by
  :meth:`Param.convert`), and
- dataclass fields (the protectors, :class:`~uge.config.Recipe`, :class:`~uge.config.ProtectConfig`), through
  :func:`param`: ``pgd_steps: int = param(20, low=1)``. The field's annotation gives the type (``float | None``
  also allows None); a subclass that only changes a default inherits the base class's spec.

:func:`validate` checks every field of such a dataclass against its spec and then, when they all pass, calls
the class's ``cross_checks()`` (rules that span fields, e.g. ``block`` divides ``size``), and raises one
:class:`~uge.errors.ConfigError` in one line: ``"<owner>: <field> must be <allowed>, got <value>; ..."``.
Plain Python, no torch: the command line's parser reads the specs without the numerical stack.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _type_ok(value, annotation) -> bool:
    """Whether ``value`` fits a simple annotation ("int", "float | None", ...); other annotations pass."""
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", str(annotation))
    options = [a.strip() for a in annotation.split("|")]
    if value is None:
        return "None" in options or not set(options) <= set(_SCALARS) | {"None"}
    allowed = [t for a in options for t in _SCALARS.get(a, ())]
    if not allowed or not set(options) <= set(_SCALARS) | {"None"}:
        return True  # containers, dataclasses: their own validation applies
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, tuple(allowed))


def _annotation(annotation) -> tuple[type | None, bool, str]:
    """(the scalar type, whether None is allowed, the type in words) of a field's annotation."""
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", str(annotation))
    options = [a.strip() for a in annotation.split("|")]
    scalars = [a for a in options if a != "None"]
    typ = _TYPES.get(scalars[0]) if len(scalars) == 1 else None
    words = " or ".join(_article(a.split("[")[0]) for a in scalars)
    return typ, "None" in options, words


def _article(name: str) -> str:
    return f"a{'n' if name[:1] in 'aeiou' else ''} {name}"


def _number(x: float) -> str:
    """A bound in words: ``1/255`` for a whole number of 8-bit levels below 1 (budgets), else ``%g``."""
    levels = 255 * x
    if 0 < x < 1 and abs(levels - round(levels)) < 1e-9:
        return f"{round(levels)}/255"
    return f"{x:g}"


@dataclass(frozen=True)
class Param:
    """One parameter's spec: its type, default (countermeasures only) and allowed values.

    Numbers: ``low``/``high`` bounds (None: unbounded), inclusive unless ``low_open``/``high_open``; ``odd``
    requires an odd integer. ``choices``: the allowed values (a tuple, or a function that returns them when
    asked, e.g. the registered networks); with ``many`` the value is a non-empty list of them. ``test`` and
    ``words``: a rule the fields above cannot say, and the allowed values in words. ``optional``: None is
    allowed too (a field annotated ``X | None`` is). ``note`` follows the allowed values in words.

    Countermeasures only: ``default=None`` means the value is derived from the others (see the
    countermeasure's ``resolve``); ``levels`` marks a budget in 8-bit levels ("8" and "8/255" are the same).
    """

    type: type | None = None  # int, float, str, bool; None: the dataclass field's annotation
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    odd: bool = False
    help: str = ""
    levels: bool = False
    high_open: bool = False
    choices: tuple | Callable[[], Iterable] | None = None
    many: bool = False
    optional: bool = False
    test: Callable[[Any], bool] | None = None
    words: str = ""
    note: str = ""

    def options(self) -> tuple:
        """The allowed choices (asked now when ``choices`` is a function)."""
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def _range(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if not self.low_open and not self.high_open:
                return f"in {_number(lo)}..{_number(hi)}"
            return f"{'>' if self.low_open else '>='} {_number(lo)} and {'<' if self.high_open else '<='} {_number(hi)}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {_number(lo)}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {_number(hi)}"
        return ""

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``an int in 10..95`` or ``one of batch, class, sample``."""
        if self.words:
            text = self.words
        elif self.choices is not None:
            names = ", ".join(map(str, self.options()))
            text = f"a non-empty list from {names}" if self.many else f"one of {names}"
        else:
            what = "an odd int" if self.odd else _article(self.type.__name__) if self.type else "a value"
            text = f"{what} {self._range()}".rstrip()
        return text + (" or None" if self.optional else "") + (f" {self.note}" if self.note else "")

    def describe(self, key: str) -> str:
        default = "auto" if self.default is None else repr(self.default)
        return f"{key} ({self.allowed()}, default {default}{'; ' + self.help if self.help else ''})"

    def _in_range(self, v) -> bool:
        try:  # a value that does not compare with numbers (a string, None) is outside every range
            return ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                    and (self.high is None or (v < self.high if self.high_open else v <= self.high))
                    and not (isinstance(v, float) and math.isnan(v))  # NaN is in no range
                    and (not self.odd or v % 2 == 1))
        except TypeError:
            return False

    @property
    def constrains(self) -> bool:
        """Whether the spec says more than a type (a range, choices or a rule)."""
        return self.low is not None or self.high is not None or self.odd or self.choices is not None \
            or self.test is not None

    def accepts(self, value) -> bool:
        """Whether ``value`` is allowed (its type aside: :func:`validate` checks a field's annotation)."""
        if not self.constrains:
            return True
        if value is None:
            return self.optional
        if self.test is not None:
            try:
                return bool(self.test(value))
            except (TypeError, ValueError):
                return False
        if self.choices is not None:
            options = self.options()
            if self.many:
                return isinstance(value, (list, tuple)) and len(value) > 0 and all(v in options for v in value)
            return value in options
        return self._in_range(value)

    def convert(self, owner: str, key: str, value) -> int | float:
        """Check ``value`` (a string from the command line, or a number) and return it as ``type``
        (countermeasures' numeric parameters: finite, both bounds given)."""
        try:
            if isinstance(value, str) and self.levels and "/" in value:  # "8/255" -> 8 levels
                num, _, den = value.partition("/")
                if den.strip() != "255":
                    raise ValueError
                v = self.type(num.strip())
            elif isinstance(value, str):
                v = self.type(value.strip())
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    self.type is int and value != int(value)):
                raise ValueError  # reported below as a ConfigError, like an unparsable string
            else:
                v = self.type(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"countermeasure {owner!r}: {key}={value!r} is not {self.allowed()}") from None
        if not (self._in_range(v) and math.isfinite(v)):
            raise ConfigError(f"countermeasure {owner!r}: {key}={value} is out of range; allowed: {self.allowed()}")
        return v


def param(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **spec) -> Any:
    """A dataclass field with a :class:`Param` spec, e.g. ``size: int = param(8, low=1, high=64)``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"param": Param(**spec)})


def budget(default: float) -> Any:
    """The field of an L∞ budget ρ on the [0, 1] scale: at least one 8-bit level, below the whole pixel range."""
    return param(default, low=1 / 255, high=1, high_open=True, note="on the [0, 1] pixel scale")


def field_spec(cls, name: str) -> Param:
    """The spec of field ``name`` of dataclass ``cls``, bound to its annotation (type, None allowed).

    A field without a spec of its own takes the first one up the class's bases (a subclass that changes a
    default keeps the range); a field without any gets a bare spec of its type.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    spec = next((c.__dataclass_fields__[name].metadata["param"] for c in cls.__mro__
                 if name in getattr(c, "__dataclass_fields__", {})
                 and "param" in c.__dataclass_fields__[name].metadata), Param())
    typ, optional, words = _annotation(fields[name].type)
    if spec.type is None and typ is not None:
        spec = dataclasses.replace(spec, type=typ)
    if optional and not spec.optional:
        spec = dataclasses.replace(spec, optional=True)
    if spec.type is None and spec.choices is None and not spec.words:
        spec = dataclasses.replace(spec, words=words or "a value", optional=False)  # "a list", "a dict or None"
    return spec


def specs(cls) -> dict[str, Param]:
    """Field name -> its spec (:func:`field_spec`), for every field of dataclass ``cls``."""
    return {f.name: field_spec(cls, f.name) for f in dataclasses.fields(cls)}


def problem(name: str, spec: Param, value, annotation=None) -> str | None:
    """The one-clause message of a value that ``spec`` (and, when given, the field's annotation) refuses:
    ``"<name> must be <allowed>, got <value>"``; None when it is allowed."""
    wrong_type = annotation is not None and not _type_ok(value, annotation)
    if not wrong_type and spec.accepts(value):
        return None
    return f"{name} must be {spec.allowed()}, got {value!r}" + (f" ({type(value).__name__})" if wrong_type else "")


def field_problems(obj, *, types: bool = True) -> list[str]:
    """The messages of the fields of dataclass instance ``obj`` that their specs refuse; ``types``: check each
    value's type against the annotation too (plain values; ``False`` leaves that to :func:`from_dict`)."""
    cls = type(obj)
    out = []
    for f in dataclasses.fields(cls):
        msg = problem(f.name, field_spec(cls, f.name), getattr(obj, f.name), f.type if types else None)
        if msg:
            out.append(msg)
    return out


def validate(obj, owner: str, *, types: bool = True, items=None) -> None:
    """Check every field of dataclass instance ``obj`` against its spec, then (when they all pass) its
    ``cross_checks()``; raise one ConfigError ``"<owner>: <problem>; <problem>"`` naming each refused field.

    ``items``: (name, spec, value) of each field to check instead of ``obj``'s own fields, for a class whose
    fields are spelled otherwise outside (ProtectConfig: nested parts, flat keys)."""
    if items is None:
        problems = field_problems(obj, types=types)
    else:
        problems = [m for m in (problem(name, spec, value) for name, spec, value in items) if m]
    if not problems and hasattr(obj, "cross_checks"):
        problems = list(obj.cross_checks())
    if problems:
        raise ConfigError(f"{owner}: " + "; ".join(problems))


def check_plain(d: dict, what: str, fields: dict[str, tuple[Param, Any]]) -> None:
    """Refuse plain values ``d`` with a key outside ``fields`` (name -> (spec, annotation)) or a value of the
    wrong type, in one ConfigError that names them (the values' ranges are checked on construction)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a table of keys and values, got {type(d).__name__}")
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {what} key(s): {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(fields))}")
    bad = [f"{k} must be {fields[k][0].allowed()}, got {v!r} ({type(v).__name__})"
           for k, v in d.items() if not _type_ok(v, fields[k][1])]
    if bad:
        raise ConfigError(f"{what}: " + "; ".join(bad))


def from_dict(cls, d: dict, what: str):
    """Build dataclass ``cls`` from plain values ``d``, rejecting unknown keys and values of the wrong type
    with a ConfigError that names them (the values' ranges are the class's own ``__post_init__``)."""
    check_plain(d, what, {f.name: (field_spec(cls, f.name), f.type) for f in dataclasses.fields(cls)})
    return cls(**d)
