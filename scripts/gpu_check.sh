#!/usr/bin/env bash
# The prepared device check of issues 3 and 5, for a session lent one H100/H200 (one command, < 10 min):
#   1. scripts/speed.py at full size (ResNet-18, 50,000 CIFAR-10 images, protect of the full set);
#   2. the fast Table 1 grid, `uge benchmark configs/table1-fast.toml`, timed end to end.
# Everything lands in $OUT/gpu-check.tar.gz (records, report, logs, timings).
# On the device machine (data carried as .data/, see results/README.md):
#   bash scripts/gpu_check.sh .data/cifar10-jpeg.tar.gz
# On a CPU, at tiny sizes, to test the script itself:
#   TINY=1 OUT=/tmp/out bash scripts/gpu_check.sh
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10-jpeg.tar.gz}
OUT=${OUT:-results/gpu-check}
UGE=${UGE:-python3 -m uge.cli}
export PYTHONPATH=${PYTHONPATH:-$PWD/src}
RES=$(mktemp -d)/gpu-check
mkdir -p "$RES" "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"; \
  python3 -c "import torch; print('torch', torch.__version__)"; nproc; } > "$RES/machine.txt"
if [[ -n "${TINY:-}" ]]; then
  DEVICE=cpu DATA=digits CONFIG=configs/smoke.toml
  SPEED="--device cpu --arch cnn --encoder-arch lenet --batch 32 --images 256 --width 4 --repeat 2 --protect-images 128"
else
  DEVICE=cuda CONFIG=configs/table1-fast.toml
  SPEED="--device cuda --arch resnet18 --batch 128 --train-batch 512 --data $DATA --images 50000 --width 32 --protect-images 50000"
fi
t0=$(date +%s)
python3 scripts/speed.py $SPEED --out "$RES/speed.json" 2>&1 | tee "$RES/speed.txt"
t1=$(date +%s)
$UGE benchmark "$CONFIG" --data "$DATA" --out "$RES/table1-fast" --device $DEVICE --quiet 2>&1 | tee "$RES/table1-fast.txt"
t2=$(date +%s)
printf 'stage\tseconds\nspeed.py\t%s\ntable1-fast\t%s\n' $((t1 - t0)) $((t2 - t1)) > "$RES/timings.tsv"
rm -rf "$RES"/table1-fast/variants/*/published* "$RES"/table1-fast/records/*/*.safetensors
tar -czf "$OUT/gpu-check.tar.gz" -C "$(dirname "$RES")" gpu-check
echo "wrote $OUT/gpu-check.tar.gz"
