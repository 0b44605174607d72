"""uge benchmark / uge report: config validation, resuming after an interruption, reports from records alone."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import uge.benchmark.runner as runner_mod
import uge.evaluate as evaluate_mod
import uge.protectors.uge.protector as uge_mod
from uge.benchmark import load_config, parse_config, read_records, run_benchmark, write_report
from uge.benchmark.report import build_rows, floor_table, worst_case_table
from uge.cli import main
from uge.errors import ConfigError
from uge.protectors import build_protector
from uge.protectors.uge.losses import least_similar_class
from uge.published import read_published

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = {
    "name": "tiny", "device": "cpu",
    "data": {"source": "digits", "per_class": 6, "test_per_class": 5},
    "recipe": {"epochs": 1, "batch_size": 32, "lr": 0.05, "flip": False},
    "protect": {"authorized": ["lenet:0"], "trajectory_epochs": 1, "generator_epochs": 1, "generator_width": 4,
                "generator_batch_size": 30, "encoder_arch": "lenet", "encoder_epochs": 1},
    "evaluate": {"hackers": ["lenet:normal:1", "lenet:distill:1"]},
    "variant": [{"name": "Original", "protector": "clean"}, {"name": "UGE"},
                {"name": "Fed", "federated": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "losses": ["gm", "fd"]}],
}


def tiny(**changes) -> dict:
    d = copy.deepcopy(TINY)
    d.update(changes)
    return d


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.variants and (cfg.hackers or cfg.authorized_recipes or cfg.authorized_seeds)
    for v in cfg.variants:  # every variant trains a network: an authorized one or a hacker
        assert cfg.authorized(v) or (cfg.hackers if v.hackers is None else v.hackers)
        if v.protector != "clean":
            build_protector(v.protector, **cfg.params(v))


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key"),
    ({"data": {"source": "digits", "per_clas": 3}}, "per_clas"),
    ({"recipe": {"epochs": "ten"}}, "epochs"),
    ({"recipe": {"lr": -1.0}}, "lr"),
    ({"protect": {**TINY["protect"], "rho": 2.0}}, "rho"),
    ({"protect": {**TINY["protect"], "generator_epoks": 2}}, "generator_epoks"),
    ({"evaluate": {"hackers": ["lenet:sideways"]}}, "unknown hacker mode"),
    ({"evaluate": {"hackers": ["alexnet:normal"]}}, "unknown architecture"),
    ({"evaluate": {"hackers": [], "extra": 1}}, "unknown evaluate key"),
    ({"variant": []}, "at least one"),
    ({"variant": [{"name": "A", "protector": "emm"}]}, "unknown protector"),
    ({"variant": [{"name": "A", "protector": "em", "pgd_stepz": 3}]}, "pgd_stepz"),
    ({"protect": {"generator_epochz": 3}}, "unknown key.*generator_epochz"),
    ({"variant": [{"name": "A", "protector": "em", "generator_epochs": 3}]}, "generator_epochs.*allowed: rho"),
    ({"variant": [{"name": "A", "protector": "em", "federated": [[0, 1], [1, 2]]}]}, "disjoint"),
    ({"variant": [{"name": "A"}, {"name": "a"}]}, "distinct"),
    ({"variant": [{"name": "A", "losses": ["gm", "xx"]}]}, "losses"),
    ({"variant": [{"name": "A", "federated": [[0, 1], [1, 2]]}]}, "disjoint"),
    ({"variant": [{"name": "A", "protector": "clean", "rho": 0.1}]}, "clean variant"),
    ({"name": ""}, "name"),
    ({"evaluate": {"hackers": [], "authorized_recipes": {"b": {"batch_sise": 8}}}}, "batch_sise"),
    ({"evaluate": {"hackers": [], "authorized_recipes": {"b": {"lr": 0.0}}}}, "'b'.*lr"),
    ({"evaluate": {"hackers": [], "authorized_recipes": {"b": 32}}}, "authorized_recipes must be a table"),
    ({"evaluate": {"hackers": [], "authorized_recipes": {"b": {}}}}, "authorized_recipes must be a table"),
    ({"evaluate": {"hackers": [], "authorized_recipes": {"Lr 1": {"lr": 1.0}, "lr-1": {"lr": 1.0}}}}, "distinct"),
])
def test_bad_config_is_rejected_with_a_clear_message(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny(**change))


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[recipe]\nepocs = 3\n[[variant]]\nname = "Original"\nprotector = "clean"\n')
    assert main(["benchmark", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epocs" in err[0] and "bad.toml" in err[0]
    (tmp_path / "broken.toml").write_text("name = \n")
    assert main(["benchmark", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


# ---------------------------------------------------------------- running and resuming

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny run (3 variants, 3 networks each) shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("bench") / "run"
    records = run_benchmark(parse_config(tiny()), out, progress=False)
    return out, records


def test_run_writes_one_record_per_network(tiny_run):
    out, records = tiny_run
    assert len(records) == 9  # 3 variants x (authorized + 2 hackers)
    assert len(list((out / "records").glob("*/*.json"))) == 9
    assert {r["variant"] for r in records} == {"Original", "UGE", "Fed"}
    assert all(0 <= r["test_acc"] <= 100 for r in records)
    assert (out / "finished.json").exists()


def test_protected_variants_are_published_within_budget(tiny_run):
    out, _ = tiny_run
    pub = read_published(out / "variants" / "uge" / "published")
    clean = runner_mod.load_data(parse_config(tiny()))[0]
    diff = np.abs(pub.data.images.astype(int) - clean.images.astype(int))
    assert 0 < diff.max() <= int(255 * 0.04)
    assert np.array_equal(pub.data.labels, clean.labels)


def test_federated_servers_publish_their_own_classes(tiny_run):
    out, _ = tiny_run
    parts = [read_published(out / "variants" / "fed" / f"published-{i}") for i in range(2)]
    assert set(parts[0].data.labels) == {0, 1, 2, 3, 4} and set(parts[1].data.labels) == {5, 6, 7, 8, 9}
    for p in parts:  # both servers share the global network's θ0
        assert p.manifest["authorized"][0]["arch"] == "lenet"
    a, b = (read_published(out / "variants" / "fed" / f"published-{i}").path / "authorized" / "theta0_0.safetensors"
            for i in range(2))
    assert a.read_bytes() == b.read_bytes()


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    cfg = parse_config(tiny(variant=TINY["variant"][:2]))
    calls = {"train": 0, "protect": 0}
    real_train, real_protect = evaluate_mod.train, uge_mod._run

    def counting_train(*a, **k):
        calls["train"] += 1
        if calls["train"] == 4:  # the machine dies during the 4th network (the UGE variant's authorized one)
            raise KeyboardInterrupt
        return real_train(*a, **k)

    def counting_protect(*a, **k):
        calls["protect"] += 1
        return real_protect(*a, **k)

    monkeypatch.setattr(evaluate_mod, "train", counting_train)
    monkeypatch.setattr(uge_mod, "_run", counting_protect)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, out, progress=False)
    done = {f: f.read_bytes() for f in (out / "records").glob("*/*.json")}
    assert len(done) == 3 and calls["protect"] == 1
    assert not (out / "finished.json").exists()

    calls.update(train=0, protect=0)
    monkeypatch.setattr(evaluate_mod, "train", lambda *a, **k: (calls.__setitem__("train", calls["train"] + 1),
                                                                real_train(*a, **k))[1])
    records = run_benchmark(cfg, out, progress=False)
    assert calls == {"train": 3, "protect": 0}  # only the 3 unfinished networks; the published set is reused
    assert len(records) == 6
    for f, content in done.items():
        assert f.read_bytes() == content  # finished records are untouched


def test_run_folder_kept_without_its_images_protects_again_only_for_networks_left(tmp_path):
    """results/ commits a run's manifests but not its images. Resumed as it was, a finished variant needs no
    images and is not protected again (EM or REM would take long); grown by a network, it is protected again (same
    seed, same bytes) instead of failing on the missing data file, and its finished networks are not retrained."""
    variants = [{"name": "Random", "protector": "random"}, {"name": "Keyed", "protector": "keyed"}]
    rgb = {"source": "shapes", "per_class": 4, "test_per_class": 2}  # keyed protection needs colour
    cfg = parse_config(tiny(data=rgb, variant=variants, evaluate={"hackers": ["lenet:normal:1"]}))
    out = tmp_path / "run"
    first = run_benchmark(cfg, out, progress=False)
    pub = {v: out / "variants" / v / "published" / "data.npz" for v in ("random", "keyed")}
    before = {v: f.read_bytes() for v, f in pub.items()}
    for f in pub.values():
        f.unlink()
    again = run_benchmark(cfg, out, progress=False)
    assert again == first  # every record read back
    assert not pub["random"].exists()  # finished: not protected again
    assert pub["keyed"].read_bytes() == before["keyed"]  # its authorized networks come from the published set
    grown = parse_config(tiny(data=rgb, variant=variants, evaluate={"hackers": ["lenet:normal:1"],
                                                                      "countermeasures": ["none", "grayscale"]}))
    mtimes = {f: f.stat().st_mtime_ns for f in (out / "records").glob("*/*.json")}
    records = run_benchmark(grown, out, progress=False)
    assert pub["random"].read_bytes() == before["random"]
    assert len(records) > len(first) and all(r in records for r in first)
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())  # nothing finished was trained again


def test_rerun_with_another_config_is_refused(tiny_run):
    out, _ = tiny_run
    other = tiny(recipe={**TINY["recipe"], "epochs": 2})
    with pytest.raises(ConfigError, match="another experiment.*recipe"):
        run_benchmark(parse_config(other), out, progress=False)


# ---------------------------------------------------------------- reports

def _record(variant, protector, role, arch, mode, acc, index=0, init=None, rho=None):
    return {"variant": variant, "protector": protector, "role": role, "arch": arch, "mode": mode, "index": index,
            "init": init or ("theta0:seed0" if role == "authorized" else "seed:1"), "test_acc": acc, "rho": rho,
            "data": variant.lower(), "n_train": 100, "n_test": 50, "recipe": {}, "seconds": 1.0, "train_acc": 99.0}


def _fake_run(tmp_path) -> Path:
    run = tmp_path / "run"
    recs = [_record("Original", "clean", "authorized", "resnet18", "normal", 90.0),
            _record("Original", "clean", "hacker", "cnn", "normal", 80.0),
            _record("Original", "clean", "hacker", "cnn", "distill", 82.0),
            _record("UGE", "uge", "authorized", "resnet18", "normal", 88.5, rho=4 / 255),
            _record("UGE", "uge", "hacker", "cnn", "normal", 30.0, rho=4 / 255),
            _record("UGE", "uge", "hacker", "cnn", "distill", 41.0, rho=4 / 255),
            _record("UGE big", "uge", "hacker", "cnn", "normal", 20.0, rho=8 / 255)]
    for i, r in enumerate(recs):
        d = run / "records" / r["data"].replace(" ", "-")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.json").write_text(json.dumps(r))
    (run / "config.json").write_text(json.dumps({
        "name": "fake", "variant": [{"name": "Original"}, {"name": "UGE"}, {"name": "UGE big"}],
        "paper": {"source": "Table 1", "row": [{"variant": "Original", "authorized": 95.0, "cnn": 86.0},
                                               {"variant": "UGE", "authorized": 94.0, "cnn": 26.0}]}}))
    return run


def test_report_is_built_from_records_alone(tmp_path):
    run = _fake_run(tmp_path)  # records only: no data, no published sets, no weights
    out = write_report(run)
    table = (out / "table.md").read_text()
    assert "| UGE | normal | 88.50 (-1.50) | 30.00 (-50.00) |" in table
    assert "| UGE | distill | – | 41.00 (-41.00) |" in table
    assert "| Original | normal | 90.00 | 80.00 |" in table
    report = (out / "report.md").read_text()
    assert "30.00 (-50.00) / 26.00 (-60.00)" in report  # ours beside the paper's, both as drops
    rows = list(csv.DictReader(open(out / "table.csv")))
    cnn_uge = next(r for r in rows if r["variant"] == "UGE" and r["mode"] == "normal" and r["network"] == "cnn")
    assert float(cnn_uge["change"]) == -50.0 and float(cnn_uge["paper_acc"]) == 26.0
    assert r"\begin{tabular}" in (out / "table.tex").read_text()
    for fig in ("accuracy.png", "rho.png"):  # two budgets -> the Fig. 3 curve
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"


def test_report_without_matplotlib_writes_the_tables(tmp_path, monkeypatch):
    """matplotlib is an optional extra (uge[report]): without it the tables are written and figures skipped."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = write_report(_fake_run(tmp_path))
    assert "| UGE | normal | 88.50 (-1.50) | 30.00 (-50.00) |" in (out / "table.md").read_text()
    assert "Figures:" not in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


