"""Issue 19: every ``uge protect`` flag means one thing for every method: it sets the method's field of that
name, or it is a one-line usage error that names the method's fields. Never ignored."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_dataset
from uge.cli import _FIELD_FLAGS, _protect_params, build_parser, main
from uge.data import save_npz
from uge.errors import ConfigError
from uge.protectors import build_protector, list_protectors, protector_class

# dest -> (the arguments that set it, the value its field must then hold)
VALUES = {
    "rho": (["--rho", "8/255"], 8 / 255),
    "authorized": (["--authorized", "cnn:3"], [{"arch": "cnn", "seed": 3, "theta0": None}]),
    "losses": (["--losses", "gm,fd"], ["gm", "fd"]),
    "trajectory_epochs": (["--trajectory-epochs", "2"], 2),
    "generator_epochs": (["--generator-epochs", "3"], 3),
    "generator_batch_size": (["--generator-batch-size", "16"], 16),
    "generator_width": (["--generator-width", "8"], 8),
    "generator_lr": (["--generator-lr", "0.01"], 0.01),
    "lambda_fd": (["--lambda-fd", "0.5"], 0.5),
    "lambda_ud": (["--lambda-ud", "0.2"], 0.2),
    "alpha": (["--alpha", "0.2"], 0.2),
    "omega": (["--omega", "0.3"], 0.3),
    "temperature": (["--temperature", "2"], 2.0),
    "gm_augment": (["--gm-augment"], True),
    "gm_trajectories": (["--gm-trajectories", "2"], 2),
    "delta_steps": (["--delta-steps", "3", "--parametrization", "delta"], 3),
    "gm_rounds": (["--gm-rounds", "2", "--parametrization", "delta"], 2),
    "gm_warmup_epochs": (["--gm-warmup-epochs", "1"], 1),
    "generator_center": (["--generator-center"], True),
    "feature_space": (["--feature-space", "clip"], "clip"),
    "clip_model": (["--clip-model", "RN50"], "RN50"),
    "clip_checkpoint": (["--clip-checkpoint", "x.pt"], "x.pt"),
    "encoder_arch": (["--encoder-arch", "lenet"], "lenet"),
    "hacker_arch": (["--hacker-arch", "lenet"], "lenet"),
    "gm_granularity": (["--gm-granularity", "class"], "class"),
    "gm_batchnorm": (["--gm-batchnorm", "frozen"], "frozen"),
    "ud_teacher": (["--ud-teacher", "trained"], "trained"),
    "fd_target": (["--fd-target", "next"], "next"),
    "parametrization": (["--parametrization", "delta"], "delta"),
    "encoder_epochs": (["--encoder-epochs", "2"], 2),
    "epochs": (["--epochs", "5"], 5),
    "lr": (["--lr", "0.05"], 0.05),
    "batch_size": (["--batch-size", "16"], 16),
    "flip": (["--no-flip"], False),
    "crop": (["--no-crop"], False),
}
RECIPE_DESTS = {"epochs", "lr", "batch_size", "flip", "crop"}
REJECTED = {("fd", "gm_rounds"): "gm_rounds > 1 needs"}  # fields the method has, at values it cannot take


def test_the_walk_covers_every_protect_flag():
    assert set(VALUES) == set(_FIELD_FLAGS)


@pytest.mark.parametrize("method", list_protectors())
@pytest.mark.parametrize("dest", sorted(_FIELD_FLAGS))
def test_every_flag_sets_its_field_or_is_a_one_line_error(method, dest):
    argv, expected = VALUES[dest]
    args = build_parser().parse_args(["protect", "--data", "digits", "--out", "x", "--method", method, *argv])
    cls = protector_class(method)
    field = _FIELD_FLAGS[dest][1]
    if field not in cls.parameter_names():
        with pytest.raises(ConfigError) as e:
            _protect_params(args, cls)
        msg = str(e.value)
        assert "\n" not in msg and _FIELD_FLAGS[dest][0] in msg and method in msg
        assert all(name in msg for name in cls.parameter_names())  # it names the method's fields
        return
    params, seed = _protect_params(args, cls)
    if (method, dest) in REJECTED:  # applied, and the value is refused in one line
        with pytest.raises(ConfigError, match=REJECTED[method, dest]):
            build_protector(method, **params)
        return
    got = build_protector(method, **params).params()
    if dest in RECIPE_DESTS:
        got = got["recipe"].get(dest)
    elif field == "encoder_recipe":
        got = got["encoder_recipe"]["epochs"]
    else:
        got = got[field]
    assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected
    assert seed is None  # none given: 0, or the key's when sealed (cmd_protect)


@pytest.mark.parametrize("method", list_protectors())
def test_seed_is_the_runs_seed_for_every_method(method):
    args = build_parser().parse_args(["protect", "--data", "digits", "--out", "x", "--method", method, "--seed", "5"])
    params, seed = _protect_params(args, protector_class(method))
    assert seed == 5 and "seed" not in params


def test_param_sets_any_methods_field_and_an_unknown_key_names_the_fields():
    args = build_parser().parse_args(["protect", "--data", "digits", "--out", "x", "--param", "generator_width=8"])
    params, _ = _protect_params(args, protector_class("uge"))
    assert build_protector("uge", **params).params()["generator_width"] == 8
    args = build_parser().parse_args(["protect", "--data", "digits", "--out", "x", "--method", "em",
                                      "--param", "generator_width=8"])
    params, _ = _protect_params(args, protector_class("em"))
    with pytest.raises(ConfigError, match="generator_width.*allowed: rho, arch"):
        build_protector("em", **params)


def test_method_list_prints_every_methods_parameters(capsys):
    with pytest.raises(SystemExit) as e:
        main(["protect", "--method", "list"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in list_protectors():
        assert f"{name}: " in out
        assert all(p in out for p in protector_class(name).parameter_names())


def test_a_flag_the_method_lacks_is_a_usage_error_before_any_work(tmp_path, capsys):
    rc = main(["protect", "--data", "no-such-data", "--out", str(tmp_path / "x"), "--method", "em",
               "--generator-epochs", "3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--generator-epochs does not apply to --method em" in err[0]
    assert not (tmp_path / "x").exists()


def test_keyed_publishes_at_the_budget_typed(tmp_path, capsys):
    """The issue's first finding: `--method keyed --rho 8/255` published at 0.04 (10 levels) without a word."""
    data = random_dataset(n=40, size=32, channels=3, num_classes=4)
    data.images[:] = 128  # mid-grey: the pattern is never clipped, so its amplitude shows the budget
    src = save_npz(data, tmp_path / "rgb.npz")
    rc = main(["protect", "--data", str(src), "--method", "keyed", "--rho", "8/255", "--out", str(tmp_path / "k"),
               "--format", "npz", "--quiet", "--device", "cpu"])
    assert rc == 0
    m = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert m["rho_levels"] == 8 and m["rho"] == pytest.approx(8 / 255) and m["params"]["rho"] == pytest.approx(8 / 255)
    with np.load(tmp_path / "k" / "data.npz") as z:
        levels = int(np.abs(z["images"].astype(int) - 128).max())
    assert levels == 8  # ±4 steps along (1, −2, 1): the green channel moves by the whole 8 levels


def test_protecting_a_published_set_is_a_one_line_error(tmp_path, capsys):
    data = random_dataset(n=20, size=8, channels=3, num_classes=4)
    src = save_npz(data, tmp_path / "rgb.npz")
    assert main(["protect", "--data", str(src), "--method", "random", "--out", str(tmp_path / "pub"),
                 "--format", "npz", "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    rc = main(["protect", "--data", str(tmp_path / "pub"), "--method", "random", "--out", str(tmp_path / "again"),
               "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "already a published set" in err[0] and "uge unseal" in err[0]
    assert not (tmp_path / "again").exists()


def test_keyed_on_grayscale_data_is_a_one_line_error(tmp_path, capsys):
    rc = main(["protect", "--data", "digits", "--per-class", "2", "--method", "keyed", "--out", str(tmp_path / "k"),
               "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs RGB images" in err[0]
    assert not (tmp_path / "k").exists()
