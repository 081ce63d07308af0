#!/usr/bin/env bash
# Issue 12 on one GPU (the device tool), one call:
#   1. the same config and seed run 3 times, each in its own process (sweeps/repro7b.yaml): the tolerance;
#   2. the same config with seeds: 3 (seeds 0, 1, 2): the noise between seeds;
#   3. a time-to-target study, 4 learning rates on a grid, target = the loss run 1 reached at 30k tokens.
# Wheels from .whl (../shared/gpu-wheelhouse.sh). Storages and logs come back in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # run NAME SWEEP [extra yaml as python dict updates]
  local name=$1 sweep=$2 patch=$3
  python3 - "$sweep" "$name" "$patch" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])); cfg["study"] = sys.argv[2]; cfg.update(eval(sys.argv[3]))
open(f"/tmp/{sys.argv[2]}.yaml", "w").write(yaml.safe_dump(cfg))
PY
  timeout "${STUDY_TIMEOUT:-240}" python3 -m harness.cli run "/tmp/$name.yaml" --results-dir /tmp/res 2>&1 | tee "$OUT/$name.log"
  cp "/tmp/res/$name/study.db" "$OUT/$name.db"
}
run repro sweeps/repro7b.yaml '{}'
run noise sweeps/repro7b.yaml '{"n_trials": 1, "seeds": 3}'
target=$(python3 - <<'PY'
import optuna
t = optuna.load_study(study_name="repro", storage="sqlite:////tmp/res/repro/study.db").trials[0]
print(round(t.intermediate_values[30000], 3))
PY
)
echo "time-to-target: target val_loss $target (trial 0 of repro at 30,000 tokens)" | tee "$OUT/ttt-target.txt"
run ttt sweeps/repro7b.yaml "{'n_trials': 4, 'sampler': {'name': 'grid'}, 'budget': {'tokens': 60000, 'eval_every': 5000, 'timing_warmup_steps': 3}, 'objective': {'metric': 'time_to_target', 'target': $target, 'measure': 'tokens'}, 'search_space': {'batch_size': 4, 'grad_accum': 1, 'learning_rate': {'choices': [1e-4, 3e-4, 1e-3, 3e-3]}, 'lora_r': 16, 'lora_alpha': 16}}"
