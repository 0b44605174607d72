"""Peak memory (RSS) of protect → publish → verify → train against set size, streamed vs in memory (issue 22 part 1).

Usage: python scripts/memory_scale.py [--out DIR] [--sizes 5000x32,50000x32,200000x32,10000x96]
                                      [--arch lenet] [--work DIR] [--readme-only]

(31 min on this project's 2-core machine shared with other jobs, load average about 5; --sizes for less.)

For every size a synthetic set (seeded uniform-noise images, labels cycling through 10 classes) is written as a
store folder chunk by chunk (uge.data.store), with a 1,000-image test store beside it. Then each stage runs as
its own `uge` command in a fresh process; its peak RSS is the kernel's ru_maxrss of that one child (os.wait4),
its time the wall clock around it:

  protect  `uge protect --method random` (protect and publish; streamed: --stream, which publishes images.npy;
           in memory: today's path with --format npz)
  verify   `uge verify PUB --original-data STORE` (+ --stream)
  train    `uge train --data PUB --arch lenet --epochs 1 --test-data TEST` (+ --stream): one epoch, then the
           test and training accuracy

"floor" is the peak RSS of a process that imports torch and uge's training code and does nothing. Writes
result.json and README.md (the tables written by this code) into --out (default results/memory-scale-cpu).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("protect", "verify", "train")
PATHS = ("streamed", "in memory")


def make_store(folder: Path, n: int, size: int, seed: int) -> None:
    """A store of ``n`` uniform-noise ``size``×``size`` RGB images written chunk by chunk (never whole)."""
    from uge.data.store import IMAGES, LABELS, StoreWriter, chunk_rows, write_store_meta

    folder.mkdir(parents=True, exist_ok=True)
    shape = (n, size, size, 3)
    rng = np.random.default_rng(seed)
    with StoreWriter(folder / IMAGES, shape) as w:
        rows = chunk_rows(shape[1:])
        for start in range(0, n, rows):
            w.write(start, rng.integers(0, 256, (min(rows, n - start), *shape[1:]), dtype=np.uint8))
    np.save(folder / LABELS, np.arange(n, dtype=np.int64) % 10)
    write_store_meta(folder, [f"c{i}" for i in range(10)], shape)


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` as a fresh child: its peak RSS (MiB, from the kernel), wall seconds and exit code."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    return {"rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 2), "rc": p.returncode,
            "tail": out.decode(errors="replace").strip().splitlines()[-1:] if out else []}


def uge(*args: str) -> list[str]:
    return [sys.executable, "-m", "uge.cli", *args]


def run_size(work: Path, n: int, size: int, arch: str, env: dict) -> dict:
    store, test = work / f"store-{n}x{size}", work / f"test-{size}"
    if not (store / "store.json").is_file():
        make_store(store, n, size, seed=n)
    if not (test / "store.json").is_file():
        make_store(test, 1000, size, seed=1)
    row = {"n": n, "size": size, "set_mib": round(n * size * size * 3 / 2**20, 1)}
    for path in PATHS:
        stream = ["--stream"] if path == "streamed" else []
        pub = work / f"pub-{n}x{size}-{'s' if stream else 'm'}"
        shutil.rmtree(pub, ignore_errors=True)
        shutil.rmtree(pub.with_name(f".{pub.name}.work"), ignore_errors=True)
        cmds = {
            "protect": uge("protect", "--data", str(store), "--method", "random", "--out", str(pub), "--quiet",
                           *(stream or ["--format", "npz"])),
            "verify": uge("verify", str(pub), "--original-data", str(store), *stream),
            "train": uge("train", "--data", str(pub), "--arch", arch, "--epochs", "1", "--batch-size", "128",
                         "--test-data", str(test), "--quiet", *stream),
        }
        stages = {}
        for stage in STAGES:
            m = measure(cmds[stage], env)
            m["us_per_image"] = round(m["seconds"] / n * 1e6, 1)
            stages[stage] = m
            print(f"{n:>7} x{size:<3} {path:9s} {stage:7s} rc={m['rc']} peak {m['rss_mib']:8.1f} MiB "
                  f"{m['seconds']:7.1f} s ({m['us_per_image']:.1f} µs/image)", flush=True)
            if m["rc"] != 0:
                print("   ", m["tail"], flush=True)
                break
        row[path] = stages
        shutil.rmtree(pub, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return row


def machine() -> dict:
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    import torch

    return {"cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def readme(doc: dict) -> str:
    lines = ["# Peak memory against set size: streamed vs in memory (issue 22 part 1)", "",
             "Written by `scripts/memory_scale.py` (numbers from the run, nothing typed by hand).", "",
             f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']['cpus']} CPUs (shared with other jobs; load average at start "
             f"{', '.join(map(str, doc['machine']['load_average_at_start']))}), "
             f"{doc['machine']['memory_gib']} GiB memory, {doc['machine']['platform']}, Python "
             f"{doc['machine']['python']}, torch {doc['machine']['torch']}; the whole run took "
             f"{doc['seconds'] / 60:.1f} min.", "",
             "Each stage is one `uge` command in a fresh process; peak RSS is the kernel's `ru_maxrss` of that "
             "process (the page cache, where a streamed pass leaves the file, is not in it). Streamed: `--stream`, "
             "published as `images.npy`; in memory: today's path, published as `data.npz`. Protect = "
             "`uge protect --method random` (protect + publish), verify = `uge verify` against the originals, train "
             f"= `uge train --arch {doc['arch']} --epochs 1` (then the test and training accuracy). "
             f"Floor: a process that imports torch and uge's training code: {doc['floor_mib']} MiB. The time per "
             "image is the whole command's wall time over the images, process start included (importing torch "
             "takes seconds on this shared machine), so it overstates the cost at 5,000 images; the cores were "
             "shared with other jobs throughout, so read the times as rough.", "",
             "| images | size | set (MiB) | path | protect peak (MiB) | verify peak | train peak | "
             "protect µs/image | verify µs/image | train µs/image |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in doc["rows"]:
        for path in PATHS:
            st = row.get(path, {})
            cell = lambda s, k: (f"{st[s][k]:,.1f}" if st[s]["rc"] == 0 else f"failed (rc {st[s]['rc']})") \
                if s in st else "–"  # noqa: E731
            lines.append(f"| {row['n']:,} | {row['size']}×{row['size']} | {row['set_mib']:,.1f} | {path} | "
                         + " | ".join(cell(s, "rss_mib") for s in STAGES) + " | "
                         + " | ".join(cell(s, "us_per_image") for s in STAGES) + " |")
    lines += ["", doc["summary"], ""]
    return "\n".join(lines)


def summary(rows: list[dict], floor: float) -> str:
    """What the numbers say about flatness, computed from them."""
    out = []
    for path in PATHS:
        small = [r for r in rows if r["size"] == 32 and path in r and all(r[path][s]["rc"] == 0 for s in STAGES)]
        if len(small) >= 2:
            lo, hi = small[0], small[-1]
            peaks = {s: (lo[path][s]["rss_mib"], hi[path][s]["rss_mib"]) for s in STAGES}
            out.append(f"{path}, 32×32 from {lo['n']:,} to {hi['n']:,} images ({hi['n'] / lo['n']:.0f}× the set): "
                       + ", ".join(f"{s} peak {a:,.0f} → {b:,.0f} MiB ({b - a:+,.0f})" for s, (a, b) in peaks.items())
                       + ".")
    return "Summary: " + " ".join(out) if out else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/memory-scale-cpu"))
    p.add_argument("--sizes", default="5000x32,50000x32,200000x32,10000x96")
    p.add_argument("--arch", default="lenet")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder, removed at the end)")
    p.add_argument("--readme-only", action="store_true", help="rewrite README.md from --out's result.json")
    a = p.parse_args()
    if a.readme_only:
        doc = json.loads((a.out / "result.json").read_text())
        (a.out / "README.md").write_text(readme(doc))
        return 0
    start = time.perf_counter()
    work = a.work or Path(tempfile.mkdtemp(prefix="uge-memory-scale-"))
    env = {**os.environ, "UGE_CACHE": str(work / "cache")}
    floor = measure([sys.executable, "-c", "import torch, uge.training, uge.cli"], env)["rss_mib"]
    doc = {"command": "python " + " ".join(sys.argv), "machine": machine(), "arch": a.arch, "floor_mib": floor,
           "rows": []}
    try:
        for spec in a.sizes.split(","):
            n, size = (int(x) for x in spec.lower().split("x"))
            doc["rows"].append(run_size(work, n, size, a.arch, env))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    doc["seconds"] = round(time.perf_counter() - start, 1)
    doc["summary"] = summary(doc["rows"], floor)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "result.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / "README.md").write_text(readme(doc))
    print(doc["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
