"""A benchmark grid across workers (issue 22 part 3): shards, claims, atomic records, the same report.

A tiny grid (digits, a clean and a random-noise variant, two countermeasure settings, a normal and a distilled
LeNet hacker: 10 networks) run by one worker, by three shards one after the other, and by two processes at once
on one folder. Every network must be trained exactly once, and ``uge report`` must print what one worker's run
prints.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import uge.evaluate as evaluate_mod
from uge.benchmark import parse_config, read_records, run_benchmark, write_report
from uge.cli import main
from uge.errors import ConfigError
from uge.workers import HOST, Worker, abandoned, claim, claim_path, parse_shard

GRID = {
    "name": "grid", "device": "cpu",
    "data": {"source": "digits", "per_class": 6, "test_per_class": 5},
    "recipe": {"epochs": 1, "batch_size": 32, "lr": 0.05, "flip": False},
    "protect": {"authorized": ["lenet:0"]},
    "evaluate": {"hackers": ["lenet:normal:1", "lenet:distill:1"], "countermeasures": ["none", "jpeg:quality=10"],
                 "countermeasures_authorized": False},  # one authorized network (one teacher) for both settings
    "variant": [{"name": "Original", "protector": "clean"}, {"name": "Random", "protector": "random"}],
}
# per variant: the authorized network (one for both settings) and 2 hackers x 2 settings
NETWORKS = 2 * (1 + 2 * 2)
TRAIN = evaluate_mod.train  # the real training loop, counted below
RECORDS = 2 * 2 * 3  # what run_benchmark returns: each setting's grid lists the authorized network's record


def _names(run: Path) -> set[str]:
    return {f"{f.parent.name}/{f.name}" for f in (run / "records").glob("*/*.json")}


def _group(name: str) -> str:
    """The record that heads a record's group: a distilled hacker's teacher, else itself."""
    folder, file = name.split("/")
    return f"{folder}/{folder}_authorized0_lenet.json" if "_distill_" in file else name


def _count_training(monkeypatch, delay: float = 0.0) -> list[str]:
    """Every network trained from now on, by its progress label (optionally slowed down by ``delay`` s)."""
    calls = []

    def counting(*a, desc="", **k):
        calls.append(desc)
        time.sleep(delay)
        return TRAIN(*a, desc=desc, **k)

    monkeypatch.setattr(evaluate_mod, "train", counting)
    return calls


def _report(run: Path, out: Path) -> dict[str, str]:
    """A run's report files (text) by name, with the protection table's wall seconds blanked: the one thing two
    runs of the same grid write differently."""
    rep = write_report(run, out)
    files = {f.name: f.read_text() for f in sorted(rep.iterdir()) if f.suffix in (".md", ".csv", ".tex")}
    lines = files["report.md"].splitlines()
    start = lines.index("Protection runs (wall seconds per stage; losses of the last generator epoch):")
    for i in range(start + 4, len(lines)):  # the protection table's rows: | variant | part | n | s | s | s | s | ...
        if not lines[i].startswith("|"):
            break
        cells = lines[i].split("|")
        cells[4:8] = [" s "] * 4
        lines[i] = "|".join(cells)
    files["report.md"] = "\n".join(lines)
    return files


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The grid run by one worker: the reference."""
    run = tmp_path_factory.mktemp("one") / "run"
    records = run_benchmark(parse_config(GRID), run, progress=False)
    assert len(records) == RECORDS and len(_names(run)) == NETWORKS
    return run


# ---------------------------------------------------------------- shards

def test_shard_text_and_bad_shards():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)
    with pytest.raises(SystemExit) as e:  # on the command line a usage error (exit 2), before any work
        main(["benchmark", "configs/smoke.toml", "--shard", "2/2"])
    assert e.value.code == 2


def test_shards_partition_any_set_of_records():
    names = [Path("records") / v / f"{v}_hacker_{i}.json" for v in ("original", "uge", "em") for i in range(40)]
    for n in (1, 2, 3, 5):
        owners = [[i for i in range(n) if Worker(i, n).owns(p)] for p in names]
        assert all(len(o) == 1 for o in owners)  # each record has exactly one shard
        if n > 1:
            assert len({o[0] for o in owners}) == n  # and no shard is empty on 120 records
    # the same share wherever the run folder is mounted: the key is the record's folder and file name
    assert Worker(1, 3).owns(Path("/a/run/records/uge/x.json")) == Worker(1, 3).owns(Path("/b/records/uge/x.json"))


def test_shards_one_after_another_train_each_network_once(one_worker, tmp_path, monkeypatch):
    """Three shards run in turn (a job array with one slot): every network once, in its own shard, a distilled
    hacker beside its teacher; the grid is finished (finished.json, the report) only after the last shard."""
    run, cfg = tmp_path / "run", parse_config(GRID)
    trained, claimed = _count_training(monkeypatch), []
    for i in range(3):
        worker = Worker(i, 3)
        before = len(trained)
        records = run_benchmark(cfg, run, progress=False, worker=worker)
        assert len(trained) - before == len(worker.claimed)  # it trained what it claimed, nothing else
        assert all(worker.owns(run / "records" / _group(n)) for n in worker.claimed)
        claimed += worker.claimed
        assert worker.complete == (i == 2) and (run / "finished.json").exists() == (i == 2)
    assert sorted(claimed) == sorted(_names(run)) and len(claimed) == NETWORKS and len(records) == RECORDS
    assert _report(run, tmp_path / "rep") == _report(one_worker, tmp_path / "rep1")