def test_report_of_a_real_run_matches_its_records(tiny_run, tmp_path):
    out, records = tiny_run
    rep = write_report(out, tmp_path / "rep")
    rows = list(csv.DictReader(open(rep / "table.csv")))
    assert len(rows) == len(records)
    clean = {(r["role"], r["arch"], r["mode"]): r["test_acc"] for r in records if r["variant"] == "Original"}
    for r in records:
        row = next(x for x in rows if x["variant"] == r["variant"] and x["mode"] == r["mode"]
                   and x["arch"] == r["arch"] and (x["network"] == "authorized") == (r["role"] == "authorized"))
        assert float(row["test_acc"]) == pytest.approx(r["test_acc"], abs=0.005)
        assert float(row["clean_acc"]) == pytest.approx(clean[(r["role"], r["arch"], r["mode"])], abs=0.005)
    assert (rep / "samples.png").exists()
    assert len(read_records(out)) == len(records)


def test_report_cli_and_missing_run(tmp_path, capsys):
    run = _fake_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert "report written" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2
    empty = tmp_path / "empty"
    (empty / "records").mkdir(parents=True)
    assert main(["report", str(empty)]) == 2
    assert "no records" in capsys.readouterr().err


# ---------------------------------------------------------------- a class-split server's feature space

