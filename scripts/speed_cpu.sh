#!/usr/bin/env bash
# Issue 5's CPU measurements (2 cores): scripts/speed.py at CPU sizes, then the protection step on
# 5,000 CIFAR-10 images (class-balanced subset; authorized ResNetC-20, 10-epoch recipe, T = 4,
# 5 generator epochs of width 16, ResNetC-20 encoder trained 5 epochs), timed end to end.
# Usage: bash scripts/speed_cpu.sh [DATA] [OUT]   (defaults: ../shared/datasets/cifar10-jpeg.tar.gz, results/speed-cpu)
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10-jpeg.tar.gz}
OUT=${2:-results/speed-cpu}
UGE=${UGE:-uge}
WORK=$(mktemp -d)
mkdir -p "$OUT"
echo "machine: $(nproc) CPU cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load before: $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/machine.txt"
python3 scripts/speed.py --device cpu --data "$DATA" --images 2000 --out "$OUT/speed.json" 2>&1 | grep -v "^L_fd uses" | tee "$OUT/speed.txt"
t0=$(date +%s.%N)
$UGE protect --method uge --data "$DATA" --per-class 500 --out "$WORK/published" --device cpu --quiet --format npz \
  --authorized resnetc20:0 --epochs 10 --batch-size 128 --trajectory-epochs 4 \
  --generator-epochs 5 --generator-width 16 --encoder-arch resnetc20 --encoder-epochs 5 2>&1 | tee "$OUT/protect5k.log"
echo -e "step\tseconds\nprotect 5000 images\t$(echo "$(date +%s.%N) - $t0" | bc)" > "$OUT/timings.tsv"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
rm -rf "$WORK"
cat "$OUT/timings.tsv"