# ---------------------------------------------------------------- two workers at once

def _worker_process(run: str, shard: tuple[int, int], result: str) -> None:
    """One worker in its own process: the grid, with every training call counted and slowed down a
    little, so that the two workers overlap for the whole grid."""
    import torch

    torch.set_num_threads(1)
    trained = []

    def counting(*a, **k):
        trained.append(k.get("desc"))
        time.sleep(0.3)
        return TRAIN(*a, **k)

    evaluate_mod.train = counting
    worker = Worker(*shard, poll=0.1)
    run_benchmark(parse_config(GRID), run, progress=False, worker=worker)
    Path(result).write_text(json.dumps({"claimed": worker.claimed, "trained": len(trained),
                                        "complete": worker.complete}))


@pytest.mark.parametrize("shares", [[(0, 1), (0, 1)], [(0, 2), (1, 2)]], ids=["plain", "shards"])
def test_two_workers_at_once_train_every_network_exactly_once(one_worker, tmp_path, shares):
    """Two processes on one folder at the same time (plain workers: claims alone; shards 0/2 and 1/2): every
    record exactly once, no claim left behind, and the report one worker's run gives."""
    run = tmp_path / "run"
    # fork: the workers start at once, with the package already imported (spawn re-imports torch: ~10 s on a
    # busy 2-core machine); safe here, the parent trains with one intra-op thread (conftest)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker_process, args=(str(run), share, str(tmp_path / f"{i}.json")))
             for i, share in enumerate(shares)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    done = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    a, b = (set(d["claimed"]) for d in done)
    assert not a & b and a | b == _names(run) and len(_names(run)) == NETWORKS
    assert done[0]["trained"] + done[1]["trained"] == NETWORKS  # each network trained once in all
    assert any(d["complete"] for d in done)  # the worker that finished last saw the whole grid
    assert not list(run.rglob("*.claim")) and not list(run.rglob("*.tmp"))
    assert _report(run, tmp_path / "rep") == _report(one_worker, tmp_path / "rep1")


# ---------------------------------------------------------------- claims

def _fake_claim(target: Path, host: str, pid: int, age: float = 0.0) -> Path:
    path = claim_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "theirs"}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_claim_is_taken_once_and_kept_fresh(tmp_path):
    target = tmp_path / "records" / "v" / "a.json"
    with claim(target, timeout=0.4) as mine:
        assert claim(target, timeout=0.4) is None  # a second claimant is refused while the first lives
        time.sleep(0.6)  # longer than the timeout: the heartbeat (every timeout/4) keeps it fresh
        assert abandoned(mine.path, 0.4) is None and claim(target, timeout=0.4) is None
    assert not claim_path(target).exists()  # released
    with claim(target) as again:
        assert again is not None


def test_an_abandoned_claim_is_taken_over(tmp_path):
    t = tmp_path / "records" / "v"
    alive = _fake_claim(t / "alive.json", HOST, os.getppid())  # a live process of this host (not this one)
    other = _fake_claim(t / "other.json", "elsewhere", 1, age=10)  # another host's, heartbeat 10 s ago
    dead = _fake_claim(t / "dead.json", HOST, _dead_pid())  # a process of this host that is gone
    old = _fake_claim(t / "old.json", "elsewhere", 1, age=1000)  # another host's, silent for 1000 s
    assert claim(t / "alive.json", timeout=60) is None and claim(t / "other.json", timeout=60) is None
    assert "gone" in abandoned(dead, 60) and "1000 s" in abandoned(old, 600)
    for target in (t / "dead.json", t / "old.json"):
        c = claim(target, timeout=600)
        assert c is not None and json.loads(claim_path(target).read_text())["pid"] == os.getpid()
        c.release()
    assert alive.exists() and other.exists()


def test_a_released_claim_that_was_taken_over_is_left_to_its_new_holder(tmp_path):
    target = tmp_path / "a.json"
    c = claim(target)
    _fake_claim(target, "elsewhere", 1)  # another worker took it over (this one was silent too long)
    c.release()
    assert json.loads(claim_path(target).read_text())["token"] == "theirs"


def test_a_grid_takes_over_the_networks_of_a_dead_worker(one_worker, tmp_path, monkeypatch):
    """A worker that died held two claims: the next worker trains those networks (no waiting for the timeout
    on the same host), and exactly once."""
    run = tmp_path / "run"
    pid = _dead_pid()
    _fake_claim(run / "variants" / "random" / "protect.json", HOST, pid)
    _fake_claim(run / "records" / "random" / "random_hacker_lenet_normal_s1.json", HOST, pid)
    trained = _count_training(monkeypatch)
    worker = Worker()
    run_benchmark(parse_config(GRID), run, progress=False, worker=worker)
    assert len(trained) == NETWORKS and worker.complete and not list(run.rglob("*.claim"))
    assert _report(run, tmp_path / "rep") == _report(one_worker, tmp_path / "rep1")