def test_classes_without_features_are_never_the_target():
    feats = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    feats[2] = float("nan")  # class 2 has no images on this server
    f = torch.nn.functional.normalize(-feats[2:3].nan_to_num() + torch.randn(64, 8), dim=1)
    y = torch.randint(0, 2, (64,))
    assert not (least_similar_class(f, feats, y) == 2).any()


def test_config_inherits_from_its_base(tmp_path):
    fast = load_config(CONFIGS / "table1-fast.toml")
    paper = load_config(CONFIGS / "table1-paper.toml")
    assert [v.name for v in fast.variants] == [v.name for v in paper.variants]
    assert fast.recipe.epochs < paper.recipe.epochs and fast.hackers == paper.hackers
    assert fast.protect["generator_epochs"] < paper.protect["generator_epochs"]
    assert fast.protect["alpha"] == paper.protect["alpha"]  # inherited key by key
    (tmp_path / "a.toml").write_text('base = "b.toml"\nname = "a"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('base = "missing.toml"\nname = "c"\n')
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "c.toml")


def test_countermeasure_grid_and_robustness_matrix(tmp_path):
    cfg = parse_config(tiny(variant=TINY["variant"][:2],
                            evaluate={"hackers": ["lenet:normal:1"], "countermeasures": ["none", "jpeg:quality=10"]}))
    records = run_benchmark(cfg, tmp_path / "run", progress=False)
    assert len(records) == 8  # 2 variants x 2 settings x (authorized + 1 hacker)
    assert {r["countermeasures"] for r in records} == {None, "jpeg:quality=10"}
    report = (write_report(tmp_path / "run") / "report.md").read_text()
    assert "Robustness matrix" in report and "| data | none | jpeg:quality=10 |" in report
    with pytest.raises(ConfigError, match="countermeasure"):
        parse_config(tiny(evaluate={"hackers": [], "countermeasures": ["jpeg:quality=5"]}))


