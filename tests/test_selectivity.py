"""The selectivity bench (issue 10) and the wiring of the objective that the loss unit tests cannot see.

Each wiring test is written to fail when the wiring breaks: the checkpoints, BatchNorm modes and indices the
objective claims to use; L_ud's teacher; Eq. 12's average over authorized networks; the distillation
teacher of the evaluation; the perturbation's dependence on the image; the runner's θ0.
"""
from __future__ import annotations

import copy
import importlib
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_benchmark import TINY, tiny

import uge.evaluate as evaluate_mod
from uge.benchmark import parse_config, run_benchmark, write_report
from uge.benchmark.report import noise_of_one_number, selectivity_rows
from uge.config import AuthorizedSpec
from uge.errors import ConfigError
from uge.models import create_model
from uge.protectors.uge import Generator, _objective, _Workdir, protect
from uge.published import read_published
from uge.training import Recipe, train
from uge.weights import load_weights

protect_mod = importlib.import_module("uge.protectors.uge")
# the modules whose names the tests below patch (where the code that calls them looks them up)
objective_mod = importlib.import_module("uge.protectors.uge.objective")
delta_mod = importlib.import_module("uge.protectors.uge.delta")
loop_mod = importlib.import_module("uge.protectors.uge.loop")
workdir_mod = importlib.import_module("uge.protectors.uge.workdir")


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _build(data, tmp_path, **overrides):
    cfg = tiny_config(**overrides)
    work = _Workdir(tmp_path / "work", cfg.to_dict())
    objective, theta0 = _objective(cfg, data, torch.device("cpu"), work, False, {})
    return cfg, objective, theta0, work


# ------------------------------------------------------------------ the objective's wiring

def test_gm_uses_the_trajectory_checkpoints_theta0_to_theta_T_minus_1(digits_small, tmp_path):
    cfg, objective, theta0, work = _build(digits_small, tmp_path, losses=("gm",), gm_trajectories=2)
    traj = [load_weights(work.file(f)) for f in ("trajectory_0.safetensors", "trajectory_0_1.safetensors")]
    states = [[{k.partition("/")[2]: v for k, v in t.items() if k.startswith(f"{i}/")} for i in range(3)]
              for t in traj]
    used = [m.state_dict() for m in objective.gm_models[0]]
    # θ0, θ1 of the first data order, θ1 of the second (θ0 is shared, θT is not matched)
    expected = [states[0][0], states[0][1], states[1][1]]
    assert len(used) == len(expected) and all(_states_equal(u, e) for u, e in zip(used, expected))
    assert _states_equal(states[0][0], states[1][0]) and not _states_equal(states[0][1], states[1][1])
    assert _states_equal(theta0[0], states[0][0])


@pytest.mark.parametrize("mode", ["train", "frozen"])
def test_gm_runs_the_checkpoint_in_the_batchnorm_mode_it_claims(digits_small, tmp_path, mode):
    cfg, objective, _, _ = _build(digits_small, tmp_path, losses=("gm",), gm_batchnorm=mode)
    model, params = objective.gm_models[0][1], objective.gm_params[0][1]
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen, inputs = [], []
    h1 = model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    h2 = bn.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0].detach()))
    objective.gm_distance(model, params, x, x + 0.01, y)
    h1.remove()
    h2.remove()
    assert seen and all(t == (mode == "train") for t in seen[-2:])  # the clean and the protected pass
    if mode == "frozen":  # the running statistics are the clean batch's own (its first pass)
        assert torch.allclose(bn.running_mean, inputs[0].mean((0, 2, 3)), atol=1e-5)


