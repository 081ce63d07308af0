#!/usr/bin/env bash
# Issue 4 on one GPU (the device tool), all in one call so every number shares a card:
#  1. harness bench bench/mistral7b.yaml: Unsloth and the HF + PEFT baseline, checkpointing on/off
#  2. bench/standalone_unsloth.py against one harness trial (sweeps/mistral7b-packed.yaml), same B x L
# BENCH_ONLY=1 stops after 1. Wheels come from .whl (../shared/gpu-wheelhouse.sh). Outputs land in $OUT.
unset PYTHONDONTWRITEBYTECODE  # the device host sets it: every import would compile unsloth again
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "
import time; t=time.time()
from harness.worker.prepare import build_preset
print('model', build_preset('mistral-7b-v0.3', 0), 'built in %.1fs' % (time.time()-t))" 2>&1 | grep -v Warning | tail -2
timeout "${BENCH_TIMEOUT:-330}" python3 -m harness.cli bench bench/mistral7b.yaml --repeats "${REPEATS:-1}" \
  --out /tmp/bench --save-baseline "$OUT/mistral7b-baseline.json" 2>&1 | grep -v '^\[' | tee "$OUT/bench.log"
cp /tmp/bench/report.md "$OUT/bench-report.md" 2>/dev/null
cp /tmp/bench/results.json "$OUT/bench-results.json" 2>/dev/null
[ -n "$BENCH_ONLY" ] && exit 0
timeout 150 python3 bench/standalone_unsloth.py /tmp/hcache/models/mistral-7b-v0.3-seed0 2>&1 | tail -1 | tee "$OUT/standalone.json"
timeout 200 python3 -m harness.cli run sweeps/mistral7b-packed.yaml --results-dir /tmp/res 2>&1 | tail -4
cp /tmp/res/mistral7b-packed/trials/0/result.json "$OUT/trial.json" 2>/dev/null
cp /tmp/res/mistral7b-packed/study.db "$OUT/mistral7b-packed.db" 2>/dev/null
echo done