def test_a_screened_variant_runs_only_its_countermeasures_and_its_list_may_grow(tmp_path):
    ev = {"hackers": ["lenet:normal:1"], "countermeasures": ["none", "jpeg:quality=10", "grayscale"],
          "countermeasures_authorized": False}
    screened = {"name": "Random", "protector": "random", "countermeasures": ["none", "grayscale"]}
    cfg = parse_config(tiny(variant=[TINY["variant"][0], screened], evaluate=ev))
    assert cfg.variants[1].countermeasures == ["", "grayscale"]  # canonical texts, as the grid's
    records = run_benchmark(cfg, tmp_path / "run", progress=False)
    files = lambda: sorted((tmp_path / "run" / "records").glob("*/*.json"))  # noqa: E731
    before = files()
    got = {(r["variant"], r["role"], r["countermeasures"]) for r in records}
    first, second = TINY["variant"][0]["name"], screened["name"]
    assert {(v, cm) for v, role, cm in got if role == "hacker"} == {
        (first, None), (first, "jpeg:quality=10"), (first, "grayscale"), (second, None), (second, "grayscale")}
    report = (write_report(tmp_path / "run") / "report.md").read_text()
    worst = report[report.index("Worst case"):].split("\n\n")[1]
    assert "(2 of 3 run)" in worst  # the worst case says it is over the screen only
    assert "authorized" not in worst  # key holders trained without countermeasures have no worst case
    # the screen grows by a setting: the finished records stay, the new cell is trained
    cfg = parse_config(tiny(variant=[TINY["variant"][0], {**screened, "countermeasures": ["none", "grayscale",
                                                                                           "jpeg:quality=10"]}],
                            evaluate=ev))
    run_benchmark(cfg, tmp_path / "run", progress=False)
    new = sorted(set(files()) - set(before))
    assert len(new) == 1 and new[0].name.startswith("random_hacker") and "jpeg" in new[0].name
    for bad in (["none", "blur"], ["none", "none"], []):
        with pytest.raises(ConfigError, match="countermeasures"):
            parse_config(tiny(variant=[{**screened, "countermeasures": bad}], evaluate=ev))


