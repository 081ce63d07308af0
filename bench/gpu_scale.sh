#!/usr/bin/env bash
# Issues 6 and 7 on a 4-GPU host, in one call (7B preset, sweeps/scale7b.yaml):
#   A: GPU pool on GPU 0 alone (2 trials)  ||  one trial across GPUs 2,3 (gpus_per_trial 2)
#   B: GPU pool on GPUs 0-3 (4 trials)
#   C: one trial across GPUs 0-3 (gpus_per_trial 4)
# Trials per hour come from the storage (first start to last end); tokens/s and memory per GPU
# from each trial's metrics. Outputs land in $OUT.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
unset PYTHONDONTWRITEBYTECODE   # let the first import write .pyc files: later imports skip compiling
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
(python3 -c "import unsloth" >/dev/null 2>&1 &)   # warm the bytecode cache meanwhile
python3 -c "from harness.worker.prepare import build_preset; build_preset('mistral-7b-v0.3', 0)" >/dev/null 2>&1
for k in 2 4; do
  sed "s/^n_trials: 4/n_trials: 1\ngpus_per_trial: $k/; s/^study: scale7b/study: ddp$k/" sweeps/scale7b.yaml > "sweeps/ddp$k-tmp.yaml"
done
run() {  # run NAME TIMEOUT SWEEP ARGS...
  local name=$1 t=$2 sweep=$3 s=$SECONDS; shift 3
  timeout "$t" python3 -m harness.cli run "$sweep" --results-dir "/tmp/r-$name" "$@" > "/tmp/$name.log" 2>&1
  echo "$name rc=$? wall=$((SECONDS - s))s" | tee -a "$OUT/runs.txt"
}
run pool1 110 sweeps/scale7b.yaml --gpus 0 --n-trials 2 &
run ddp2 110 sweeps/ddp2-tmp.yaml --gpus 2,3 &
wait
run pool4 100 sweeps/scale7b.yaml --gpus 0,1,2,3 --n-trials 4
run ddp4 100 sweeps/ddp4-tmp.yaml --gpus 0,1,2,3
tail -25 /tmp/r-ddp4/ddp4/trials/0/log.txt > "$OUT/ddp4-trial-log.txt" 2>/dev/null
tail -25 /tmp/r-ddp2/ddp2/trials/0/log.txt > "$OUT/ddp2-trial-log.txt" 2>/dev/null
python3 - <<'PY' > "$OUT/summary.json"
import glob, json, optuna
out = {}
for db in sorted(glob.glob("/tmp/r-*/*/study.db")):
    name = db.split("/")[2].removeprefix("r-")
    study = optuna.load_study(study_name=db.split("/")[3], storage=f"sqlite:///{db}")
    ts = [t for t in study.trials if t.datetime_complete]
    span = (max(t.datetime_complete for t in ts) - min(t.datetime_start for t in ts)).total_seconds() if ts else None
    keys = ("outcome", "tokens_per_s", "tokens_per_s_per_gpu", "peak_mem_mib", "peak_mem_mib_per_gpu",
            "peak_alloc_mib", "world_size", "import_s", "load_s", "train_s", "gpu_name", "fail_reason")
    out[name] = {"trials": [{k: t.user_attrs.get(k) for k in keys} | {"state": t.state.name,
                 "duration_s": t.duration.total_seconds() if t.duration else None} for t in study.trials],
                 "span_s": span, "trials_per_hour": len(ts) / span * 3600 if span else None}
print(json.dumps(out, indent=1))
PY
python3 -c "
import json; d=json.load(open('$OUT/summary.json'))
for k, v in d.items(): print(k, 'trials/h', v['trials_per_hour'] and round(v['trials_per_hour']), [(t['state'], t['tokens_per_s'], t['peak_mem_mib_per_gpu'] or t['peak_mem_mib'], t['duration_s']) for t in v['trials']])"
