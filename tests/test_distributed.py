"""Training on several processes (DDP, gloo on CPU, 2 ranks): the same parameters as one process on the same
global batch, a killed run that resumes, and ``uge train`` / ``uge evaluate`` under torchrun writing once.

The ranks of the in-process tests are forked from the test process (torch already imported: seconds, not the
tens of seconds of a fresh interpreter per rank on a busy 2-core machine); the command-line tests run torchrun.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from uge import distributed
from uge.cli import main
from uge.errors import ConfigError
from uge.models import create_model
from uge.training import Recipe, record_trajectory, train
from uge.weights import load_weights, save_weights

RECIPE = Recipe(epochs=3, batch_size=20, lr=0.05)  # 100 digits: 5 global batches of 20, 10 per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, fn, args) -> None:
    """One forked rank: torchrun's environment, the process group, ``fn(*args)``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.session("cpu"):
        fn(*args)


def _launch(fn, *args, size: int = 2) -> int:
    """Run ``fn(*args)`` on ``size`` forked ranks; the exit code of the first that failed (0: none)."""
    ctx = mp.start_processes(_rank, args=(size, _free_port(), fn, args), nprocs=size, join=False,
                             start_method="fork")
    for p in ctx.processes:
        p.join(120)
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    return next((c for c in codes if c), 0)


def _train_digits(data, out: Path, arch: str, checkpoint: Path | None = None, kill_after: int | None = None,
                  trajectory: bool = False) -> None:
    """Train ``arch`` from seed 0 on ``data``; each rank writes its parameters (and the epochs it trained).
    With ``kill_after``, rank 1 dies (no clean-up, like a killed process) after that epoch."""
    rank = distributed.world().rank
    assert distributed.world().size == 2
    epochs = []

    def on_epoch(epoch, model):
        epochs.append(epoch)
        if kill_after is not None and rank == 1 and epoch == kill_after:
            os._exit(9)

    model = create_model(arch, data.num_classes, data.channels, seed=0)
    if trajectory:  # record_trajectory runs train(); its states are every rank's θ0..θT
        states = record_trajectory(model, data, RECIPE, 2, device="cpu", seed=1, progress=False)
        save_weights(out / f"trajectory{rank}.safetensors", {f"{t}/{k}": v for t, s in enumerate(states)
                                                              for k, v in s.items()})
    else:
        train(model, data, RECIPE, device="cpu", seed=1, progress=False, checkpoint=checkpoint, on_epoch=on_epoch)
    save_weights(out / f"rank{rank}.safetensors", model.state_dict())
    (out / f"epochs{rank}.json").write_text(json.dumps(epochs))