def test_eq12_averages_gm_and_ud_over_every_authorized_network(digits_small, tmp_path, monkeypatch):
    two = [AuthorizedSpec("cnn", 0), AuthorizedSpec("lenet", 3)]
    cfg, objective, _, _ = _build(digits_small, tmp_path, authorized=two, losses=("gm", "ud"))
    assert len(objective.gm_models) == 2 and len(objective.ud_models) == 2
    values = {id(m): float(i) for i, models in enumerate(objective.gm_models) for m in models}
    monkeypatch.setattr(objective, "gm_distance", lambda model, *a, **k: torch.tensor(values[id(model)] * 3 + 1))
    ud_seen = []
    monkeypatch.setattr(objective_mod, "undistill_loss",
                        lambda out, *a: ud_seen.append(out) or out.sum() * 0 + len(ud_seen))
    x = torch.rand(8, 1, 8, 8)
    terms = objective.terms(x, x, torch.arange(8) % 10, np.random.default_rng(0))
    assert terms["gm"].item() == pytest.approx((1 + 4) / 2)  # network 0 gives 1, network 1 gives 4
    assert len(ud_seen) == 2 and terms["ud"].item() == pytest.approx(cfg.ud.weight * (1 + 2) / 2)


def test_ud_teacher_is_theta_T_or_the_network_trained_with_the_whole_recipe(digits_small, tmp_path):
    cfg, objective, _, work = _build(digits_small, tmp_path / "a", losses=("ud",), ud_teacher="trained")
    model = create_model("cnn", 10, 1, seed=0)
    train(model, digits_small, cfg.recipe, device="cpu", seed=cfg.seed, progress=False)
    assert _states_equal(objective.ud_models[0].state_dict(), model.state_dict())
    _, ckpt_obj, _, work_b = _build(digits_small, tmp_path / "b", losses=("ud",), recipe=Recipe(
        epochs=3, batch_size=32, lr=0.05, flip=False))
    flat = load_weights(work_b.file("trajectory_0.safetensors"))
    theta_T = {k.partition("/")[2]: v for k, v in flat.items() if k.startswith("2/")}
    assert _states_equal(ckpt_obj.ud_models[0].state_dict(), theta_T)


def test_fd_targets_the_next_class_when_asked(digits_small, tmp_path):
    _, objective, _, _ = _build(digits_small, tmp_path, losses=("fd",), fd_target="next")
    y = torch.tensor([0, 3, 9])
    assert objective.target(torch.zeros(3, objective.class_feats.shape[1]), y).tolist() == [1, 4, 0]


@pytest.mark.parametrize("parametrization", ["generator", "delta"])
def test_the_perturbation_depends_on_the_image(digits_small, parametrization):
    cfg = tiny_config(parametrization=parametrization, losses=("fd",), rho=0.1,
                      **({"delta_steps": 2} if parametrization == "delta" else {}))
    prot = protect(digits_small, cfg, device="cpu", progress=False).protected
    delta = prot.images.astype(int) - digits_small.images.astype(int)
    same_class = np.flatnonzero(digits_small.labels == 0)[:2]
    assert not np.array_equal(delta[same_class[0]], delta[same_class[1]])
    assert np.abs(delta).max() <= int(255 * 0.1)


def _interrupt(monkeypatch, data, cfg, work, at_call: int) -> None:
    """Run ``protect`` into ``work`` and kill it (KeyboardInterrupt) at the ``at_call``-th loss evaluation."""
    calls = {"n": 0}
    real = protect_mod.UGEObjective.terms

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(protect_mod.UGEObjective, "terms", dying)
    with pytest.raises(KeyboardInterrupt):
        protect(data, cfg, device="cpu", progress=False, work_dir=work)
    monkeypatch.setattr(protect_mod.UGEObjective, "terms", real)


def test_delta_parametrization_resumes_to_the_same_images(digits_small, tmp_path, monkeypatch):
    cfg = tiny_config(parametrization="delta", delta_steps=2, losses=("fd",))
    whole = protect(digits_small, cfg, device="cpu", progress=False).protected.images
    _interrupt(monkeypatch, digits_small, cfg, tmp_path / "w", at_call=5)  # in the third batch: two are saved
    assert torch.load(tmp_path / "w" / "delta.pt", weights_only=True)["done"] == 2
    resumed = protect(digits_small, cfg, device="cpu", progress=False, work_dir=tmp_path / "w").protected.images
    assert np.array_equal(resumed, whole)  # the same bytes as a run never stopped


