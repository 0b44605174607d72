"""One training job on 1 process and on N processes (DDP under torchrun), timed (issue 22 part 2).

Usage: python scripts/ddp_speed.py [--out DIR] [--processes 2] [--images 2048] [--size 32] [--arch cnn]
                                   [--epochs 2] [--batch-size 128] [--repeats 2] [--device cpu]

Trains ``--arch`` on a synthetic set (random uint8 images, labels cycling through 10 classes; the time, not the
accuracy, is measured) with the same recipe and seed in three settings, each in a fresh interpreter, the settings
interleaved so that a change in the machine's load hits all alike: one process with one thread, one process with
as many threads as processes, and N processes of one thread each (``torchrun --standalone --nproc-per-node N``,
gloo on CPU, NCCL on GPUs). Each run times train() alone (between barriers, after the data is loaded) and the
whole command (interpreter start-up and the process group included). Writes DIR/result.json (default
results/ddp-speed-<device>) with the median of every setting and every run's numbers.

On the 2-core CPU machine the cores are the limit: two processes share the same two cores that one process with
two threads uses, and add the gradient all-reduce; do not expect a speed-up there. On N GPUs each process has a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def _worker(args) -> None:
    """One run (a rank of it under torchrun): train() timed between barriers; rank 0 writes the numbers."""
    import torch

    from uge import distributed
    from uge.data import load_dataset
    from uge.models import create_model
    from uge.training import Recipe, train

    with distributed.session(args.device) as world:
        data = load_dataset(args.worker)
        model = create_model(args.arch, data.num_classes, data.channels, seed=0)
        recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
        distributed.barrier()
        start = time.perf_counter()
        train(model, data, recipe, device=args.device, seed=0, progress=False)
        distributed.barrier()
        seconds = time.perf_counter() - start
        steps = args.epochs * (len(data) // args.batch_size)
        if world.main:
            Path(args.result).write_text(json.dumps({
                "processes": world.size, "threads": torch.get_num_threads(), "train_s": round(seconds, 3),
                "images_per_s": round(steps * args.batch_size / seconds, 1)}))


def _run(settings: dict, data: Path, args, tmp: Path) -> dict:
    """One setting in a fresh interpreter: its worker's numbers and the whole command's wall time."""
    result = tmp / "run.json"
    worker = [str(Path(__file__).resolve()), "--worker", str(data), "--result", str(result), "--arch", args.arch,
              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(settings["processes"])] if settings["processes"] > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"]), "PYTHONPATH": str(SRC)}
    start = time.perf_counter()
    subprocess.run([*launch, *worker], env=env, check=True, capture_output=True)
    return {**json.loads(result.read_text()), "command_s": round(time.perf_counter() - start, 2)}


def _synthetic(path: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels=np.arange(n) % 10,
             classes=np.array([f"c{i}" for i in range(10)]))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--arch", default="cnn")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run, on this data file
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return 0
    n = args.processes
    settings = {"1 process, 1 thread": {"processes": 1, "threads": 1},
                f"1 process, {n} threads": {"processes": 1, "threads": n},
                f"{n} processes, 1 thread each": {"processes": n, "threads": 1}}
    runs = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        data = _synthetic(Path(tmp) / "data.npz", args.images, args.size)
        for _ in range(args.repeats):
            for name, s in settings.items():
                runs[name].append(_run(s, data, args, Path(tmp)))
                print(f"{name}: {runs[name][-1]}", flush=True)
    rows = [{"setting": name, **settings[name],
             "train_s_median": statistics.median(r["train_s"] for r in rs),
             "images_per_s_median": statistics.median(r["images_per_s"] for r in rs),
             "command_s_median": statistics.median(r["command_s"] for r in rs), "runs": rs}
            for name, rs in runs.items()]
    print("| setting | train() s | images/s | whole command s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['train_s_median']:.1f} | {r['images_per_s_median']:.0f} | "
              f"{r['command_s_median']:.1f} |")
    out = args.out or Path("results") / f"ddp-speed-{args.device}"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    (out / "result.json").write_text(json.dumps({
        "command": " ".join(["python", "scripts/ddp_speed.py", *sys.argv[1:]]),
        "job": {"arch": args.arch, "images": args.images, "size": args.size, "epochs": args.epochs,
                "batch_size": args.batch_size, "device": args.device, "repeats": args.repeats},
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "rows": rows}, indent=2) + "\n")
    print(f"written to {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
