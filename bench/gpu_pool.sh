#!/usr/bin/env bash
# Issue 15: the GPU pool on two GPUs against one, warm against warm, in one call (nvidia-h100-x2).
#
#   RESIDENT=1 ORDER="1 2 2 1" bash bench/gpu_pool.sh
#
# The preset built and the data tokenized; with RESIDENT=1, `harness warm up --gpus 0,1` beside it
# (a resident warm worker per GPU, kept between the studies). A short warm-up study on both GPUs
# (each GPU's worker loads the base and compiles; the on-disk compile caches fill), then the same
# study of TRIALS trials of STEPS steps on GPU 0 alone ("1") and on GPUs 0,1 ("2"; "2a": each trial
# process with torch's own number of CPU threads, not its share of the host's cores), in ORDER; a
# study that would not end before LIMIT_S (default 570 s) is skipped. Without RESIDENT each study
# starts its own warm worker per GPU. Table from the Optuna storages (bench/efficiency_table.py):
# trials per hour, sweep efficiency, fixed and warm-up s.
# Dry run on CPU: DRY=1 SWEEP=<a CPU sweep> PYTHON=.venv/bin/python OUT=/tmp/pool-out bash bench/gpu_pool.sh
STEPS=${STEPS:-20}
ORDER=${ORDER:-"1 2"}
NAME=pool
source bench/study_calls.sh
rm -rf /tmp/pool-warmup
prepare_beside_warm_up ${RESIDENT:+0,1}
"$PY" bench/efficiency_table.py sweep "$SWEEP" /tmp/pool-warmup.yaml --study pool-warmup --trials 4 --steps 5 --start-method warm
timeout 200 "$PY" bench/efficiency_table.py run run /tmp/pool-warmup.yaml --results-dir /tmp/pool-warmup --gpus 0,1 > "$LOGS/warmup.log" 2>&1
echo "warm-up done after ${SECONDS}s (rc $?)" | tee -a "$OUT/runs.txt"
i=0
for n in $ORDER; do
  i=$((i + 1))
  # "1": GPU 0; "2": GPUs 0,1; "2a": GPUs 0,1 with each trial process keeping torch's own number of
  # CPU threads (OMP_NUM_THREADS set empty: the driver does not share the host's cores out).
  case "$n" in 1) gpus=0; k=1; envs="";; 2a) gpus=0,1; k=2; envs="OMP_NUM_THREADS=";; *) gpus=0,1; k=2; envs="";; esac
  # ~0.75 s a step on an H100 and ~2.5 s more per trial (bench/RESULTS.md), the trials shared by k GPUs.
  study "pool-${n}gpu-$i" "$TRIALS" "$STEPS" warm $(( TRIALS * (STEPS * 4 / 5 + 3) / k + 10 )) "$gpus" $envs
done
[ -n "${RESIDENT:-}" ] && "$PY" -m harness.cli warm status >> "$OUT/runs.txt" 2>&1
finish
