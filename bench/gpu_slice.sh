#!/usr/bin/env bash
# Issue 2 on a GPU host (the device tool): a sweep file on the GPU, default sweeps/mistral7b.yaml
# (2 trials of a random-init Mistral-7B-v0.3 shape). Wheels come from .whl
# (../shared/gpu-wheelhouse.sh); the study's storage comes back in $OUT, and `harness report`
# makes the tables on a machine with polars.
#   bash bench/gpu_slice.sh [SWEEP.yaml ...]
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__)"
for sweep in "${@:-sweeps/mistral7b.yaml}"; do
  name=$(basename "$sweep" .yaml)
  timeout "${SLICE_TIMEOUT:-540}" python3 -m harness.cli run "$sweep" --results-dir /tmp/res 2>&1 | tee "$OUT/$name.log"
  cp /tmp/res/*/study.db "$OUT/$name.db" 2>/dev/null
  for f in /tmp/res/*/prepared.json /tmp/res/*/trials/*/result.json /tmp/res/*/trials/*/log.txt; do
    echo "== $f"; tail -20 "$f"; done > "$OUT/$name-trials.txt"
  rm -rf /tmp/res
done