def test_an_interrupted_record_never_counts_as_done(one_worker, tmp_path, monkeypatch):
    """Killed while training: the claim is released, nothing is written. Killed while writing (SIGKILL leaves
    the hidden temporary file): the record is not there, the report does not read the temporary file, and the
    next run trains that network."""
    run, cfg = tmp_path / "run", parse_config(GRID)
    calls = []

    def dies_on_the_fifth(*a, **k):
        calls.append(k.get("desc"))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return TRAIN(*a, **k)

    monkeypatch.setattr(evaluate_mod, "train", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, run, progress=False)
    assert len(_names(run)) == 4 and not list(run.rglob("*.claim"))
    victim = run / "records" / "original" / "original_authorized0_lenet.json"  # a teacher, with its weights
    content = victim.read_text()
    victim.unlink()
    (victim.parent / f".{victim.name}.k2j4x.tmp").write_text(content[: len(content) // 2])  # half written
    assert len(read_records(run)) == 3
    trained = _count_training(monkeypatch)
    run_benchmark(cfg, run, progress=False)
    assert len(trained) == NETWORKS - 3 and json.loads(victim.read_text())["test_acc"] >= 0
    assert _report(run, tmp_path / "rep") == _report(one_worker, tmp_path / "rep1")


def test_cli_shard_prints_what_is_left(tmp_path, capsys):
    """`uge benchmark --shard`: a shard that finishes before the grid says so and writes no report; the
    last one writes it."""
    cfg = tmp_path / "grid.toml"
    cfg.write_text('name = "grid"\ndevice = "cpu"\n[data]\nsource = "digits"\nper_class = 6\ntest_per_class = 5\n'
                   '[recipe]\nepochs = 1\nbatch_size = 32\nlr = 0.05\nflip = false\n[protect]\nauthorized = ["lenet:0"]\n'
                   '[evaluate]\nhackers = ["lenet:normal:1", "lenet:normal:2", "lenet:normal:3"]\n'
                   '[[variant]]\nname = "Original"\nprotector = "clean"\n')
    out = tmp_path / "run"
    shares = [Worker(i, 2) for i in range(2)]
    names = [out / "records" / "original" / n for n in ("original_authorized0_lenet.json",
             *(f"original_hacker_lenet_normal_s{s}.json" for s in (1, 2, 3)))]
    first = 0 if any(not shares[0].owns(n) for n in names) else 1  # a shard that leaves work to the other
    assert main(["benchmark", str(cfg), "--out", str(out), "--quiet", "--shard", f"{first}/2"]) == 0
    said = capsys.readouterr().out
    assert "not finished yet" in said and f"uge report {out}" in said and not (out / "report").exists()
    assert main(["benchmark", str(cfg), "--out", str(out), "--quiet", "--shard", f"{1 - first}/2"]) == 0
    assert "records in" in capsys.readouterr().out and (out / "report" / "report.md").exists()
    assert len(_names(out)) == 4 and (out / "finished.json").exists()


def test_sigterm_releases_the_claims_at_once(tmp_path):
    """A scheduler's time limit (SIGTERM) ends `uge benchmark` by the normal exit path: exit status 143, a
    one-line message, and no claim left behind for other workers to wait out; the same command then resumes."""
    cfg = tmp_path / "grid.toml"
    cfg.write_text('name = "grid"\ndevice = "cpu"\n[data]\nsource = "digits"\nper_class = 6\ntest_per_class = 5\n'
                   '[recipe]\nepochs = 1\nbatch_size = 32\nlr = 0.05\nflip = false\n[protect]\nauthorized = ["lenet:0"]\n'
                   '[evaluate]\nhackers = ["lenet:normal:1"]\n[[variant]]\nname = "Original"\nprotector = "clean"\n')
    out = tmp_path / "run"
    script = ("import sys, time\nimport uge.evaluate as ev\nfrom uge.cli import main\ntrain = ev.train\n"
              "def slow(*a, **k):\n    print('training', flush=True)\n    time.sleep(60)\n    return train(*a, **k)\n"
              f"ev.train = slow\nsys.exit(main(['benchmark', {str(cfg)!r}, '--out', {str(out)!r}, '--quiet']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "training"  # inside a network: its claim is held
        assert list(out.rglob("*.claim"))
        proc.terminate()  # SIGTERM
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and len(err.strip().splitlines()) == 1
    assert not list(out.rglob("*.claim"))  # released now, not after the claim timeout
    assert main(["benchmark", str(cfg), "--out", str(out), "--quiet"]) == 0 and len(_names(out)) == 2


def test_sigterm_handler_is_in_place_only_within_the_block(tmp_path):
    import signal

    from uge.workers import Terminated, released_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    target = tmp_path / "a.json"
    with pytest.raises(Terminated) as e, released_on_sigterm(), claim(target):
        signal.raise_signal(signal.SIGTERM)
    assert e.value.code == 143 and not claim_path(target).exists()
    assert signal.getsignal(signal.SIGTERM) == before
