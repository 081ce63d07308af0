#!/usr/bin/env bash
# Issue 24 on one GPU, one call: concurrent trials where a trial alone leaves the GPU idle.
#
#   bash bench/gpu_pack.sh        (.whl carried; ../shared/gpu-wheelhouse.sh built it)
#
# 1. The 7B preset built and the speeches tokenized (sweeps/concurrent7b.yaml).
# 2. The probe (bench/pack_probe.py): one optimizer step of K trials together on the pack path,
#    K = 1, 2, 4, 8, 16, 32, 2 rows x 48 tokens each, against one trial on Unsloth's own path.
# 3. On a resident warm worker (`harness warm up`): SOLO trials of the sweep one at a time (its two
#    enqueued configs), then PACK trials with concurrent_trials: PACK (the same two first, then the
#    sampler's), each 16,000 tokens at batch 2 x accumulation 4. Trials per hour from each study's
#    recorded run; every trial's attributes in studies.json.
set -u
SOLO=${SOLO:-2}
PACK=${PACK:-16}
LIMIT_S=${LIMIT_S:-560}
SWEEP=sweeps/concurrent7b.yaml
OUT=${OUT:-/tmp/pack-out}
RES=/tmp/pack-results
PY=python3
mkdir -p "$OUT"; rm -rf "$RES"
source bench/gpu_env.sh
export PYTHONPATH=/tmp/site:$PWD
trap '"$PY" -m harness.cli warm down >/dev/null 2>&1' EXIT

timeout 240 "$PY" bench/efficiency_table.py prepare "$SWEEP" > "$OUT/prepare.txt" 2>&1 &
prep=$!
"$PY" -m harness.cli warm up --gpus 0 --timeout 240 2>&1 | tee -a "$OUT/runs.txt"
wait $prep
MODEL=$(tail -1 "$OUT/prepare.txt")
echo "prepared $MODEL after ${SECONDS}s" | tee -a "$OUT/runs.txt"

# The probe runs beside the idle resident worker (the GPU holds both bases: 2 x 14.5 GB).
timeout 240 "$PY" bench/pack_probe.py "$MODEL" "$OUT/probe.json" --ks 1,2,4,8,16,32 --rows 2 --tokens 48 \
  > "$OUT/probe.txt" 2>&1
echo "probe rc=$? after ${SECONDS}s" | tee -a "$OUT/runs.txt"

variant() {  # variant NAME CONCURRENT N_TRIALS: the sweep with those set
  "$PY" - "$SWEEP" "/tmp/$1.yaml" "$1" "$2" "$3" <<'PY'
import sys, yaml
src, dst, name, k, n = sys.argv[1:]
sweep = yaml.safe_load(open(src))
sweep.update(study=name, concurrent_trials=int(k), n_trials=int(n))
open(dst, "w").write(yaml.safe_dump(sweep, sort_keys=False))
PY
}
study() {  # study NAME CONCURRENT N_TRIALS
  local left=$(( LIMIT_S - SECONDS ))
  if [ "$left" -lt 60 ]; then echo "$1: skipped (${SECONDS}s gone)" | tee -a "$OUT/runs.txt"; return; fi
  variant "$1" "$2" "$3"
  local start=$SECONDS
  timeout -s INT -k 20 "$left" "$PY" bench/efficiency_table.py run run "/tmp/$1.yaml" --results-dir "$RES" --no-figures \
    > "$OUT/$1.log" 2>&1
  echo "$1: rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/runs.txt"
  grep "sweep efficiency" "$OUT/$1.log" | tail -1 >> "$OUT/runs.txt"
}
study solo "1" "$SOLO"
study pack "$PACK" "$PACK"
"$PY" -m harness.cli warm down | tee -a "$OUT/runs.txt"
cp "$HARNESS_CACHE"/workers/*.log "$OUT/worker.log" 2>/dev/null

"$PY" - "$RES" "$OUT/studies.json" <<'PY'
import json, sys
from pathlib import Path
import optuna
out = {}
for db in sorted(Path(sys.argv[1]).glob("*/study.db")):
    study = optuna.load_study(study_name=db.parent.name, storage=f"sqlite:///{db}")
    out[db.parent.name] = {"runs": study.user_attrs.get("sweep_runs"), "trials": [
        {"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
         "duration_s": t.duration.total_seconds() if t.duration else None, **t.user_attrs} for t in study.trials]}
json.dump(out, open(sys.argv[2], "w"), indent=1, default=str)
PY
tar czf "$OUT/logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls *.log 2>/dev/null) && rm -f "$OUT"/*.log
echo "done after ${SECONDS}s" | tee -a "$OUT/runs.txt"