def test_worst_case_table_takes_the_highest_accuracy_and_the_fraction_of_clean_learning():
    def rec(variant, protector, role, acc, cm=None):
        return {**_record(variant, protector, role, "cnn", "normal", acc), "countermeasures": cm}
    records = [rec("Original", "clean", "hacker", 60.0), rec("Original", "clean", "hacker", 50.0, "jpeg:quality=10"),
               rec("Original", "clean", "authorized", 70.0),
               rec("P", "patch", "hacker", 12.0), rec("P", "patch", "hacker", 30.0, "jpeg:quality=10"),
               rec("P", "patch", "hacker", 40.0, "adv:eps=8.0,steps=3,step=6.666667"),
               rec("P", "patch", "authorized", 20.0)]
    cms = ["", "jpeg:quality=10", "adv:eps=8.0,steps=3,step=6.666667", "grayscale"]
    columns, rows = build_rows(records, cms)
    table = worst_case_table(columns, rows, chance=10.0, cms=cms, authorized=False)
    (line,) = [l for l in table.splitlines() if l.startswith("| P |")]  # noqa: E741
    cells = [c.strip() for c in line.strip("|").split("|")]
    # clean 60, plain 12, worst 40 by adv (3 of the 4 settings run): (40 - 10) / (60 - 10) = 0.6; without adv 30
    assert cells[3:] == ["60.00", "12.00", "40.00 (3 of 4 run)", "adv:eps=8.0,steps=3,step=6.666667", "0.60",
                         "30.00", "jpeg:quality=10"]
    with_auth = worst_case_table(columns, rows, chance=10.0, cms=cms)
    # 0.17 is under the goal, but over one of four settings: no ✓ before the whole battery has run
    assert "| P | normal | authorized | 70.00 | 20.00 | 20.00 (1 of 4 run) | none | 0.17 |" in with_auth
    low = [rec("Original", "clean", "hacker", 60.0), rec("Original", "clean", "hacker", 50.0, "grayscale"),
           rec("P", "patch", "hacker", 20.0), rec("P", "patch", "hacker", 30.0, "grayscale")]
    assert "| 0.40 ✓ |" in worst_case_table(*build_rows(low), chance=10.0)  # (30 - 10) / 50: the goal, exactly


def test_floor_table_gives_each_attacks_cost_on_clean_data_and_marks_those_above_the_goal():
    def rec(role, acc, cm=None, arch="cnn"):
        return {**_record("Original", "clean", role, arch, "normal", acc), "countermeasures": cm}
    records = [rec("hacker", 60.0), rec("hacker", 50.0, "jpeg:quality=10"), rec("hacker", 25.0, "grayscale"),
               rec("authorized", 70.0), rec("hacker", 9.5, arch="lenet"), rec("hacker", 9.0, "grayscale", "lenet"),
               {**_record("P", "patch", "hacker", "cnn", "normal", 12.0), "countermeasures": None}]
    columns, rows = build_rows(records, ["", "jpeg:quality=10", "grayscale"])
    table = floor_table(columns, rows, chance=10.0, authorized=False)
    head, _, *body = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    cell = {(row[0], name): value for row in body for name, value in zip(head, row)}
    assert {row[0] for row in body} == {"jpeg:quality=10", "grayscale"} and head[2:] == ["cnn", "lenet"]
    # (50 - 10) / (60 - 10) = 0.8 above the goal; (25 - 10) / 50 = 0.3 not; lenet learns nothing clean: no fraction
    assert cell["jpeg:quality=10", "cnn"] == "50.00 (0.80 ▲)" and cell["grayscale", "cnn"] == "25.00 (0.30)"
    assert cell["grayscale", "lenet"] == "–" and "| P |" not in table
    assert floor_table(*build_rows(records[-1:]), chance=10.0) == ""  # no clean record under a countermeasure
    # a second clean variant (another hacker seed) has a plain record of its own: the first one's still count
    second = {**_record("Original, seed 2", "clean", "hacker", "resnet", "normal", 55.0), "countermeasures": None}
    table = floor_table(*build_rows(records + [second], ["", "jpeg:quality=10", "grayscale"]), chance=10.0,
                        authorized=False)
    assert "| jpeg:quality=10 | normal | 50.00 (0.80 ▲) |" in table


