#!/usr/bin/env bash
# UGE's protect on the 1,437 digits, 1 process (2 threads) against 2 processes (torchrun, 1 thread each), interleaved
set -e
UGE=${UGE:-uge}
PY=${PY:-python}
cat /proc/loadavg | sed 's/^/load before: /'
for rep in 1 2; do
  rm -rf one two
  OMP_WAIT_POLICY=PASSIVE $UGE protect --data digits --method uge --config uge.json --out one --device cpu --quiet | grep -o "published one.*in [0-9.]* s" | sed "s/^/1 process, repeat $rep: /"
  OMP_WAIT_POLICY=PASSIVE $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m uge.cli protect --data digits --method uge --config uge.json --out two --device cpu --quiet 2>/dev/null | grep -o "published two.*in [0-9.]* s" | sed "s/^/2 processes, repeat $rep: /"
  $UGE verify two > /dev/null && echo "2 processes, repeat $rep: uge verify passed"
done
cat /proc/loadavg | sed 's/^/load after: /'
