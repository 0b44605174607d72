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


# ---------------------------------------------------------------- UGE's settings: nested parts, flat keys (issue 19)


def test_every_part_field_has_exactly_one_flat_key():
    import dataclasses

    from uge.config import FLAT_KEYS, PARTS, ProtectConfig

    nested = {(None, f.name) for f in dataclasses.fields(ProtectConfig) if f.name not in PARTS}
    nested |= {(part, f.name) for part, cls in PARTS.items() for f in dataclasses.fields(cls)}
    assert sorted(FLAT_KEYS.values(), key=str) == sorted(nested, key=str)  # a bijection: no field twice, none left out


def test_flat_keys_set_the_nested_parts_and_come_back_unchanged():
    from uge.config import ProtectConfig, Recipe

    cfg = ProtectConfig.from_dict({"gm_granularity": "class", "lambda_fd": 0.5, "ud_teacher": "trained",
                                   "generator_epochs": 3, "generator_batch_size": 16, "encoder_recipe": {"epochs": 2},
                                   "parametrization": "delta", "delta_steps": 4, "clean_grad_cache_mb": 0})
    assert (cfg.gm.granularity, cfg.fd.weight, cfg.ud.teacher, cfg.generator.epochs, cfg.batch_size,
            cfg.delta.steps, cfg.gm.cache_mb) == ("class", 0.5, "trained", 3, 16, 4, 0)
    assert cfg.fd.encoder_recipe == Recipe(epochs=2)
    assert ProtectConfig.from_dict(cfg.to_dict()) == cfg
    assert list(ProtectConfig().to_dict())[:6] == ["authorized", "recipe", "rho", "trajectory_epochs", "losses",
                                                   "lambda_fd"]  # the order manifests always had


def test_a_nested_table_is_not_a_second_spelling():
    from uge.config import ProtectConfig
    from uge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^unknown protect config key\(s\): gm; known: .*gm_granularity"):
        ProtectConfig.from_dict({"gm": {"granularity": "class"}})


def test_an_option_of_the_other_parametrization_is_refused_in_one_line():
    from uge.config import DeltaOpt, GeneratorOpt, ProtectConfig
    from uge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^protect config: gm_warmup_epochs, generator_center is an option of the "
                                          r"other parametrization than 'delta'; leave it out$"):
        ProtectConfig(parametrization="delta", generator=GeneratorOpt(gm_warmup_epochs=1, center=True))
    with pytest.raises(ConfigError, match=r"^protect config: delta_steps is an option of the other parametrization "
                                          r"than 'generator'; leave it out$"):
        ProtectConfig(delta=DeltaOpt(steps=3))
    with pytest.raises(ConfigError, match=r"^protect config: gm must be a GradientMatching, got"):
        ProtectConfig(gm={"granularity": "class"})