def test_baseline_protectors_run_in_a_grid(tmp_path):
    variants = [{"name": "Original", "protector": "clean"}, {"name": "Random", "protector": "random"},
                {"name": "CUDA", "protector": "cuda"},
                {"name": "EM", "protector": "em", "arch": "lenet", "train_steps": 2, "pgd_steps": 2, "max_rounds": 1}]
    cfg = parse_config(tiny(variant=variants, evaluate={"hackers": ["lenet:normal:1"]}))
    records = run_benchmark(cfg, tmp_path / "run", progress=False)
    assert len(records) == 8
    stats = json.loads((tmp_path / "run" / "variants" / "cuda" / "protect.json").read_text())["parts"][0]
    assert stats["similarity"]["psnr"] > 0 and "PSNR" in stats["budget"]
    manifest = json.loads((tmp_path / "run" / "variants" / "cuda" / stats["manifest"]).read_text())
    assert manifest["method"] == "cuda" and "params" not in stats  # the parameters once, in the manifest
    rand = read_published(tmp_path / "run" / "variants" / "random" / "published")
    assert rand.manifest["method"] == "random" and rand.manifest["rho_levels"] == 8
    assert {r["rho"] for r in records if r["variant"] == "CUDA"} == {None}
    report = write_report(tmp_path / "run")
    assert "| CUDA | normal |" in (report / "table.md").read_text() and (report / "samples.png").exists()


def test_init_noise_sweep_is_plotted(tmp_path):
    run = _fake_run(tmp_path)
    for i, sigma in enumerate((0.0, 0.1, 1.0)):
        r = _record("UGE", "uge", "hacker", "lenet", "normal", 90 - 30 * sigma, init=f"theta0:seed0+noise{sigma}:seed1")
        r["init_noise"] = sigma
        (run / "records" / "uge" / f"noise{i}.json").write_text(json.dumps(r))
    out = write_report(run)
    assert (out / "init_noise.png").read_bytes()[:4] == b"\x89PNG"
    assert "init_noise.png" in (out / "report.md").read_text()


def test_recipe_sweep_retrains_the_authorized_network_from_theta0(tmp_path):
    sweep = {"same": {"epochs": 5}, "batch 8": {"batch_size": 8}, "no augmentation": {"crop": False}}
    cfg = parse_config(tiny(variant=TINY["variant"][:2], protect={**TINY["protect"], "authorized": ["cnn:0"]},
                            recipe={"epochs": 5, "batch_size": 16, "lr": 0.05, "flip": False},  # cnn learns here
                            evaluate={"hackers": ["lenet:normal:1"], "authorized_recipes": sweep}))
    records = run_benchmark(cfg, tmp_path / "run", progress=False)
    assert len(records) == 2 * (2 + 3)  # per variant: authorized + hacker, then the authorized network per recipe
    swept = [r for r in records if r.get("recipe_label")]
    assert all(r["role"] == "authorized" for r in swept) and len(swept) == 6
    by = {(r["variant"], r.get("recipe_label")): r for r in records if r["role"] == "authorized"}
    for v in ("Original", "UGE"):  # the same recipe from the same θ0 repeats the published-recipe network
        assert by[(v, "same")]["test_acc"] == by[(v, None)]["test_acc"]
        assert by[(v, "same")]["train_acc"] == by[(v, None)]["train_acc"]
        assert by[(v, None)]["train_acc"] > 30  # it learns, so an equal accuracy is not two chance levels
        assert by[(v, "batch 8")]["recipe"]["batch_size"] == 8 and by[(v, None)]["recipe"]["batch_size"] == 16
        assert by[(v, "batch 8")]["train_acc"] != by[(v, None)]["train_acc"]
    assert (tmp_path / "run" / "records" / "uge" / "uge_authorized0_cnn__recipe-batch-8.json").exists()
    out = write_report(tmp_path / "run")
    report = (out / "report.md").read_text()
    assert "Recipe sweep" in report and "| batch 8 | batch_size = 8 |" in report and (out / "recipe.png").exists()
    change = by[("UGE", "no augmentation")]["test_acc"] - by[("Original", "no augmentation")]["test_acc"]
    assert f"| no augmentation | crop = False | {by[('Original', 'no augmentation')]['test_acc']:.2f} | " \
           f"{by[('UGE', 'no augmentation')]['test_acc']:.2f} ({change:+.2f}) |" in report
    table = (out / "table.md").read_text()  # the main table holds the published recipe only
    assert table.count("| Original | normal |") == 1
    rerun = run_benchmark(cfg, tmp_path / "run", progress=False)  # resumes: every record is reused
    assert [r["test_acc"] for r in rerun] == [r["test_acc"] for r in records]


