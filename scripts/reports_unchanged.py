"""Regenerate every report under results/ with two source trees and compare them file by file (issue 12).

Usage: python scripts/reports_unchanged.py OLD_SRC [NEW_SRC] [--results DIR]

For every run folder with a config.json and records, `uge report` is run from the committed records with
PYTHONPATH=OLD_SRC and with PYTHONPATH=NEW_SRC (default: src) into temporary folders; the tables
(report.md, table.md/.csv/.tex) and figures are compared byte for byte. Prints one line per run; exit 1 if
any file differs.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _report(src: Path, run: Path, out: Path) -> None:
    code = f"from uge.benchmark import write_report; write_report({str(run)!r}, {str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(src.resolve())})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=Path("src"))
    p.add_argument("--results", type=Path, default=Path("results"))
    args = p.parse_args()
    differ = 0
    for run in sorted(d for d in args.results.iterdir() if (d / "config.json").is_file() and (d / "records").is_dir()
                      and any((d / "records").glob("*/*.json"))):  # a run that has just started has no report
        with tempfile.TemporaryDirectory() as tmp:
            old, new = Path(tmp) / "old", Path(tmp) / "new"
            _report(args.old, run, old)
            _report(args.new, run, new)
            names = sorted({f.name for f in old.iterdir()} | {f.name for f in new.iterdir()})
            bad = [n for n in names if not ((old / n).is_file() and (new / n).is_file()
                                            and filecmp.cmp(old / n, new / n, shallow=False))]
        differ += bool(bad)
        print(f"{run}: {len(names)} files, " + (f"DIFFER: {', '.join(bad)}" if bad else "identical"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
