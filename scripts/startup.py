"""How long `import uge` and `uge --help` take, for one or more source trees in one run (issue 12).

Usage: python scripts/startup.py [--repeats N] [--out FILE.json] SRC_DIR [SRC_DIR ...]

Each command runs in a fresh interpreter with PYTHONPATH=SRC_DIR, N times per tree, the trees interleaved so
that a change in the machine's load hits every tree alike; the median wall time is reported (and `import
torch` alone, the floor of anything that needs the numerical stack). Compare trees only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "import uge": ["-c", "import uge"],
    "uge --help": ["-m", "uge.cli", "--help"],  # `python -m uge.cli` works in trees from before `python -m uge`
    "import torch": ["-c", "import torch"],
}


def _time(args: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", nargs="+", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    times = {(str(s), c): [] for s in args.src for c in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():
            for src in args.src:
                times[(str(src), name)].append(_time(argv, src))
    rows = [{"src": s, "command": c, "median_s": statistics.median(v), "runs_s": v} for (s, c), v in times.items()]
    print("| tree | " + " | ".join(COMMANDS) + " |")
    print("|---|" + "---|" * len(COMMANDS))
    for s in args.src:
        print(f"| {s} | " + " | ".join(f"{statistics.median(times[(str(s), c)]):.2f} s" for c in COMMANDS) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "python": platform.python_version(),
                                        "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