def _close(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def _one_process(data, arch: str) -> dict:
    model = create_model(arch, data.num_classes, data.channels, seed=0)
    return train(model, data, RECIPE, device="cpu", seed=1, progress=False).state_dict()


# ------------------------------------------------------------------------------------ the training loop


def test_ddp_matches_one_process_on_the_same_global_batches(tmp_path, digits_small):
    """LeNet (no BatchNorm), crop and flip on: two ranks of 10 samples give one process's 20-sample steps."""
    assert _launch(_train_digits, digits_small, tmp_path, "lenet") == 0
    ranks = [load_weights(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # one network on every rank
    single = _one_process(digits_small, "lenet")
    assert _close(ranks[0], single)
    assert not _close(ranks[0], create_model("lenet", 10, 1, seed=0).state_dict())  # it did train


def test_ddp_with_batchnorm_keeps_one_network_on_every_rank(tmp_path, digits_small):
    """cnn's BatchNorm normalizes each rank's half: close to one process, not equal; every rank holds the same."""
    assert _launch(_train_digits, digits_small, tmp_path, "cnn") == 0
    ranks = [load_weights(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_ddp_trajectory_matches_one_process(tmp_path, digits_small):
    assert _launch(_train_digits, digits_small, tmp_path, "lenet", None, None, True) == 0
    ddp = load_weights(tmp_path / "trajectory0.safetensors")
    states = record_trajectory(create_model("lenet", 10, 1, seed=0), digits_small, RECIPE, 2, device="cpu", seed=1,
                               progress=False)
    assert _close(ddp, {f"{t}/{k}": v for t, s in enumerate(states) for k, v in s.items()})


def test_killed_ddp_run_resumes_on_every_rank(tmp_path, digits_small):
    """Rank 1 dies after epoch 2 (rank 0 is torn down with it); the rerun resumes from rank 0's checkpoint on
    both ranks and ends where an uninterrupted run ends."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    assert _launch(_train_digits, digits_small, whole, "cnn", whole / "ckpt.safetensors") == 0
    ckpt = killed / "ckpt.safetensors"
    assert _launch(_train_digits, digits_small, killed, "cnn", ckpt, 2) != 0
    assert ckpt.is_file() and not (killed / "rank0.safetensors").exists()
    assert _launch(_train_digits, digits_small, killed, "cnn", ckpt) == 0
    resumed = [json.loads((killed / f"epochs{r}.json").read_text()) for r in (0, 1)]
    assert resumed[0] == resumed[1] and resumed[0][0] > 1 and resumed[0][-1] == RECIPE.epochs
    assert _close(load_weights(killed / "rank1.safetensors"), load_weights(whole / "rank0.safetensors"), 1e-6)


def test_one_process_checkpoint_resume_and_refusal(tmp_path, digits_small):
    """One process: stopped after epoch 1, the rerun ends bit for bit as an uninterrupted run; another run's
    checkpoint is refused."""
    ckpt = tmp_path / "ckpt.safetensors"
    model = create_model("cnn", 10, 1, seed=0)
    train(model, digits_small, RECIPE, device="cpu", seed=1, progress=False, checkpoint=ckpt, stop_after=1)
    model = create_model("cnn", 10, 1, seed=5)  # the checkpoint's parameters replace these
    trained = []
    train(model, digits_small, RECIPE, device="cpu", seed=1, progress=False, checkpoint=ckpt,
          on_epoch=lambda e, m: trained.append(e))
    assert trained == [2, 3]
    single = _one_process(digits_small, "cnn")
    assert all(torch.equal(model.state_dict()[k], single[k]) for k in single)
    with pytest.raises(ConfigError, match="another run"):
        train(create_model("cnn", 10, 1), digits_small, RECIPE, device="cpu", seed=2, progress=False, checkpoint=ckpt)


def _odd_batch(data, out: Path) -> None:
    with pytest.raises(ConfigError) as e:
        train(create_model("lenet", 10, 1), data, Recipe(epochs=1, batch_size=15), device="cpu", progress=False)
    (out / f"refused{distributed.world().rank}").write_text(str(e.value))


def test_a_batch_that_does_not_split_into_equal_parts_is_refused(tmp_path, digits_small):
    assert _launch(_odd_batch, digits_small, tmp_path) == 0  # on both ranks, before any training
    assert "15 samples does not split into 2 equal parts" in (tmp_path / "refused1").read_text()


# ------------------------------------------------------------------------------------ the commands


def _command(argv: list[str], out: Path, code: int = 0) -> None:
    """``uge ARGV`` on this rank, its stdout and stderr in ``out/stdout<rank>``, ``out/stderr<rank>``."""
    rank = distributed.world().rank
    with open(out / f"stdout{rank}", "w") as f, open(out / f"stderr{rank}", "w") as e, \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(e):
        assert main(argv) == code


TRAIN = ["train", "--data", "digits", "--per-class", "10", "--test-per-class", "5", "--arch", "lenet", "--epochs", "2",
         "--batch-size", "20", "--quiet", "--device", "cpu"]


def test_uge_train_on_two_ranks_prints_and_writes_once(tmp_path):
    argv = [*TRAIN, "--save", str(tmp_path / "ddp.safetensors"), "--record", str(tmp_path / "ddp.json")]
    assert _launch(_command, argv, tmp_path) == 0
    stdout = [(tmp_path / f"stdout{r}").read_text() for r in (0, 1)]
    assert stdout[0].count("test accuracy") == 1 and stdout[0].count("weights saved") == 1 and stdout[1] == ""
    assert json.loads((tmp_path / "ddp.json").read_text())["processes"] == 2
    assert {f.name for f in tmp_path.iterdir()} == {"ddp.safetensors", "ddp.json", "stdout0", "stdout1", "stderr0",
                                                    "stderr1"}


def test_commands_that_run_in_one_process_are_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["verify", "somewhere"]) == 2
    assert "uge verify runs in one process" in capsys.readouterr().err


def test_sync_bn_is_refused_on_cpu(tmp_path):
    assert _launch(_command, [*TRAIN, "--sync-bn"], tmp_path, 2) == 0
    assert "synchronized BatchNorm (--sync-bn) runs on GPUs only" in (tmp_path / "stderr0").read_text()


@pytest.fixture(scope="module")
def random_set(tmp_path_factory, digits_small):
    """digits_small under the random-noise baseline, published (no authorized network: hackers only)."""
    from uge.protectors import build_protector
    from uge.published import publish, source_record

    out = tmp_path_factory.mktemp("ddp") / "pub"
    result = build_protector("random").protect(digits_small, seed=0)
    return publish(result, digits_small, out, source=source_record("digits", "train", 10, 0))


def test_uge_evaluate_on_two_ranks_writes_every_record_once_and_resumes(tmp_path, random_set):
    argv = ["evaluate", str(random_set), "--hackers", "lenet:normal,cnn:normal", "--epochs", "1", "--batch-size", "20",
            "--quiet", "--device", "cpu", "--out", str(tmp_path / "recs")]
    assert _launch(_command, argv, tmp_path) == 0
    stdout = [(tmp_path / f"stdout{r}").read_text() for r in (0, 1)]
    assert stdout[0].count("| lenet | normal |") == 1 and stdout[1] == ""
    records = sorted(f.name for f in (tmp_path / "recs").iterdir())
    assert records == ["protected_hacker_cnn_normal_s1.json", "protected_hacker_lenet_normal_s1.json", "table.md"]
    one = tmp_path / "one"
    assert main([*argv[:-1], str(one)]) == 0
    lenet = [json.loads((d / "protected_hacker_lenet_normal_s1.json").read_text()) for d in (tmp_path / "recs", one)]
    assert abs(lenet[0]["test_acc"] - lenet[1]["test_acc"]) < 0.6  # the same network up to float rounding
    (tmp_path / "recs" / "protected_hacker_cnn_normal_s1.json").unlink()  # as if killed before the cnn finished
    mtime = (tmp_path / "recs" / "protected_hacker_lenet_normal_s1.json").stat().st_mtime_ns
    assert _launch(_command, argv, tmp_path) == 0
    assert (tmp_path / "recs" / "protected_hacker_cnn_normal_s1.json").is_file()
    assert (tmp_path / "recs" / "protected_hacker_lenet_normal_s1.json").stat().st_mtime_ns == mtime


def _torchrun(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "uge.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_uge_train_under_torchrun_writes_once_and_matches_one_process(tmp_path):
    """The real launcher: torchrun, two fresh interpreters (about a minute on a busy 2-core machine)."""
    args = TRAIN
    run = _torchrun(*args, "--save", "ddp.safetensors", "--record", "ddp.json", "--checkpoint", "ckpt.safetensors",
                    cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("test accuracy") == 1 and run.stdout.count("weights saved") == 1
    assert json.loads((tmp_path / "ddp.json").read_text())["processes"] == 2
    assert main([*args, "--save", str(tmp_path / "one.safetensors")]) == 0
    assert _close(load_weights(tmp_path / "ddp.safetensors"), load_weights(tmp_path / "one.safetensors"))
    again = _torchrun(*args, "--save", "again.safetensors", "--checkpoint", "ckpt.safetensors", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]  # the finished checkpoint: nothing left to train
    assert all(torch.equal(a, b) for a, b in zip(load_weights(tmp_path / "again.safetensors").values(),
                                                 load_weights(tmp_path / "ddp.safetensors").values()))


# ------------------------------------------------------------------------------------ UGE's protection

UGE = {"authorized": ["lenet:0"], "trajectory_epochs": 1, "generator_epochs": 2, "generator_width": 4,
       "generator_batch_size": 20, "encoder_arch": "lenet",
       "encoder_recipe": {"epochs": 1, "batch_size": 20, "lr": 0.05, "flip": False},
       "recipe": {"epochs": 1, "batch_size": 20, "lr": 0.05, "flip": False}}


def _protect_digits(data, out: Path, kill_after: int | None = None) -> None:
    """UGE (L_gm + L_fd + L_ud) on this rank, the work folder shared; each rank writes its protected images and
    generator history. With ``kill_after``, rank 1 dies (no clean-up) after that generator epoch."""
    from uge.protectors import build_protector
    from uge.protectors.uge import generator

    rank = distributed.world().rank
    if kill_after is not None:
        step = generator._GeneratorTraining.step

        def dying(self, r, epoch, rng):
            shown = step(self, r, epoch, rng)
            if rank == 1 and epoch + 1 == kill_after:
                os._exit(9)
            return shown
        generator._GeneratorTraining.step = dying
    result = build_protector("uge", **UGE).protect(data, device="cpu", work_dir=out / "work", progress=False,
                                                   keep_work=True, seed=0)
    torch.save(torch.from_numpy(result.protected.images), out / f"images{rank}.pt")
    (out / f"history{rank}.json").write_text(json.dumps(result.history))


def test_uge_generator_on_two_ranks_keeps_one_generator_and_resumes(tmp_path, digits_small):
    """Every rank trains the same generator on its half of each batch and publishes the same images; a run
    whose rank 1 dies after the first generator epoch resumes on both ranks from rank 0's checkpoint and ends
    where the uninterrupted run ends."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    assert _launch(_protect_digits, digits_small, whole) == 0
    images = [torch.load(whole / f"images{r}.pt") for r in (0, 1)]
    assert torch.equal(images[0], images[1])
    assert not torch.equal(images[0], torch.from_numpy(digits_small.images))  # it perturbed
    rho = round(UGE.get("rho", 0.04) * 255)
    assert (images[0].int() - torch.from_numpy(digits_small.images).int()).abs().max() <= rho
    history = [json.loads((whole / f"history{r}.json").read_text()) for r in (0, 1)]
    assert history[0] == history[1] and [h["epoch"] for h in history[0]] == [1, 2]
    assert sorted(f.name for f in (whole / "work").iterdir()) == [
        "config.json", "encoder.safetensors", "generator.pt", "trajectory_0.safetensors"]

    assert _launch(_protect_digits, digits_small, killed, 1) != 0
    assert torch.load(killed / "work" / "generator.pt", weights_only=True)["done"] == 1
    assert _launch(_protect_digits, digits_small, killed) == 0
    assert torch.equal(torch.load(killed / "images1.pt"), images[0])


def test_protect_under_torchrun_runs_uge_only(tmp_path):
    argv = ["protect", "--data", "digits", "--per-class", "2", "--out", str(tmp_path / "pub"), "--device", "cpu",
            "--quiet"]
    assert _launch(_command, [*argv, "--method", "random"], tmp_path, 2) == 0
    err = (tmp_path / "stderr0").read_text()
    assert "--method random runs in one process; under torchrun protect runs UGE's generator" in err
    assert not (tmp_path / "pub").exists()
    assert _launch(_command, [*argv, "--method", "uge", "--param", "parametrization=delta"], tmp_path, 2) == 0
    assert "per-sample δ parametrization runs in one process" in (tmp_path / "stderr0").read_text()


def test_uge_protect_on_two_ranks_publishes_once_and_verifies(tmp_path):
    (tmp_path / "uge.json").write_text(json.dumps(UGE))
    argv = ["protect", "--data", "digits", "--per-class", "4", "--method", "uge", "--config", str(tmp_path / "uge.json"),
            "--out", str(tmp_path / "pub"), "--device", "cpu", "--quiet"]
    assert _launch(_command, argv, tmp_path) == 0
    stdout = [(tmp_path / f"stdout{r}").read_text() for r in (0, 1)]
    assert stdout[0].count("published") == 1 and stdout[1] == ""
    assert not (tmp_path / ".pub.work").exists()  # the shared work folder, removed once
    assert main(["verify", str(tmp_path / "pub")]) == 0
