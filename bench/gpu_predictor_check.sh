#!/usr/bin/env bash
# One GPU call: the memory predictor's accuracy over the configs of bench/predictor_check.py
# (7B and 1B presets; batch, accumulation, rank, sequence length, checkpointing). Resumable: a
# second call with the same $OUT contents copied back into bench/predictor/ skips finished groups.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" || true
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
mkdir -p "$OUT/predictor"
cp bench/predictor/measured.jsonl "$OUT/predictor/" 2>/dev/null || true
timeout "${LIMIT_S:-540}" python3 bench/predictor_check.py run --out "$OUT/predictor" --models "${MODELS:-mistral-7b-v0.3,mistral-1b}" \
  > "$OUT/predictor/run.log" 2>&1
echo "exit $?"; grep -v "^{" "$OUT/predictor/run.log" | grep -i "error\|Traceback\|base loaded" | tail -20
wc -l "$OUT/predictor/measured.jsonl"