def test_robustness_matrix_keeps_the_configs_countermeasure_order():
    from uge.benchmark.report import build_rows, robustness_matrix

    recs = []
    for cm, acc in (("", 90.0), ("jpeg:quality=10", 80.0), ("adv:eps=4.0", 70.0)):
        for variant, protector, drop in (("Original", "clean", 0), ("UGE", "uge", 5)):
            r = _record(variant, protector, "authorized", "lenet", "normal", acc - drop)
            recs.append({**r, "countermeasures": cm or None})
    recs.sort(key=lambda r: (r["variant"], r["countermeasures"] or ""))  # as read from disk: by file name
    _, rows = build_rows(recs, ["", "jpeg:quality=10", "adv:eps=4.0"])
    assert "| data | none | jpeg:quality=10 | adv:eps=4.0 |" in robustness_matrix(_, rows)
    assert "| UGE | 85.00 (-5.00) | 75.00 (-5.00) | 65.00 (-5.00) |" in robustness_matrix(_, rows)
    _, rows = build_rows(recs)  # without an order: as first seen
    assert "| data | none | adv:eps=4.0 | jpeg:quality=10 |" in robustness_matrix(_, rows)


def test_baselines_with_another_budget_draw_no_rho_curve(tmp_path):
    run = tmp_path / "run"
    recs = [_record("Original", "clean", "authorized", "lenet", "normal", 90.0),
            _record("UGE", "uge", "authorized", "lenet", "normal", 85.0, rho=4 / 255),
            _record("EM", "em", "authorized", "lenet", "normal", 80.0, rho=8 / 255)]
    for r in recs:
        (run / "records" / r["data"]).mkdir(parents=True)
        (run / "records" / r["data"] / "a.json").write_text(json.dumps(r))
    out = write_report(run)
    assert (out / "accuracy.png").exists() and not (out / "rho.png").exists()


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reuse_records_copies_only_the_same_cells_and_the_runner_skips_them(tmp_path, monkeypatch):
    """scripts/reuse_records.py: a source run with the same data, recipe and seed gives its records of the same
    variant and countermeasure; one with another recipe gives nothing; the new run trains only the rest."""
    reuse = _script("reuse_records")
    variants = [{"name": "Original", "protector": "clean"}, {"name": "Random", "protector": "random"}]
    ev = {"hackers": ["lenet:normal:1"], "countermeasures": ["none"], "countermeasures_authorized": False}
    run_benchmark(parse_config(tiny(variant=variants, evaluate=ev)), tmp_path / "a", progress=False)
    other = tiny(variant=variants, evaluate=ev, recipe={**TINY["recipe"], "lr": 0.01})
    run_benchmark(parse_config(other), tmp_path / "b", progress=False)
    grown = tiny(variant=[*variants, {"name": "Patch", "protector": "patch"}],
                 evaluate={**ev, "countermeasures": ["none", "grayscale"]})
    copied = reuse.reuse(parse_config(grown), tmp_path / "new", [tmp_path / "a", tmp_path / "b"])
    assert {r["source"] for r in copied} == {str(tmp_path / "a")}
    assert sorted(r["record"] for r in copied) == [
        "original/original_authorized0_lenet.json", "original/original_hacker_lenet_normal_s1.json",
        "random/random_authorized0_lenet.json", "random/random_hacker_lenet_normal_s1.json"]
    trained = []
    real = evaluate_mod.train
    monkeypatch.setattr(evaluate_mod, "train", lambda *a, **k: (trained.append(1), real(*a, **k))[1])
    run_benchmark(parse_config(grown), tmp_path / "new", progress=False)
    assert len(trained) == 2 + 2 + 1  # grayscale for the two old variants; the new one's authorized + 2 hackers
    assert reuse.check(tmp_path / "new") == 0  # the random noise protected again: the same perturbation



