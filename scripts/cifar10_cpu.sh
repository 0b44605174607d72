#!/usr/bin/env bash
# End-to-end CPU run on a class-balanced CIFAR-10 subset: protect -> verify -> evaluate.
# Usage: bash scripts/cifar10_cpu.sh [DATA] [OUT]   (defaults: ../shared/datasets/cifar10-jpeg.tar.gz, results/cifar10-cpu)
# Writes the published set to $WORK (not committed), and the records, table and step timings to OUT.
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10-jpeg.tar.gz}
OUT=${2:-results/cifar10-cpu}
WORK=${WORK:-runs/cifar10-cpu}
mkdir -p "$OUT" "$WORK"
timed() {  # timed NAME CMD...: run, tee its output to OUT/NAME.log, append the wall time to OUT/timings.tsv
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo -e "$name\t$(echo "$(date +%s.%N) - $t0" | bc)\t$*" >> "$OUT/timings.tsv"
}
echo -e "step\tseconds\tcommand" > "$OUT/timings.tsv"
echo "machine: $(nproc) CPU cores, $(uname -m), torch threads $(python -c 'import torch; print(torch.get_num_threads())')" > "$OUT/machine.txt"
timed protect uge protect --method uge --data "$DATA" --per-class 500 --out "$WORK/published" --overwrite --device cpu --quiet \
  --authorized resnetc20:0 --epochs 15 --batch-size 128 --lr 0.1 --trajectory-epochs 4 \
  --generator-epochs 10 --generator-width 16 --generator-batch-size 128 \
  --encoder-arch resnetc32 --encoder-epochs 10
timed verify uge verify "$WORK/published" --quiet
timed evaluate uge evaluate "$WORK/published" --test-data "$DATA" --test-per-class 100 --baseline --device cpu --quiet \
  --hackers cnn:normal,cnn:distill,resnetc20:normal:1,resnetc20:distill:1,lenet:normal --out "$OUT/records"
