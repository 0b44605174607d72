#!/usr/bin/env bash
# End-to-end GPU run on the full CIFAR-10 JPEG training set (50,000 images): protect -> verify -> evaluate.
# Sized to fit one 10-minute command on one H100/H200. Usage:
#   bash scripts/cifar10_gpu.sh [DATA] [OUT]   (defaults: ../shared/datasets/cifar10-jpeg.tar.gz, results/cifar10-gpu)
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10-jpeg.tar.gz}
OUT=${2:-results/cifar10-gpu}
WORK=${WORK:-runs/cifar10-gpu}
UGE=${UGE:-uge}
GEN_EPOCHS=${GEN_EPOCHS:-3}
HACKERS=${HACKERS:-resnet18:normal:1,resnet18:distill:1,resnetc20:normal,cnn:normal}
BASELINE=${BASELINE---baseline}  # set BASELINE= to skip the clean-data grid
mkdir -p "$OUT" "$WORK"
timed() {  # timed NAME CMD...: run, tee its output to OUT/NAME.log, append the wall time to OUT/timings.tsv
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo -e "$name\t$(python3 -c "import time; print(round(time.time() - $t0, 1))")\t$*" >> "$OUT/timings.tsv"
}
echo -e "step\tseconds\tcommand" > "$OUT/timings.tsv"
python3 - > "$OUT/machine.txt" <<'PY'
import torch, platform
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "| torch", torch.__version__,
      "| python", platform.python_version())
PY
# smoke check: the CUDA code paths on a tiny set (seconds)
timed smoke $UGE protect --method uge --data digits --per-class 20 --out "$WORK/smoke" --overwrite --device cuda --quiet \
  --authorized cnn:0 --epochs 2 --no-flip --trajectory-epochs 1 --generator-epochs 1 --generator-width 8 \
  --encoder-arch lenet --encoder-epochs 1 --format npz
timed protect $UGE protect --method uge --data "$DATA" --out "$WORK/published" --overwrite --device cuda --quiet --format npz \
  --authorized resnet18:0 --epochs 15 --batch-size 512 --lr 0.2 --trajectory-epochs 4 \
  --generator-epochs $GEN_EPOCHS --generator-width 32 --generator-batch-size 256 \
  --encoder-arch resnetc20 --encoder-epochs 10
timed verify $UGE verify "$WORK/published" --quiet
timed evaluate $UGE evaluate "$WORK/published" --test-data "$DATA" $BASELINE --device cuda --quiet \
  --hackers "$HACKERS" --out "$OUT/records"
