#!/usr/bin/env bash
# Issue 20's prepared device check (one command on one H100/H200, inside a time budget):
#   1. machine.txt: the GPU, torch, the cores;
#   2. smoke: configs/battery-gpu-smoke.toml (every variant and countermeasure of the battery on `shapes`, one
#      epoch) on the device; the script stops here if it fails, so a broken code path costs seconds;
#   3. the battery, configs/battery-gpu.toml: WORKERS workers share the run folder (each network is trained once)
#      for at most BUDGET seconds, then are stopped (SIGTERM releases their claims; finished records are kept and a
#      rerun with the same folder resumes);
#   4. uge report, and $OUT/battery-gpu.tar.gz: the run folder without the published images, the logs, timings.
# On the device machine (the CIFAR-10 tarball carried as .data/):
#   bash scripts/battery_gpu.sh .data/cifar10-jpeg.tar.gz
# On a CPU, at tiny sizes, to test the script itself (the smoke config is the battery too):
#   TINY=1 OUT=/tmp/out BUDGET=60 bash scripts/battery_gpu.sh
# Another battery: CONFIG=configs/battery-gpu-dc.toml SMOKE=configs/battery-gpu-dc-smoke.toml bash scripts/battery_gpu.sh …
# (SEED_RUN=DIR starts the battery from a copy of the run folder DIR, e.g. one with reused records)
# The next device check (prepared; no machine was lent in stop 40): TAP at full size, the Original's columns reused:
#   CONFIG=configs/battery-gpu-tap.toml SMOKE=configs/battery-gpu-tap-smoke.toml SEED_RUN=results/battery-gpu-tap \
#       BUDGET=440 bash scripts/battery_gpu.sh .data/cifar10-jpeg.tar.gz
set -uo pipefail
DATA=${1:-../shared/datasets/cifar10-jpeg.tar.gz}
OUT=${OUT:-results/battery-gpu-out}
WORKERS=${WORKERS:-3}
BUDGET=${BUDGET:-420}
UGE=${UGE:-python3 -m uge.cli}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
RES=$(mktemp -d)/battery-gpu
mkdir -p "$RES" "$OUT"
SMOKE=${SMOKE:-configs/battery-gpu-smoke.toml}
if [[ -n "${TINY:-}" ]]; then
  DEVICE=cpu CONFIG=$SMOKE DATA_ARG=()
else
  DEVICE=cuda CONFIG=${CONFIG:-configs/battery-gpu.toml} DATA_ARG=(--data "$DATA")
fi
# the workers share the cores: a third of them each for the CPU parts (protection, the attacks' transforms)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / WORKERS > 0 ? $(nproc) / WORKERS : 1 ))}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  python3 -c "import torch, platform; print('torch', torch.__version__, '| python', platform.python_version())"
  echo "cores $(nproc), workers $WORKERS, threads each $OMP_NUM_THREADS, budget ${BUDGET} s"; } > "$RES/machine.txt"
cat "$RES/machine.txt"
pack() {
  tar -czf "$OUT/battery-gpu.tar.gz" --exclude=data.npz --exclude='*.safetensors' --exclude='.work-*' \
    --exclude='*.claim' -C "$(dirname "$RES")" battery-gpu
  echo "wrote $OUT/battery-gpu.tar.gz"
}
printf 'stage\tseconds\n' > "$RES/timings.tsv"
t0=$(date +%s)
if ! $UGE benchmark "$SMOKE" --out "$RES/smoke" --device $DEVICE --quiet > "$RES/smoke.log" 2>&1; then
  tail -40 "$RES/smoke.log"; echo "SMOKE FAILED"; pack; exit 1
fi
t1=$(date +%s)
printf 'smoke\t%s\n' $((t1 - t0)) >> "$RES/timings.tsv"
echo "smoke passed in $((t1 - t0)) s"
# SEED_RUN: a run folder to start from (records reused from earlier runs: scripts/reuse_records.py)
if [[ -n "${SEED_RUN:-}" ]]; then cp -r "$SEED_RUN" "$RES/run"; fi
for i in $(seq 1 "$WORKERS"); do
  timeout -k 30 "$BUDGET" $UGE benchmark "$CONFIG" "${DATA_ARG[@]}" --out "$RES/run" --device $DEVICE --quiet \
    > "$RES/worker$i.log" 2>&1 &
done
wait
t2=$(date +%s)
printf 'battery (%s workers)\t%s\n' "$WORKERS" $((t2 - t1)) >> "$RES/timings.tsv"
ls "$RES"/run/records/*/*.json 2>/dev/null | wc -l | xargs echo "records:"
for i in $(seq 1 "$WORKERS"); do echo "--- worker $i"; tail -3 "$RES/worker$i.log"; done
$UGE report "$RES/run" > "$RES/report.log" 2>&1 || tail -5 "$RES/report.log"
grep -A8 -e '^| data | mode | network | clean | plain | worst' -e '^| countermeasure | mode' "$RES/run/report/report.md"
printf 'report\t%s\n' $(( $(date +%s) - t2 )) >> "$RES/timings.tsv"
pack
