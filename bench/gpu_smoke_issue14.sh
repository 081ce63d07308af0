#!/usr/bin/env bash
# One GPU call: the demo (pretrained tiny base, built on the GPU) and the three-objective demo
# variant on the GPU, with the memory predictor on (NVML): every trial's predicted and measured peak.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" || true
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache-smoke PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
rm -rf /tmp/smoke
timeout 250 python3 -m harness.cli run sweeps/demo.yaml --results-dir /tmp/smoke --n-trials 3 2>&1 | tail -25 | tee "$OUT/demo.log"
timeout 250 python3 -m harness.cli run sweeps/demo-multi.yaml --results-dir /tmp/smoke --n-trials 6 2>&1 | tail -40 | tee "$OUT/multi.log"
for s in demo demo-multi; do cp /tmp/smoke/$s/study.db "$OUT/$s.db" 2>/dev/null; done
