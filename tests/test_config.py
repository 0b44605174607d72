"""The config layer: one budget unit everywhere a user types it, in two spellings (issue 12)."""
import pytest


@pytest.mark.parametrize("text, value", [("0.04", 0.04), ("10/255", 10 / 255), (" 8 / 255 ", 8 / 255), (0.5, 0.5)])
def test_a_budget_is_typed_as_a_fraction_or_in_levels(text, value):
    from uge.config import parse_budget

    assert parse_budget(text) == pytest.approx(value, abs=1e-15)


@pytest.mark.parametrize("text", ["10/256", "ten", "nan", "1/0"])
def test_a_bad_budget_is_a_config_error(text):
    from uge.config import parse_budget
    from uge.errors import ConfigError

    with pytest.raises(ConfigError, match="budget"):
        parse_budget(text)


def test_a_countermeasure_budget_in_either_spelling_prints_one():
    from uge.countermeasures import format_countermeasures, parse_countermeasures
    from uge.errors import ConfigError

    a, b = parse_countermeasures("adv:eps=8/255,step=2/255"), parse_countermeasures("adv:eps=8,step=2")
    assert a == b and format_countermeasures(a) == format_countermeasures(b) == "adv:eps=8.0,steps=5,step=2.0"
    with pytest.raises(ConfigError, match="eps='8/256'"):
        parse_countermeasures("adv:eps=8/256")


def test_a_baseline_budget_parameter_takes_levels():
    from uge.cli import _method_params

    assert _method_params(["rho=8/255", "pgd_steps=10", "arch=cnn"]) == {"rho": 8 / 255, "pgd_steps": 10, "arch": "cnn"}