def test_reuse_records_copies_a_pretrained_hackers_records_by_the_runners_name(tmp_path):
    """A hacker from a weights file (``ARCH:normal:@FILE``) is named after the file, not a seed: its records are
    cells of a new run with the same hacker too (they were skipped once, and trained again)."""
    from uge.models import create_model
    from uge.weights import save_weights
    reuse = _script("reuse_records")
    weights = tmp_path / "pre.safetensors"
    save_weights(weights, create_model("lenet", 10, 1, seed=4).state_dict())
    ev = {"hackers": [f"lenet:normal:@{weights}"], "countermeasures": ["none", "probe"],
          "countermeasures_authorized": False}
    cfg = tiny(variant=[{"name": "Original", "protector": "clean"}], evaluate=ev,
               protect={**TINY["protect"], "authorized": []})
    run_benchmark(parse_config(cfg), tmp_path / "a", progress=False)
    copied = reuse.reuse(parse_config(cfg), tmp_path / "new", [tmp_path / "a"])
    assert sorted(r["record"] for r in copied) == ["original/original_hacker_lenet_normal_at-pre.json",
                                                   "original/original_hacker_lenet_normal_at-pre__probe.json"]


def test_reuse_records_compares_each_protectors_own_parameters(tmp_path):
    """A [protect] key the protector does not have (UGE's generator settings, the authorized networks) does not make
    another experiment of a random-noise variant; the variant's own parameter does; and where the new config trains
    no authorized network (key holders unseal), no authorized record is copied."""
    reuse = _script("reuse_records")
    variants = [{"name": "Original", "protector": "clean"}, {"name": "Random", "protector": "random"}]
    ev = {"hackers": ["lenet:normal:1"], "countermeasures": ["none"], "countermeasures_authorized": False}
    run_benchmark(parse_config(tiny(variant=variants, evaluate=ev)), tmp_path / "a", progress=False)
    unsealed = tiny(variant=variants, evaluate=ev, protect={**TINY["protect"], "authorized": [], "generator_epochs": 2})
    copied = reuse.reuse(parse_config(unsealed), tmp_path / "new", [tmp_path / "a"])
    assert sorted(r["record"] for r in copied) == ["original/original_hacker_lenet_normal_s1.json",
                                                   "random/random_hacker_lenet_normal_s1.json"]
    louder = tiny(variant=[variants[0], {**variants[1], "rho": 0.1}], evaluate=ev)
    copied = reuse.reuse(parse_config(louder), tmp_path / "other", [tmp_path / "a"])
    assert sorted(r["record"] for r in copied) == ["original/original_authorized0_lenet.json",
                                                   "original/original_hacker_lenet_normal_s1.json"]


def test_source_at_target_trains_the_same_source_and_measures_the_attack(tmp_path):
    """scripts/source_at_target.py: the source trained again is the benchmark's (its share on the published images
    is protect.json's ``source_at_target``), and TAP sends more published images than clean ones to the target."""
    measure = _script("source_at_target").measure
    tap = {"name": "TAP", "protector": "tap", "arch": "cnn", "epochs": 30, "steps": 10, "batch_size": 32, "lr": 0.05,
           "rho": 0.1, "augment": False}
    ev = {"hackers": ["lenet:normal:1"], "countermeasures": ["none"], "countermeasures_authorized": False}
    cfg = parse_config(tiny(variant=[tap], evaluate=ev, protect={**TINY["protect"], "authorized": []}))
    run_benchmark(cfg, tmp_path / "run", progress=False)
    out = measure(cfg, tmp_path / "run", "TAP")
    logged = json.loads((tmp_path / "run" / "variants" / "tap" / "protect.json").read_text())
    assert out["source_published_full_at_target"] == logged["parts"][0]["history"][0]["source_at_target"]
    assert out["source_published_full_at_target"] > out["source_clean_full_at_target"] + 10
    with pytest.raises(SystemExit, match="no TAP variant"):
        measure(cfg, tmp_path / "run", "Original")
