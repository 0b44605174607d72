"""One way to validate parameters (issue 19): every declared spec (:mod:`uge.params`) is enforced.

The walk below reads every field of every protector, of :class:`Recipe` and of :class:`ProtectConfig`, and
every countermeasure parameter, derives values just outside each declared range (below ``low``, above
``high``, an even number where an odd one is asked, a name outside the choices, a wrong type) and checks that
each is refused with a one-line ConfigError that names the field and says what is allowed; and that the
boundary values inside the range are accepted (or refused only by a rule that spans fields).
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from uge.cli import main
from uge.config import ProtectConfig, Recipe
from uge.countermeasures import get_countermeasure, list_countermeasures
from uge.errors import ConfigError
from uge.params import Param, field_spec, param, specs, validate
from uge.protectors import build_protector, list_protectors, protector_class

# Specs with a ``test`` (a rule the bounds cannot say) get their bad values here; a new one must add its own.
BY_HAND = {
    ("keyed", "direction"): [[0, 0, 0], [1, 2], [1.0, 2, 1], [True, 1, 1], "1,-2,1"],
    ("uge", "authorized"): [[]],
    ("fd", "authorized"): [[]],
    ("protect config", "authorized"): [[]],
    **{(owner, "recipe"): [None, 3, "fast"] for owner in ("uge", "fd", "protect config")},
}
# int and float fields without a range: seeds, which take any integer.
UNBOUNDED = {("keyed", "init_seed"), ("protect config", "seed")}
WRONG_TYPE = {int: "3", float: "0.5", bool: "yes", str: 3}


def _below(x, typ, is_open):
    return x if is_open else (x - 1 if typ is int else math.nextafter(x, -math.inf))


def _above(x, typ, is_open):
    return x if is_open else (x + 1 if typ is int else math.nextafter(x, math.inf))


def outside(owner: str, name: str, spec: Param) -> list:
    """Values the spec refuses (by its range, choices or rule; types: see :func:`wrong_types`)."""
    if spec.test is not None:
        return BY_HAND[owner, name]
    if spec.choices is not None:
        return [[], ["no-such-choice"], "no-such-choice"] if spec.many else ["no-such-choice", None]
    out = []
    if spec.low is not None:
        out.append(_below(spec.low, spec.type, spec.low_open))
    if spec.high is not None:
        out.append(_above(spec.high, spec.type, spec.high_open))
    if spec.odd:
        out.append(int(spec.low) + 1 if int(spec.low) % 2 else int(spec.low))
    if out and spec.type is float:
        out.append(math.nan)
    if out and not spec.optional:
        out.append(None)
    return out


def inside(spec: Param) -> list:
    """The boundary values the spec allows."""
    if spec.test is not None or spec.choices is not None:
        return []
    return [b for b, is_open in ((spec.low, spec.low_open), (spec.high, spec.high_open))
            if b is not None and not is_open and not (spec.odd and b % 2 == 0)]


def _flat(**kw) -> ProtectConfig:
    """A ProtectConfig from flat keys (uge.config.FLAT_KEYS), as the command line and the config files spell them."""
    return ProtectConfig.from_dict(kw)


def _all_specs():
    """(owner, build, spec table, checks types on construction) for every protector, Recipe and ProtectConfig."""
    for name in list_protectors():
        yield name, (lambda name=name, **kw: build_protector(name, **kw)), protector_class(name).specs(), True
    yield "recipe", Recipe, specs(Recipe), False
    yield "protect config", _flat, ProtectConfig.flat_specs(), True


CASES = [(owner, build, k, spec, types) for owner, build, table, types in _all_specs() for k, spec in table.items()]


def _refused(build, name: str, value, allowed: str):
    with pytest.raises(ConfigError) as e:
        build(**{name: value})
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert f"{name} must be {allowed}, got " in msg, msg  # the field, what is allowed, the value


@pytest.mark.parametrize("owner, build, name, spec, types", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_a_value_outside_each_declared_range_is_refused_in_one_line_naming_the_field(owner, build, name, spec, types):
    bad = outside(owner, name, spec)
    if not bad:  # no range, no choices: a value of another type (construction checks types, else from_dict)
        assert spec.type in (bool, str, None) or (owner, name) in UNBOUNDED, \
            f"{owner}.{name}: a number without a range (add one, or list it in UNBOUNDED)"
        if spec.type is None:
            return  # a table or a list with its own validation (a Recipe table, the hacker architecture list)
        bad = [WRONG_TYPE[spec.type]]
        if not types:  # Recipe: types are checked where plain values come in
            build = (lambda cls=build, **kw: cls.from_dict(kw))
    for value in bad:
        _refused(build, name, value, spec.allowed())


@pytest.mark.parametrize("owner, build, name, spec, types", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_the_boundaries_of_each_declared_range_are_accepted(owner, build, name, spec, types):
    for value in inside(spec):
        try:
            build(**{name: spec.type(value)})
        except ConfigError as e:  # only a rule that spans fields may refuse it (e.g. an option of the other
            assert f"{name} must be {spec.allowed()}" not in str(e), str(e)  # parametrization, block | size)


@pytest.mark.parametrize("owner, build, name, spec, types", [c for c in CASES if c[4]],
                         ids=[f"{c[0]}-{c[2]}" for c in CASES if c[4]])
def test_every_protector_field_checks_its_type(owner, build, name, spec, types):
    if spec.type in WRONG_TYPE:
        _refused(build, name, WRONG_TYPE[spec.type], spec.allowed())


@pytest.mark.parametrize("owner, build, params, field", [
    ("patch", lambda **kw: build_protector("patch", **kw), {"size": 8, "block": 3}, "block"),
    ("keyed", lambda **kw: build_protector("keyed", **kw), {"size": 8, "block": 3}, "block"),
    ("keyed", lambda **kw: build_protector("keyed", **kw), {"direction": [11, 1, 1]}, "direction"),
    ("keyed", lambda **kw: build_protector("keyed", **kw), {"recipe": {"epochs": 0}}, "recipe"),
    ("ntga", lambda **kw: build_protector("ntga", **kw), {"t": None, "ridge": 0.0}, "ridge"),
    ("protect config", _flat, {"trajectory_epochs": 31}, "trajectory_epochs"),
    ("protect config", _flat, {"generator_epochs": 3, "gm_warmup_epochs": 3}, "gm_warmup_epochs"),
    ("protect config", _flat, {"gm_granularity": "sample"}, "gm_granularity"),
    ("protect config", _flat, {"gm_rounds": 2}, "gm_rounds"),
    ("protect config", _flat, {"delta_steps": 3}, "delta_steps"),
    ("protect config", _flat, {"parametrization": "delta", "generator_center": True}, "generator_center"),
])
def test_rules_that_span_fields_are_one_line_errors_naming_the_field(owner, build, params, field):
    with pytest.raises(ConfigError) as e:
        build(**params)
    msg = str(e.value)
    assert "\n" not in msg and field in msg and owner in msg, msg


@pytest.mark.parametrize("name", list_countermeasures())
def test_every_countermeasure_parameter_refuses_a_value_outside_its_range(name):
    cls = get_countermeasure(name)
    for key, spec in cls.params.items():
        for value in [_below(spec.low, spec.type, spec.low_open), _above(spec.high, spec.type, spec.high_open)]:
            with pytest.raises(ConfigError, match=f"{key}=.* is out of range; allowed: {spec.allowed()}") as e:
                cls(**{key: value})
            assert "\n" not in str(e.value)


def test_method_list_shows_every_parameters_allowed_values(capsys):
    with pytest.raises(SystemExit):
        main(["protect", "--method", "list"])
    out = capsys.readouterr().out
    for name in list_protectors():
        for k, spec in protector_class(name).specs().items():
            assert f": {spec.allowed()}\n" in out + "\n", (name, k)


# ------------------------------------------------------------------ the mechanism itself


@dataclasses.dataclass
class _Box:
    width: int = param(4, low=1, high=8, note="cells")
    share: float | None = param(0.5, low=0, high=1, low_open=True)
    mode: str = param("a", choices=("a", "b"))
    names: tuple = param(("x",), choices=("x", "y"), many=True)
    label: str = "box"

    def __post_init__(self):
        validate(self, "box")

    def cross_checks(self):
        return [] if self.width % 2 == 0 or self.mode == "b" else [f"width must be even in mode 'a', got {self.width}"]


def test_allowed_values_in_words():
    s = specs(_Box)
    assert s["width"].allowed() == "an int in 1..8 cells"
    assert s["share"].allowed() == "a float > 0 and <= 1 or None"
    assert s["mode"].allowed() == "one of a, b"
    assert s["names"].allowed() == "a non-empty list from x, y"
    assert s["label"].allowed() == "a str"
    assert field_spec(ProtectConfig, "rho").allowed() == "a float >= 1/255 and < 1 on the [0, 1] pixel scale"
    assert Param(int, 10, 10, 95).allowed() == "an int in 10..95"  # the countermeasures' words, unchanged
    assert Param(float, 1.0, 0, 10, low_open=True).allowed() == "a float > 0 and <= 10"


def test_validate_names_every_refused_field_then_the_cross_rules():
    with pytest.raises(ConfigError) as e:
        _Box(width=0, share=0.0, mode="c", label=3)
    assert str(e.value) == ("box: width must be an int in 1..8 cells, got 0; share must be a float > 0 and <= 1 or "
                            "None, got 0.0; mode must be one of a, b, got 'c'; label must be a str, got 3 (int)")
    with pytest.raises(ConfigError, match=r"^box: width must be even in mode 'a', got 3$"):
        _Box(width=3)
    assert _Box(width=3, mode="b", share=None).width == 3


def test_a_subclass_that_changes_a_default_keeps_the_range():
    @dataclasses.dataclass
    class Wider(_Box):
        width: int = 6

    assert field_spec(Wider, "width").high == 8
    with pytest.raises(ConfigError, match="width must be an int in 1..8 cells, got 9"):
        Wider(width=9)
    rem = protector_class("rem")  # REM changes EM's pgd_steps and stop_acc defaults
    assert rem.specs()["pgd_steps"] == protector_class("em").specs()["pgd_steps"]
    with pytest.raises(ConfigError, match="pgd_steps must be an int >= 1, got 0"):
        build_protector("rem", pgd_steps=0)
