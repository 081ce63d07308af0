#!/usr/bin/env bash
# Fixed cost of a 7B trial on a GPU host, part by part (bench/gpu_load_profile.py), once with the
# page cache as the build left it and once more in a fresh process.
unset PYTHONDONTWRITEBYTECODE
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
/usr/bin/time -f "build preset: %e s" python3 -c "from harness.worker.prepare import build_preset; build_preset('mistral-7b-v0.3', 0)" 2>&1 | tail -1
ls -la /tmp/hcache/models/mistral-7b-v0.3-seed0
timeout 280 python3 bench/gpu_load_profile.py /tmp/hcache/models/mistral-7b-v0.3-seed0 "$OUT" 2>&1 | grep -v Warning | tail -25
HF_ENABLE_PARALLEL_LOADING=true timeout 150 python3 -c "
import time, unsloth, torch; from unsloth import FastLanguageModel
t=time.perf_counter(); m,_=FastLanguageModel.from_pretrained('/tmp/hcache/models/mistral-7b-v0.3-seed0', max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=False)
print('parallel loading from_pretrained', round(time.perf_counter()-t,2))" 2>&1 | tail -1