def test_generator_resumes_to_the_same_bytes(digits_small, tmp_path, monkeypatch):
    """Killed in the second of three generator epochs (dropout and the batch order draw random numbers) and
    rerun: the published images equal an uninterrupted run's, bit for bit."""
    cfg = tiny_config(generator_epochs=3)
    whole = protect(digits_small, cfg, device="cpu", progress=False).protected.images
    steps = len(digits_small) // cfg.batch_size
    _interrupt(monkeypatch, digits_small, cfg, tmp_path / "w", at_call=steps + 3)
    assert torch.load(tmp_path / "w" / "generator.pt", weights_only=True)["done"] == 1
    resumed = protect(digits_small, cfg, device="cpu", progress=False, work_dir=tmp_path / "w").protected.images
    assert np.array_equal(resumed, whole)


def test_gm_rounds_match_at_the_run_on_the_protected_set(digits_small, tmp_path, monkeypatch):
    """Round 2 adds the checkpoints θ1..θT of the authorized network trained on the round-1 protected set."""
    cfg = tiny_config(parametrization="delta", delta_steps=1, gm_rounds=2, gm_batchnorm="frozen")
    seen = []
    real = delta_mod._protected_trajectories

    def spy(objective, cfg_, data_u, *a):
        seen.append((len(objective.gm_models[0]), data_u.images.copy()))
        real(objective, cfg_, data_u, *a)
        seen.append((len(objective.gm_models[0]), None))

    monkeypatch.setattr(delta_mod, "_protected_trajectories", spy)
    out = protect(digits_small, cfg, device="cpu", progress=False, work_dir=tmp_path / "w", keep_work=True)
    (before, x_u), (after, _) = seen
    assert after == before + cfg.trajectory_epochs
    # the round-2 run was trained on protected images (within the budget, not the clean ones)
    assert not np.array_equal(x_u, digits_small.images)
    assert np.abs(x_u.astype(int) - digits_small.images.astype(int)).max() <= int(255 * cfg.rho)
    states = load_weights(tmp_path / "w" / "trajectory_0_round1.safetensors")
    theta0 = load_weights(tmp_path / "w" / "trajectory_0.safetensors")
    assert all(torch.equal(states[k], theta0[k]) for k in states if k.startswith("0/"))  # from the same θ0
    clean_run = workdir_mod._recorded(tmp_path / "clean.safetensors", cfg.authorized[0], cfg, digits_small,
                                      torch.device("cpu"), cfg.seed + 7919 * (cfg.gm.trajectories + 1), False)
    assert not torch.equal(states[next(k for k in states if k.startswith("1/") and "weight" in k)],
                           clean_run[1][next(k[2:] for k in states if k.startswith("1/") and "weight" in k)])
    assert out.history[-1]["round"] == 2


def test_gm_rounds_resume_in_the_second_round(digits_small, tmp_path, monkeypatch):
    cfg = tiny_config(parametrization="delta", delta_steps=1, gm_rounds=2, gm_batchnorm="frozen")
    whole = protect(digits_small, cfg, device="cpu", progress=False).protected.images
    n_batches = -(-len(digits_small) // min(cfg.batch_size, len(digits_small)))
    _interrupt(monkeypatch, digits_small, cfg, tmp_path / "w", at_call=n_batches + 2)  # round 2's second batch
    state = torch.load(tmp_path / "w" / "delta.pt", weights_only=True)
    assert (state["round"], state["done"]) == (1, 1)
    resumed = protect(digits_small, cfg, device="cpu", progress=False, work_dir=tmp_path / "w").protected.images
    assert np.array_equal(resumed, whole)


def test_gm_warmup_leaves_l_gm_out_of_the_first_epochs(digits_small, monkeypatch):
    cfg = tiny_config(generator_epochs=3, gm_warmup_epochs=2)
    calls = []
    real = protect_mod.UGEObjective.gm_distance

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(protect_mod.UGEObjective, "gm_distance", spy)
    history = protect(digits_small, cfg, device="cpu", progress=False).history
    assert ["gm" in h for h in history] == [False, False, True]
    assert calls  # L_gm is on in the last epoch


def test_a_centered_generator_has_no_batch_mean_perturbation():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16) * 0.5 + 0.25  # away from [0, 1]'s edges: no clamp bias
    plain, centered = Generator(3, 0.04, width=4), Generator(3, 0.04, width=4, center=True)
    centered.load_state_dict(plain.state_dict())
    with torch.no_grad():
        mean_plain = (plain(x) - x).mean(0).abs().mean().item()
        mean_centered = (centered(x) - x).mean(0).abs().mean().item()
    assert mean_plain > 0.005  # a random generator's residual is far from zero-mean
    assert mean_centered < 0.1 * mean_plain
    assert (centered(x) - x).abs().max() <= 0.04 + 1e-6


