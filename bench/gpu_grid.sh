#!/usr/bin/env bash
# Record the benchmark grid of learning curves (bench/grid.yaml: mistral-125m-base on the King
# James Bible, 195 configs x 3 seeds) on the device, resumably: each call trains until DEADLINE_S,
# then Ctrl-C's the study (the trial in flight runs again next time) and exports what is recorded
# so far to $OUT/grid.parquet. The study lives in /tmp/grid-results while the machine stays warm;
# a later call on the same machine goes on where this one stopped. When the grid is complete,
# copy $OUT/grid.parquet to bench/grid/<card>.parquet (e.g. h100.parquet) and replay it:
#   harness replay SWEEP.yaml --grid bench/grid/h100.parquet
# Usage: bash bench/gpu_grid.sh DEADLINE_S [GPUS, e.g. 0,1,2,3: one config at a time on each]
set -u
DEADLINE=${1:-540}; GPUS=${2:-0}
source bench/gpu_env.sh
export WANDB_MODE=offline
timeout -s INT -k 60 "$DEADLINE" python3 bench/grid.py run bench/grid.yaml --results-dir /tmp/grid-results \
  --gpus "$GPUS" --out "$OUT/grid.parquet" 2>&1 \
  | grep -v -e "Enum subclass" -e "Loading weights" -e "kernels-community" | tee "$OUT/run.log" | tail -30
# Interrupted by the deadline: export the configs finished so far (the table says how many).
[ -f "$OUT/grid.parquet" ] || python3 bench/grid.py export /tmp/grid-results/grid-mistral125m-kjv --out "$OUT/grid.parquet"
cp /tmp/hcache/models/*/pretrain.json "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader >> "$OUT/gpu.txt"
