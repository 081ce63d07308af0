#!/usr/bin/env bash
# One GPU call of the "LoRA Without Regret" reproduction (bench/literature.py): pretrains the
# ~125M base on first use (cached in /tmp/hcache while the machine stays warm), then trains the
# grids until DEADLINE seconds have passed; a later call on the same warm machine goes on where
# this one stopped. Usage: bash bench/gpu_literature.sh DEADLINE_S [extra literature.py args]
set -u
DEADLINE=${1:-480}; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout $((DEADLINE + 100)) python3 bench/literature.py run --out /tmp/literature --deadline-s "$DEADLINE" "$@" 2>&1 \
  | grep -v -e "Enum subclass" -e "Loading weights" -e "kernels-community" | tee "$OUT/run.log" | tail -40
cp /tmp/literature/runs.jsonl /tmp/literature/base.json "$OUT/" 2>/dev/null
cp /tmp/hcache/models/*/pretrain.json "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader >> "$OUT/gpu.txt"