@pytest.mark.parametrize("bad, message", [
    ({"gm_warmup_epochs": 2}, "gm_warmup_epochs"),
    ({"gm_granularity": "pixel"}, "gm_granularity"), ({"gm_granularity": "sample"}, "needs gm_batchnorm"),
    ({"ud_teacher": "final"}, "ud_teacher"), ({"gm_trajectories": 0}, "gm_trajectories"),
    ({"parametrization": "net"}, "parametrization"), ({"delta_steps": 0}, "delta_steps"),
    ({"gm_rounds": 2}, "gm_rounds > 1 needs"), ({"gm_rounds": 0, "parametrization": "delta"}, "gm_rounds")])
def test_bad_objective_options_are_one_line_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**bad)


# ------------------------------------------------------------------ the evaluation's wiring

def test_distilled_hacker_learns_from_the_authorized_network_trained_on_the_set(digits_small, digits_splits,
                                                                                tmp_path, monkeypatch):
    teachers = []
    real = evaluate_mod.TASKS["distill"]
    monkeypatch.setitem(evaluate_mod.TASKS, "distill", lambda t, r: teachers.append(copy.deepcopy(t)) or real(t, r))
    authorized = [("cnn", create_model("cnn", 10, 1, seed=0))]
    recs = evaluate_set_(digits_small, digits_splits[1].per_class(3), authorized, tmp_path, authorized_seeds=[5])
    assert len(teachers) == 1
    saved = load_weights(tmp_path / "prot_authorized0_cnn.safetensors")  # seed 0's network, not the fresh one
    assert _states_equal(teachers[0].state_dict(), saved)
    assert not _states_equal(saved, create_model("cnn", 10, 1, seed=0).state_dict())  # it was trained
    fresh = [r for r in recs if r.get("fresh")]
    assert len(fresh) == 1 and fresh[0]["train_seed"] == 5 and (tmp_path / "prot_authorized0_cnn__seed5.json").exists()
    assert all(len(r["curve"]) == 2 for r in recs if r["role"] == "authorized")  # one test accuracy per epoch


def test_the_distilled_hackers_targets_are_the_trained_authorized_networks_outputs(digits_small, digits_splits,
                                                                                  tmp_path, monkeypatch):
    """Behaviour, not wiring: every soft target the distilled hacker trains on is what the authorized network,
    trained on the set, outputs for that batch (a task that reset or re-initialised its teacher, or a teacher
    handed over before training, gives other targets)."""
    import uge.training as training_mod

    seen, real_loss, real_kd = [], training_mod.DistillTask.loss, training_mod.kd_loss

    def loss(self, model, x, y):
        seen.append([x.detach().clone()])
        return real_loss(self, model, x, y)

    def kd(student, teacher, temperature):
        seen[-1].append(teacher.detach().clone())
        return real_kd(student, teacher, temperature)

    monkeypatch.setattr(training_mod.DistillTask, "loss", loss)
    monkeypatch.setattr(training_mod, "kd_loss", kd)
    evaluate_set_(digits_small, digits_splits[1].per_class(3), [("cnn", create_model("cnn", 10, 1, seed=0))], tmp_path)
    trained = create_model("cnn", 10, 1)
    trained.load_state_dict(load_weights(tmp_path / "prot_authorized0_cnn.safetensors"))
    untrained = create_model("cnn", 10, 1, seed=0).eval()
    trained.eval()
    assert len(seen) >= 2 and all(len(pair) == 2 for pair in seen)
    with torch.no_grad():
        for x, targets in seen:
            assert torch.allclose(targets, trained(x), atol=1e-5)
            assert not torch.allclose(targets, untrained(x), atol=1e-2)


