#!/usr/bin/env bash
# Issue 15: the GPU pool on two GPUs against one, warm workers, warm against warm, in one call
# (nvidia-h100-x2). A short warm-up study on both GPUs first (the preset built, the data tokenized,
# unsloth imported, kernels compiled into the on-disk caches), then the same study of TRIALS
# trials of STEPS steps on GPU 0 alone and on GPUs 0,1 (ORDER: "1 2" or "2 1"). Table from the
# Optuna storages (bench/efficiency_table.py): trials per hour, sweep efficiency, fixed and warm-up s.
set -u
TRIALS=${TRIALS:-8}
STEPS=${STEPS:-20}
ORDER=${ORDER:-"1 2"}
SWEEP=${SWEEP:-sweeps/mistral7b-packed.yaml}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/pool-out}
RES=/tmp/pool-results
mkdir -p "$OUT"; rm -rf "$RES"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists"
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
  HARNESS_CACHE=${HARNESS_CACHE:-/tmp/hcache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 200 "$PY" bench/efficiency_table.py prepare "$SWEEP"
"$PY" bench/efficiency_table.py sweep "$SWEEP" /tmp/pool-warmup.yaml --study pool-warmup --trials 2 --steps 5 --start-method warm
timeout 150 "$PY" bench/efficiency_table.py run run /tmp/pool-warmup.yaml --results-dir /tmp/pool-warmup --gpus 0,1 > "$OUT/warmup.log" 2>&1
echo "warm-up done after ${SECONDS}s (rc $?)" | tee "$OUT/runs.txt"
for n in $ORDER; do
  gpus=$([ "$n" = 1 ] && echo 0 || echo 0,1)
  "$PY" bench/efficiency_table.py sweep "$SWEEP" /tmp/pool-$n.yaml --study pool-${n}gpu --trials "$TRIALS" --steps "$STEPS" --start-method warm
  start=$SECONDS
  timeout -s INT -k 30 "${SHARE_S:-200}" "$PY" bench/efficiency_table.py run run /tmp/pool-$n.yaml --results-dir "$RES" --gpus "$gpus" > "$OUT/pool-$n.log" 2>&1
  echo "pool-${n}gpu: rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/runs.txt"
  tail -3 "$OUT/pool-$n.log" >> "$OUT/runs.txt"
done
# Then, on GPU 0 with the machine warm: 5-step trials (what the sweep efficiency is for short trials).
if [ -n "${FIVE_STEP_TRIALS:-8}" ] && [ $SECONDS -lt 430 ]; then
  "$PY" bench/efficiency_table.py sweep "$SWEEP" /tmp/pool-5.yaml --study warm-5step --trials "${FIVE_STEP_TRIALS:-8}" --steps 5 --start-method warm
  start=$SECONDS
  timeout -s INT -k 20 $(( 530 - SECONDS )) "$PY" bench/efficiency_table.py run run /tmp/pool-5.yaml --results-dir "$RES" --gpus 0 > "$OUT/warm-5step.log" 2>&1
  echo "warm-5step: rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/runs.txt"
fi
"$PY" bench/efficiency_table.py table "$RES" --json "$OUT/table.json" | tee "$OUT/table.md"
tar czf "$OUT/studies.tar.gz" -C "$RES" --exclude=best --exclude=weights --exclude=wandb . 2>/dev/null
echo "done after ${SECONDS}s"
