#!/usr/bin/env bash
# The 7B load with and without gc.freeze() (bench/load_gc_freeze.py), alternating, on one GPU.
unset PYTHONDONTWRITEBYTECODE
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
python3 -c "from harness.worker.prepare import build_preset; build_preset('mistral-7b-v0.3', 0)" >/dev/null 2>&1
for m in nofreeze freeze nofreeze freeze; do python3 bench/load_gc_freeze.py /tmp/hcache/models/mistral-7b-v0.3-seed0 $m 2>/dev/null | tail -1 | tee -a $OUT/gc_freeze.jsonl; done