def test_a_record_without_its_weights_is_kept_unless_it_must_teach(digits_small, digits_splits, tmp_path):
    """Weight files are not committed with results: a rerun must not retrain (and overwrite) a finished
    authorized record, except the distillation teacher, whose weights the distilled hacker needs."""
    from uge.evaluate import HackerSpec, evaluate_set

    test = digits_splits[1].per_class(3)
    authorized = [("cnn", create_model("cnn", 10, 1, seed=0))]
    for hackers, retrained in (([HackerSpec("lenet", "normal", 1)], False), ([HackerSpec("lenet", "distill", 1)], True)):
        out = tmp_path / hackers[0].mode
        evaluate_set(digits_small, test, authorized, hackers, Recipe(epochs=1, batch_size=32, flip=False),
                     data_label="p", out_dir=out, device="cpu", progress=False)
        rec = out / "p_authorized0_cnn.json"
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "seconds": -1.0}))  # a marker the retrain overwrites
        rec.with_suffix(".safetensors").unlink()
        (out / f"p_hacker_lenet_{hackers[0].mode}_s1.json").unlink()
        evaluate_set(digits_small, test, authorized, hackers, Recipe(epochs=1, batch_size=32, flip=False),
                     data_label="p", out_dir=out, device="cpu", progress=False)
        assert (json.loads(rec.read_text())["seconds"] != -1.0) == retrained


def evaluate_set_(train_set, test_set, authorized, out, **kw):
    from uge.evaluate import HackerSpec, evaluate_set

    return evaluate_set(train_set, test_set, authorized, [HackerSpec("lenet", "distill", 1)],
                        Recipe(epochs=2, batch_size=32, lr=0.05, flip=False), data_label="prot", out_dir=out,
                        device="cpu", progress=False, **kw)


# ------------------------------------------------------------------ the bench

SEL = {**TINY, "evaluate": {"hackers": ["lenet:normal:1", "lenet:distill:1"], "authorized_seeds": [7]},
       "variant": [{"name": "Clean", "protector": "clean", "repeats": 2},
                   {"name": "Patch", "protector": "patch", "rho": 0.04, "size": 4},
                   {"name": "UGE", "losses": ["gm", "fd"]}]}


@pytest.fixture(scope="module")
def sel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sel") / "run"
    return out, run_benchmark(parse_config(copy.deepcopy(SEL)), out, progress=False)


def test_bench_trains_fresh_seeds_and_repeats(sel_run):
    out, records = sel_run
    clean = [r for r in records if r["variant"] == "Clean"]
    # repeat 0: authorized (replay + fresh seed 7) + 2 hackers; repeat 1: authorized + 2 hackers
    assert len(clean) == 4 + 3 and len(records) == 7 + 4 + 4
    rep1 = [r for r in clean if r.get("repeat") == 1]
    assert {r["train_seed"] for r in rep1} == {1000} and {r["init"] for r in rep1 if r["role"] == "hacker"} == {"seed:2"}
    assert (out / "records" / "clean" / "clean_hacker_lenet_normal_s2__rep1.json").exists()
    fresh = [r for r in records if r.get("fresh")]
    assert {r["variant"] for r in fresh} == {"Clean", "Patch", "UGE"} and {r["train_seed"] for r in fresh} == {7}


def test_runner_theta0_is_the_published_file(sel_run):
    out, _ = sel_run
    pub = read_published(out / "variants" / "uge" / "published")
    published = pub.authorized_network(0).state_dict()
    assert _states_equal(published, create_model("lenet", 10, 1, seed=0).state_dict())
    auth = json.loads((out / "records" / "uge" / "uge_authorized0_lenet.json").read_text())
    assert auth["init"] == "theta0:seed0"


def test_bench_report_has_selectivity_noise_and_diagnostics(sel_run):
    out, records = sel_run
    report = (write_report(out) / "report.md").read_text()
    assert "Selectivity:" in report and "noise of one accuracy σ" in report
    assert "| Patch |" in report and "| UGE |" in report
    prot = json.loads((out / "variants" / "uge" / "protect.json").read_text())
    assert 0 <= prot["perturbation"]["classwise_energy_share"] <= 1
    assert "diag_gm_authorized" in prot["parts"][0]["history"][-1]
    patch = json.loads((out / "variants" / "patch" / "protect.json").read_text())["perturbation"]
    assert patch["classwise_energy_share"] > 0.8  # one pattern per class
    assert (out / "report" / "curves.png").exists() and (out / "report" / "diagnostics.png").exists()


