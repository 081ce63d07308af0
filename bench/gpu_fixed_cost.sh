#!/usr/bin/env bash
# Issue 4's fixed cost per 7B trial on one GPU, part by part, all in one call (same card):
#  1. sweeps/mistral7b-packed.yaml, 3 trials, start_method auto (= standby on a GPU host)
#  2. the same sweep, 2 trials, start_method spawn (each trial imports for itself): the baseline
#  3. bench/standalone_unsloth.py: the bare Unsloth loop, for the trial / standalone tokens/s ratio
# nvidia-smi samples which processes hold GPU memory (the standby's CUDA context shows there).
# Wheels come from .whl (../shared/gpu-wheelhouse.sh). Study files land in $OUT; tables are made
# where polars is: harness report, or bench/fixed_cost_table.py.
unset PYTHONDONTWRITEBYTECODE
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "from harness.worker.prepare import build_preset; build_preset('mistral-7b-v0.3', 0)" >/dev/null 2>&1
nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv,noheader -l 1 > "$OUT/gpu-apps.csv" &
timeout 240 python3 -m harness.cli run sweeps/mistral7b-packed.yaml --n-trials 3 --results-dir /tmp/res 2>&1 | tail -5
python3 -c "
import yaml; s = yaml.safe_load(open('sweeps/mistral7b-packed.yaml'))
s.update(study='mistral7b-packed-spawn', start_method='spawn'); yaml.safe_dump(s, open('/tmp/spawn.yaml', 'w'))"
timeout 200 python3 -m harness.cli run /tmp/spawn.yaml --n-trials 2 --results-dir /tmp/res 2>&1 | tail -3
kill %1
timeout 120 python3 bench/standalone_unsloth.py /tmp/hcache/models/mistral-7b-v0.3-seed0 2>&1 | tail -1 | tee "$OUT/standalone.json"
for s in mistral7b-packed mistral7b-packed-spawn; do cp /tmp/res/$s/study.db "$OUT/$s.db"; done
tail -c 3000 /tmp/res/mistral7b-packed/trials/1/log.txt > "$OUT/trial1-log.txt"
