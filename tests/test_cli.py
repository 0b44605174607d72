"""The ``uge`` command line, run in-process through ``uge.cli.main`` (and once as an installed command)."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uge.cli import main
from uge.data import load_dataset, save_npz
from uge.models import create_model
from uge.published import read_published
from uge.weights import build_network, load_weights

evaluate_mod = importlib.import_module("uge.evaluate")

TINY_PROTECT = ["--method", "uge", "--data", "digits", "--per-class", "10", "--authorized", "cnn:0", "--epochs", "2",
                "--batch-size", "32", "--no-flip", "--trajectory-epochs", "2", "--generator-epochs", "1", "--generator-width", "4",
                "--generator-batch-size", "32", "--encoder-arch", "lenet", "--encoder-epochs", "1",
                "--format", "npz,png", "--quiet", "--device", "cpu"]


def run(argv: list[str]) -> tuple[int, str]:
    """main(argv) with stdout captured (stderr is left to pytest)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch working directory for the module (relative --out paths land here)."""
    d = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        yield d


@pytest.fixture(scope="module")
def protected(workdir):
    """``uge protect`` with the tiny flags; returns (exit code, stdout, published folder)."""
    rc, out = run(["protect", *TINY_PROTECT, "--out", "pub"])
    return rc, out, workdir / "pub"


@pytest.fixture
def pub_copy(protected, tmp_path):
    dst = tmp_path / "pub"
    shutil.copytree(protected[2], dst)
    return dst


def _records(folder: Path) -> dict[str, dict]:
    return {f.name: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}


# -------------------------------------------------------------------------------- protect/verify


def test_protect_publishes_with_the_flags_recorded(protected, workdir):
    rc, out, pub = protected
    assert rc == 0
    assert "protecting 100 images of 10 classes" in out and "published pub (npz, png)" in out
    m = read_published(pub).manifest
    assert m["formats"] == ["npz", "png"] and m["num_samples"] == 100
    assert m["source"] == {"name": "digits", "builtin": True, "split": "train", "per_class": 10, "subset_seed": 0}
    cfg = m["params"]
    assert cfg["authorized"] == [{"arch": "cnn", "seed": 0, "theta0": None}]
    assert {k: cfg["recipe"][k] for k in ("epochs", "batch_size", "flip", "crop")} == \
        {"epochs": 2, "batch_size": 32, "flip": False, "crop": True}
    assert (cfg["trajectory_epochs"], cfg["generator_epochs"], cfg["generator_width"], cfg["encoder_arch"],
            cfg["encoder_recipe"]["epochs"]) == (2, 1, 4, "lenet", 1)
    assert m["recipe"] == cfg["recipe"]
    assert len(m["history"]) == 1
    assert not (workdir / ".pub.work").exists()  # the default work folder is removed after success
    theta0 = load_weights(pub / "authorized/theta0_0.safetensors")
    ref = create_model("cnn", 10, 1, seed=0).state_dict()
    assert all(torch.equal(theta0[k], ref[k]) for k in ref)


def test_verify_passes_with_the_recorded_originals(protected, capsys):
    capsys.readouterr()
    rc = main(["verify", str(protected[2]), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[-1] == "verified: OK"
    assert all(line.startswith("PASS  ") for line in lines[:-1])
    names = [line.split(":")[0][6:] for line in lines[:-1]]
    # the originals were found from the manifest's source record: the budget really was checked
    assert {"file hashes", "no extra files", "npz = png", "originals", "labels unchanged", "budget"} <= set(names)
    budget = next(line for line in lines if line.startswith("PASS  budget"))
    assert "not checked" not in budget and "L∞" in budget


def test_verify_fails_after_tampering(pub_copy, capsys):
    f = next((pub_copy / "images").rglob("*.png"))
    f.write_bytes(f.read_bytes() + b"\0")
    capsys.readouterr()
    rc = main(["verify", str(pub_copy), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL  file hashes" in out and out.strip().endswith("verified: FAILED")


def test_verify_with_the_expected_budget(protected, capsys):
    capsys.readouterr()
    assert main(["verify", str(protected[2]), "--rho", "0.04", "--quiet"]) == 0
    assert "PASS  stated budget" in capsys.readouterr().out
    assert main(["verify", str(protected[2]), "--rho", "0.02", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  stated budget: you expect ρ = 0.02 (5 levels); the manifest states ρ = 0.04 (10 levels)" in out
    assert "FAIL  budget" in out  # the 10-level images exceed the 5 levels the user expects


def test_budget_flags_take_levels_too(protected, capsys):
    capsys.readouterr()
    assert main(["verify", str(protected[2]), "--rho", "10/255", "--quiet"]) == 0  # 10/255 = 0.04's 10 levels
    with pytest.raises(SystemExit) as e:
        main(["verify", str(protected[2]), "--rho", "10/256"])
    assert e.value.code == 2 and "8-bit levels (10/255)" in capsys.readouterr().err


def test_a_file_source_is_published_by_name_not_by_path(workdir, tmp_path, capsys):
    """The manifest names the data file, never where it sat; verify and evaluate then take its path."""
    data = tmp_path / "owner" / "private" / "my-digits.npz"
    data.parent.mkdir(parents=True)
    save_npz(load_dataset("digits", per_class=10), data)
    argv = ["protect", *TINY_PROTECT, "--out", str(tmp_path / "pub")]
    argv[argv.index("digits")] = str(data)
    argv[argv.index("--per-class"):argv.index("--per-class") + 2] = []
    assert run(argv)[0] == 0
    text = (tmp_path / "pub" / "manifest.json").read_text()
    assert str(tmp_path) not in text and "owner" not in text
    assert json.loads(text)["source"] == {"name": "my-digits.npz", "builtin": False, "split": "train",
                                          "per_class": None, "subset_seed": 0}
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "pub"), "--quiet"]) == 0  # hashes only, and it says why
    assert "pass --original-data PATH" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "pub"), "--original-data", str(data), "--quiet"]) == 0
    assert "PASS  budget" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "pub"), "--hackers", "cnn:normal", "--quiet"]) == 2
    assert "pass --test-data" in capsys.readouterr().err


def test_verify_with_other_originals_fails_the_originals_check(pub_copy, capsys):
    rc = main(["verify", str(pub_copy), "--original-data", "digits", "--original-per-class", "10",
               "--original-subset-seed", "1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL  originals" in out


# ------------------------------------------------------------------------------------ evaluate


def test_evaluate_writes_numeric_records_and_skips_them_on_rerun(protected, workdir, capsys, monkeypatch):
    pub = str(protected[2])
    argv = ["evaluate", pub, "--hackers", "lenet:normal,lenet:distill", "--epochs", "1", "--quiet",
            "--device", "cpu", "--out", "recs"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| network | mode | init |" in out and "| cnn (authorized) | normal | theta0 |" in out
    assert "| lenet | distill | seed:1 |" in out
    recs = _records(workdir / "recs")
    assert set(recs) == {"protected_authorized0_cnn.json", "protected_hacker_lenet_normal_s1.json",
                         "protected_hacker_lenet_distill_s1.json"}
    for r in recs.values():
        assert isinstance(r["test_acc"], float) and 0 <= r["test_acc"] <= 100
        assert isinstance(r["train_acc"], float)
        assert r["n_train"] == 100 and r["n_test"] == 360  # the default test set: the source's real test split
        assert r["recipe"]["epochs"] == 1
    assert recs["protected_hacker_lenet_distill_s1.json"]["mode"] == "distill"
    assert (workdir / "recs/table.md").read_text().startswith("| network |")
    mtimes = {f: f.stat().st_mtime_ns for f in (workdir / "recs").glob("*.json")}

    # a rerun trains nothing and leaves the records as they were
    def no_training(*a, **k):
        raise AssertionError("evaluate retrained a network whose record exists")

    monkeypatch.setattr(evaluate_mod, "train", no_training)
    assert main(argv) == 0
    out2 = capsys.readouterr().out
    assert _records(workdir / "recs") == recs
    assert {f: f.stat().st_mtime_ns for f in (workdir / "recs").glob("*.json")} == mtimes
    assert out2.split("\n\n")[0] == out.split("\n\n")[0]  # the same table


def test_evaluate_baseline_adds_clean_rows(protected, tmp_path, capsys):
    rc = main(["evaluate", str(protected[2]), "--hackers", "lenet", "--epochs", "1", "--baseline", "--quiet",
               "--device", "cpu", "--out", str(tmp_path / "recs")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "clean acc %" in out and "protected acc %" in out and "change" in out
    recs = _records(tmp_path / "recs")
    assert {r["data"] for r in recs.values()} == {"clean", "protected"}
    assert len(recs) == 4


# -------------------------------------------------------------------------------------- train


def test_train_saves_weights_and_record_and_init_reuses_them(workdir, capsys):
    common = ["train", "--data", "digits", "--arch", "lenet", "--quiet", "--device", "cpu", "--no-flip",
              "--batch-size", "32"]
    assert main([*common, "--epochs", "4", "--lr", "0.05", "--save", "w.safetensors", "--record", "r.json"]) == 0
    out = capsys.readouterr().out
    assert "lenet (normal): test accuracy" in out and "weights saved to w.safetensors" in out
    rec = json.loads((workdir / "r.json").read_text())
    assert isinstance(rec["test_acc"], float) and rec["test_acc"] > 50
    assert rec["mode"] == "normal" and rec["init"] == "seed:0" and rec["recipe"]["epochs"] == 4
    assert rec["test"]["split"] == "test"
    model = build_network("lenet", 10, 1, weights=workdir / "w.safetensors")  # loads strictly

    # --init starts from those weights: with a vanishing lr (lenet has no BatchNorm) the accuracy is unchanged
    assert main([*common, "--epochs", "1", "--lr", "1e-12", "--init", "w.safetensors", "--record", "r2.json"]) == 0
    rec2 = json.loads((workdir / "r2.json").read_text())
    assert rec2["init"] == "w.safetensors"
    assert rec2["test_acc"] == pytest.approx(rec["test_acc"], abs=0.5)
    assert main([*common, "--epochs", "1", "--lr", "1e-12", "--record", "r3.json"]) == 0
    assert json.loads((workdir / "r3.json").read_text())["test_acc"] < rec["test_acc"] - 30  # from seed 0 instead

    # distillation from the saved network
    assert main([*common, "--epochs", "1", "--teacher", "w.safetensors", "--teacher-arch", "lenet", "--seed", "1",
                 "--record", "r4.json"]) == 0
    assert json.loads((workdir / "r4.json").read_text())["mode"] == "distill"
    del model


def test_train_on_a_published_set_tests_on_its_source(protected, tmp_path, capsys):
    rec_file = tmp_path / "r.json"
    assert main(["train", "--data", str(protected[2]), "--arch", "lenet", "--epochs", "1", "--quiet",
                 "--device", "cpu", "--record", str(rec_file)]) == 0
    rec = json.loads(rec_file.read_text())
    assert rec["test"]["data"] == "digits" and rec["test"]["split"] == "test"


# -------------------------------------------------------------------------------------- errors


def _expect_usage_error(argv, capsys, match: str):
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (rc, captured.out, captured.err)
    assert len(err) == 1 and err[0].startswith("uge: error: "), captured.err
    assert match.lower() in err[0].lower()
    assert "Traceback" not in captured.err + captured.out


def test_error_unknown_arch(workdir, capsys):
    _expect_usage_error(["train", "--data", "digits", "--arch", "nosuchnet", "--quiet", "--device", "cpu"],
                        capsys, "nosuchnet")


def test_error_missing_data_path(workdir, capsys):
    _expect_usage_error(["train", "--data", "/nonexistent/set.npz", "--arch", "lenet", "--quiet"], capsys,
                        "/nonexistent/set.npz")


def test_error_bad_losses(workdir, capsys):
    _expect_usage_error(["protect", *TINY_PROTECT, "--losses", "gm,bogus", "--out", "never"], capsys, "losses")
    assert not (workdir / "never").exists()


def test_error_rho_zero(workdir, capsys):
    _expect_usage_error(["protect", *TINY_PROTECT, "--rho", "0", "--out", "never"], capsys, "rho")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_cuda_without_gpu(workdir, capsys):
    _expect_usage_error(["train", "--data", "digits", "--arch", "lenet", "--epochs", "1", "--quiet",
                         "--device", "cuda"], capsys, "cuda")


def test_error_unknown_device(workdir, capsys):
    _expect_usage_error(["train", "--data", "digits", "--arch", "lenet", "--epochs", "1", "--quiet",
                         "--device", "tpu"], capsys, "tpu")


def test_error_hacker_with_bad_mode(protected, capsys):
    _expect_usage_error(["evaluate", str(protected[2]), "--hackers", "lenet:steal", "--quiet", "--device", "cpu",
                         "--out", "never"], capsys, "steal")


def test_error_config_json_with_unknown_key(workdir, capsys):
    cfg = workdir / "bad.json"
    cfg.write_text(json.dumps({"rho": 0.03, "generator_epochz": 3}))
    _expect_usage_error(["protect", *TINY_PROTECT, "--config", str(cfg), "--out", "never"], capsys,
                        "generator_epochz")


def test_error_config_json_invalid(workdir, capsys):
    cfg = workdir / "broken.json"
    cfg.write_text("{rho: ")
    _expect_usage_error(["protect", *TINY_PROTECT, "--config", str(cfg), "--out", "never"], capsys, "JSON")


def test_error_existing_out_without_overwrite(protected, capsys, monkeypatch):
    before = (protected[2] / "manifest.json").read_text()
    def no_protect(*a, **k):
        raise AssertionError("protect ran although --out exists")

    monkeypatch.setattr(importlib.import_module("uge.protectors.uge.protector"), "_run", no_protect)
    _expect_usage_error(["protect", *TINY_PROTECT, "--out", str(protected[2])], capsys, "already exists")
    assert (protected[2] / "manifest.json").read_text() == before


def test_error_bad_format_is_reported_before_any_training(workdir, capsys, monkeypatch):
    def no_protect(*a, **k):
        raise AssertionError("protect ran although --format is invalid")

    monkeypatch.setattr(importlib.import_module("uge.protectors.uge.protector"), "_run", no_protect)
    _expect_usage_error(["protect", *TINY_PROTECT[:-5], "--format", "jpeg", "--quiet", "--device", "cpu",
                         "--out", "never"], capsys, "format")


def test_bad_format_still_fails_cleanly_after_protecting(workdir, capsys):
    _expect_usage_error(["protect", *TINY_PROTECT[:-5], "--format", "jpeg", "--quiet", "--device", "cpu",
                         "--out", "never"], capsys, "format")
    assert not (workdir / "never").exists()


def test_interrupt_exits_130_with_a_resume_hint(workdir, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("uge.protectors.uge.protector"), "_run", interrupted)
    rc = main(["protect", *TINY_PROTECT, "--out", "never"])
    assert rc == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_error_init_weights_of_another_arch(workdir, capsys):
    from uge.weights import save_weights

    save_weights(workdir / "cnn.safetensors", create_model("cnn", 10, 1).state_dict())
    _expect_usage_error(["train", "--data", "digits", "--arch", "lenet", "--init", "cnn.safetensors", "--quiet",
                         "--device", "cpu"], capsys, "do not fit")


def test_error_teacher_without_arch(workdir, capsys):
    _expect_usage_error(["train", "--data", "digits", "--arch", "lenet", "--teacher", "x.safetensors", "--quiet",
                         "--device", "cpu"], capsys, "--teacher-arch")


def test_error_verify_or_evaluate_a_folder_that_is_not_published(workdir, capsys):
    (workdir / "plain").mkdir(exist_ok=True)
    _expect_usage_error(["verify", "plain", "--quiet"], capsys, "manifest.json is missing")
    _expect_usage_error(["evaluate", "plain", "--quiet"], capsys, "manifest.json is missing")


def test_missing_required_argument_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "digits"])
    assert e.value.code == 2
    assert "--arch" in capsys.readouterr().err


# ------------------------------------------------------------------------------- installed


def _installed_uge() -> str:
    """The ``uge`` script of this interpreter's environment (beside ``sys.executable``; PATH only as a fallback,
    so the test holds when the interpreter is called without activating its environment)."""
    here = Path(sys.executable).with_name("uge")
    exe = str(here) if here.is_file() else shutil.which("uge")
    assert exe, "the uge console script is not installed"
    return exe


def test_installed_command_exits_2_with_one_line_and_no_traceback(tmp_path):
    exe = _installed_uge()
    r = subprocess.run([exe, "protect", "--data", "digits", "--rho", "0", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    assert r.stderr.strip().startswith("uge: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_import_and_help_do_not_load_torch():
    """A fast start: `import uge` and the whole parser (every subcommand's flags) come from the config layer."""
    code = ("import sys, uge; from uge.cli import build_parser; build_parser().format_help(); "
            "uge.ProtectConfig(); assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    # the lazy names resolve to the functions, also after their modules were imported (no name is a module's)
    code = "import uge, uge.published, uge.protectors.uge; print(uge.protect.__module__, uge.publish.__module__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.split() == ["uge.protectors.uge.protector", "uge.published"], r.stderr


def test_python_dash_m_help_lists_the_commands():
    r = subprocess.run([sys.executable, "-m", "uge", "--help"], capture_output=True, text=True, timeout=120,
                       check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0
    for sub in ("protect", "train", "evaluate", "verify", "demo"):
        assert sub in r.stdout