def _rec(variant, role, arch, mode, acc, **kw):
    return {"variant": variant, "protector": "clean" if variant == "Clean" else "x", "role": role, "arch": arch,
            "mode": mode, "init": "theta0" if role == "authorized" else "seed:1", "test_acc": acc, "data": variant, **kw}


def test_selectivity_and_noise_from_hand_written_records():
    recs = [_rec("Clean", "authorized", "r", "normal", 60.0), _rec("Clean", "authorized", "r", "normal", 58.0,
                                                                      fresh=True, train_seed=1),
            _rec("Clean", "hacker", "cnn", "normal", 50.0), _rec("Clean", "hacker", "cnn", "distill", 40.0),
            _rec("Clean", "authorized", "r", "normal", 61.0, repeat=1), _rec("Clean", "hacker", "cnn", "normal", 48.0,
                                                                             repeat=1),
            _rec("Clean", "hacker", "cnn", "distill", 40.0, repeat=1),
            _rec("P", "authorized", "r", "normal", 59.0), _rec("P", "authorized", "r", "normal", 56.0, fresh=True,
                                                               train_seed=1),
            _rec("P", "hacker", "cnn", "normal", 30.0), _rec("P", "hacker", "cnn", "distill", 20.0)]
    sigma, pairs = noise_of_one_number(recs)
    assert pairs == 3 and sigma == pytest.approx(np.sqrt((1 + 4 + 0) / 3 / 2))
    _, rows = selectivity_rows(recs)
    (row,) = rows
    assert row["replay"] == -1 and row["fresh"] == -2 and row["mean_hacker"] == -20
    assert row["selectivity"] == 18 and row["worst_hacker"] == -20


def test_a_sets_own_noise_decides_whether_its_selectivity_is_a_result(tmp_path):
    """A selectivity beyond the clean 2σ but within 2σ of the protected set's own spread is noise."""
    from uge.benchmark.report import selectivity_table, set_noise

    recs = [_rec("Clean", "authorized", "r", "normal", 60.0), _rec("Clean", "authorized", "r", "normal", 60.0,
                                                                      fresh=True),
            _rec("Clean", "hacker", "cnn", "normal", 50.0), _rec("Clean", "authorized", "r", "normal", 60.5, repeat=1),
            _rec("Clean", "hacker", "cnn", "normal", 50.5, repeat=1),
            _rec("P", "authorized", "r", "normal", 40.0), _rec("P", "authorized", "r", "normal", 40.0, fresh=True),
            _rec("P", "hacker", "cnn", "normal", 25.0)]  # selectivity +5: beyond the clean 2σ (0.5)
    row = next(line for line in selectivity_table(recs).splitlines() if line.startswith("| P |"))
    assert "+5.00 |" in row and "(noise)" not in row
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "p.json").write_text(json.dumps({"variant": "p", "stdev": 12.1}))
    own = set_noise(tmp_path, [{"name": "Clean"}, {"name": "P"}])
    assert own == {"P": 12.1}
    row = next(line for line in selectivity_table(recs, own_noise=own).splitlines() if line.startswith("| P |"))
    assert "+5.00 (noise) [this set's σ 12.1]" in row


def test_bench_config_validates_repeats_and_authorized_seeds():
    with pytest.raises(ConfigError, match="repeats"):
        parse_config(tiny(variant=[{"name": "C", "protector": "clean", "repeats": 0}]))
    with pytest.raises(ConfigError, match="authorized_seeds"):
        parse_config(tiny(evaluate={"hackers": [], "authorized_seeds": [0]}))  # the replay seed itself


