#!/usr/bin/env bash
# Issue 15: sweep efficiency with resident warm workers (`harness warm up`) against a study's own
# warm worker, one GPU, one call:
#
#   bash bench/gpu_resident.sh
#
# sweeps/mistral7b-packed.yaml (7B preset, batch 4 x 2048 packed, every trial the same config),
# studies of TRIALS trials (default 8):
#   1. prepare (the preset built, the data tokenized) beside `harness warm up --gpus 0` (its import);
#   2. resident-first: the resident worker's first study on this model, 2 trials of 5 steps (it
#      loads the base and compiles);
#   3. resident-20s, resident-5s: the studies the goals are about (TRIALS trials of 20, then 5 steps);
#   4. `harness warm down`; then own-5s and own-20s: the same studies, each starting its own warm
#      worker (the default without `warm up`), with the on-disk compile caches already filled
#      (SKIP="own-20s" leaves one out);
#   5. THEN="standby spawn": a 20-step study per start method named, each while time is left.
# A study that would not end before LIMIT_S (default 570 s) is skipped. Table from the Optuna
# storages (bench/efficiency_table.py): efficiency, fixed_s first / later, warm-up, trials/hour.
# Dry run on CPU: DRY=1 SWEEP=<a CPU sweep> PYTHON=.venv/bin/python OUT=/tmp/res-out bash bench/gpu_resident.sh
set -u
TRIALS=${TRIALS:-8}
LIMIT_S=${LIMIT_S:-570}
SWEEP=${SWEEP:-sweeps/mistral7b-packed.yaml}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/resident-out}
RES=/tmp/resident-results
LOGS=/tmp/resident-logs   # each study's log, and the workers': one logs.tar.gz (the device returns 8 files)
mkdir -p "$OUT"; rm -rf "$RES" "$LOGS"; mkdir -p "$LOGS"
if [ -z "${DRY:-}" ]; then
  source bench/gpu_env.sh
  GPUS="--gpus 0"
else
  export HARNESS_CACHE=${HARNESS_CACHE:-/tmp/resident-cache} WANDB_MODE=disabled PYTHONUNBUFFERED=1
  GPUS=""
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
trap '"$PY" -m harness.cli warm down >/dev/null 2>&1' EXIT

timeout 200 "$PY" bench/efficiency_table.py prepare "$SWEEP" > "$LOGS/prepare.txt" 2>&1 &
prep=$!
"$PY" -m harness.cli warm up $GPUS --timeout 200 2>&1 | tee "$OUT/runs.txt"
wait $prep
echo "ready after ${SECONDS}s" | tee -a "$OUT/runs.txt"

# study NAME TRIALS STEPS START_METHOD EXPECTED_S: run it unless it would end after LIMIT_S.
study() {
  local name=$1 trials=$2 steps=$3 method=$4 expected=$5
  if [ $(( SECONDS + expected )) -gt "$LIMIT_S" ]; then
    echo "$name: skipped (${SECONDS}s gone, ~${expected}s needed)" | tee -a "$OUT/runs.txt"
    return
  fi
  "$PY" bench/efficiency_table.py sweep "$SWEEP" "/tmp/$name.yaml" --study "$name" --trials "$trials" --steps "$steps" \
    --start-method "$method"
  local start=$SECONDS
  timeout -s INT -k 20 $(( LIMIT_S - SECONDS )) "$PY" bench/efficiency_table.py run run "/tmp/$name.yaml" \
    --results-dir "$RES" > "$LOGS/$name.log" 2>&1
  echo "$name: rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/runs.txt"
  grep "sweep efficiency" "$LOGS/$name.log" | tail -1 >> "$OUT/runs.txt"
}

# study_until NAME STEPS START_METHOD: TRIALS trials, but none started after the time left (less
# one trial's length) and Ctrl-C at LIMIT_S: a start method too slow to run them all in the call.
study_until() {
  local name=$1 steps=$2 method=$3 left=$(( LIMIT_S - SECONDS ))
  if [ "$left" -lt 90 ]; then
    echo "$name: skipped (${left}s left)" | tee -a "$OUT/runs.txt"
    return
  fi
  "$PY" bench/efficiency_table.py sweep "$SWEEP" "/tmp/$name.yaml" --study "$name" --trials "$TRIALS" --steps "$steps" \
    --start-method "$method" --timeout $(( left - steps - 45 ))
  local start=$SECONDS
  timeout -s INT -k 20 "$left" "$PY" bench/efficiency_table.py run run "/tmp/$name.yaml" --results-dir "$RES" \
    > "$LOGS/$name.log" 2>&1
  echo "$name: rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/runs.txt"
  grep "sweep efficiency" "$LOGS/$name.log" | tail -1 >> "$OUT/runs.txt"
}

SKIP=${SKIP:-}   # studies to leave out, e.g. SKIP="own-20s"
THEN=${THEN:-}   # start methods to run last, each while time is left, e.g. THEN="standby spawn"
skip() { case " $SKIP " in *" $1 "*) echo "$1: left out (SKIP)" | tee -a "$OUT/runs.txt"; return 0;; esac; return 1; }

study resident-first 2 5 warm 90
study resident-20s "$TRIALS" 20 warm 170
study resident-5s "$TRIALS" 5 warm 70
"$PY" -m harness.cli warm status >> "$OUT/runs.txt" 2>&1
"$PY" -m harness.cli warm down | tee -a "$OUT/runs.txt"
skip own-5s || study own-5s "$TRIALS" 5 warm 90
skip own-20s || study own-20s "$TRIALS" 20 warm 190
for method in $THEN; do study_until "$method-20s" 20 "$method"; done

"$PY" bench/efficiency_table.py table "$RES" --json "$OUT/table.json" | tee "$OUT/table.md"
cp "$HARNESS_CACHE"/workers/*.log "$LOGS/" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
tar czf "$OUT/studies.tar.gz" -C "$RES" --exclude=best --exclude=weights --exclude=wandb . 2>/dev/null
echo "done after ${SECONDS}s"