def test_a_run_may_grow_by_new_variants_and_countermeasures_but_not_change_old_ones(sel_run, tmp_path):
    out, _ = sel_run
    grown = copy.deepcopy(SEL)
    grown["variant"].append({"name": "Random", "protector": "random", "rho": 0.04})
    run_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(out, run_dir)
    records = run_benchmark(parse_config(grown), run_dir, progress=False)
    assert {r["variant"] for r in records} == {"Clean", "Patch", "UGE", "Random"}
    changed = copy.deepcopy(grown)
    changed["variant"][1]["size"] = 2
    with pytest.raises(ConfigError, match="another experiment"):
        run_benchmark(parse_config(changed), run_dir, progress=False)
    more = copy.deepcopy(grown)  # a new countermeasure column: every variant gets it, the old records stay
    more["evaluate"]["countermeasures"] = ["none", "copy-input"]
    before = {f.name for f in (run_dir / "records").glob("*/*.json")}
    records = run_benchmark(parse_config(more), run_dir, progress=False)
    assert {f.name for f in (run_dir / "records").glob("*/*.json")} >= before
    assert {r["variant"] for r in records if r.get("countermeasures") == "copy-input"} == {"Clean", "Patch", "UGE",
                                                                                          "Random"}
    other = copy.deepcopy(more)
    other["evaluate"]["countermeasures"] = ["none", "grayscale"]
    with pytest.raises(ConfigError, match="evaluate"):
        run_benchmark(parse_config(other), run_dir, progress=False)


def test_cli_takes_the_objective_options_and_rejects_bad_combinations(tmp_path, capsys):
    from uge.cli import main

    rc = main(["protect", "--method", "uge", "--data", "digits", "--per-class", "3", "--out", str(tmp_path / "x"),
               "--gm-granularity", "sample"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "needs gm_batchnorm 'frozen'" in err[0]
    rc = main(["protect", "--method", "uge", "--data", "digits", "--per-class", "3", "--out", str(tmp_path / "y"),
               "--quiet",
               "--authorized", "lenet:0", "--epochs", "1", "--batch-size", "10", "--trajectory-epochs", "1",
               "--encoder-arch", "lenet", "--encoder-epochs", "1", "--generator-width", "4", "--losses", "gm,fd",
               "--parametrization", "delta", "--delta-steps", "2", "--gm-granularity", "sample",
               "--gm-batchnorm", "frozen", "--fd-target", "next", "--format", "npz"])
    assert rc == 0
    manifest = json.loads((tmp_path / "y" / "manifest.json").read_text())
    cfg = manifest["params"]
    assert (cfg["parametrization"], cfg["delta_steps"], cfg["gm_granularity"], cfg["fd_target"]) == \
        ("delta", 2, "sample", "next")


class _Counting(loop_mod.Parametrization):
    """A toy parametrization for the shared loop: 2 rounds of 3 units; each unit adds a draw of its seeds."""

    name, stream, unit, rounds = "toy", "delta_batch", "batch", 2

    def __init__(self, die_at=None):
        self.value, self.ran, self.begun, self.die_at = torch.zeros(()), [], [], die_at

    def units(self):
        return 3

    def seed_index(self, r, u):
        return (u, r)

    def begin_round(self, r):
        self.begun.append(r)

    def step(self, r, u, rng):
        if (r, u) == self.die_at:
            raise KeyboardInterrupt
        self.ran.append((r, u))
        self.value += float(rng.random()) + float(torch.rand(()))

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_the_shared_loop_resumes_after_the_last_saved_unit_with_the_same_draws(tmp_path):
    whole = _Counting()
    loop_mod.optimize(whole, tmp_path / "a.pt", 5, "cpu", progress=False)
    assert whole.ran == [(r, u) for r in range(2) for u in range(3)]
    first = _Counting(die_at=(1, 1))  # killed in round 2's second unit: round 1 and one unit of round 2 are saved
    with pytest.raises(KeyboardInterrupt):
        loop_mod.optimize(first, tmp_path / "b.pt", 5, "cpu", progress=False)
    assert {k: v for k, v in torch.load(tmp_path / "b.pt", weights_only=True).items() if k != "value"} == {
        "round": 1, "done": 1}
    torch.manual_seed(123)  # whatever the process drew before, each unit draws from its own seeds
    again = _Counting()
    loop_mod.optimize(again, tmp_path / "b.pt", 5, "cpu", progress=False)
    assert again.ran == [(1, 1), (1, 2)] and again.begun == [0, 1]  # every round begun, only the rest run
    assert torch.equal(again.value, whole.value)
