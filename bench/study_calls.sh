# Sourced by bench/gpu_resident.sh and bench/gpu_pool.sh (studies of one sweep in one device call):
# their settings, the device's setup (bench/gpu_env.sh; DRY=1 for a dry run on CPU), and
#   prepare_beside_warm_up [GPUS]   the preset built and data tokenized; with GPUS (or on CPU, any
#                                   word), `harness warm up` beside it
#   study NAME TRIALS STEPS START_METHOD EXPECTED_S|until [GPUS [VAR=VALUE...]]
#                                   one study of the sweep, skipped if it would not end before
#                                   LIMIT_S; "until": no trial started after the time left less one
#                                   trial, for a start method too slow to run them all in the call
#   finish                          the tables, and the logs and studies packed (8 files come back)
# The caller sets NAME (its folders: /tmp/NAME-results, /tmp/NAME-logs) before sourcing.
set -u
TRIALS=${TRIALS:-8}
LIMIT_S=${LIMIT_S:-570}
SWEEP=${SWEEP:-sweeps/mistral7b-packed.yaml}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/$NAME-out}
RES=/tmp/$NAME-results
LOGS=/tmp/$NAME-logs   # each study's log, and the workers'
mkdir -p "$OUT"; rm -rf "$RES" "$LOGS"; mkdir -p "$LOGS"
if [ -z "${DRY:-}" ]; then
  source bench/gpu_env.sh
else
  export HARNESS_CACHE=${HARNESS_CACHE:-/tmp/$NAME-cache} WANDB_MODE=disabled PYTHONUNBUFFERED=1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
trap '"$PY" -m harness.cli warm down >/dev/null 2>&1' EXIT

prepare_beside_warm_up() {
  timeout 200 "$PY" bench/efficiency_table.py prepare "$SWEEP" > "$LOGS/prepare.txt" 2>&1 &
  local prep=$!
  if [ -n "${1:-}" ]; then
    local gpus="--gpus $1"
    [ -n "${DRY:-}" ] && gpus=""   # a CPU host has one CPU worker
    "$PY" -m harness.cli warm up $gpus --timeout 200 2>&1 | tee -a "$OUT/runs.txt"
  fi
  wait $prep
  echo "ready after ${SECONDS}s" | tee -a "$OUT/runs.txt"
}

study() {
  local name=$1 trials=$2 steps=$3 method=$4 expected=$5 gpus=${6:-} left=$(( LIMIT_S - SECONDS )) until=""
  shift $(( $# < 6 ? $# : 6 ))
  if [ "$expected" = until ]; then
    [ "$left" -ge 90 ] && until="--timeout $(( left - steps - 45 ))"
    expected=$(( left < 90 ? left + 1 : 0 ))
  fi
  if [ "$expected" -gt "$left" ]; then
    echo "$name: skipped (${SECONDS}s gone, ~${expected}s needed)" | tee -a "$OUT/runs.txt"
    return
  fi
  "$PY" bench/efficiency_table.py sweep "$SWEEP" "/tmp/$name.yaml" --study "$name" --trials "$trials" --steps "$steps" \
    --start-method "$method" $until
  local start=$SECONDS
  timeout -s INT -k 20 "$left" env "$@" "$PY" bench/efficiency_table.py run run "/tmp/$name.yaml" --results-dir "$RES" \
    ${gpus:+--gpus "$gpus"} > "$LOGS/$name.log" 2>&1
  echo "$name: rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/runs.txt"
  grep "sweep efficiency" "$LOGS/$name.log" | tail -1 >> "$OUT/runs.txt"
}

finish() {
  "$PY" bench/efficiency_table.py table "$RES" --json "$OUT/table.json" | tee "$OUT/table.md"
  cp "$HARNESS_CACHE"/workers/*.log "$LOGS/" 2>/dev/null
  tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
  tar czf "$OUT/studies.tar.gz" -C "$RES" --exclude=best --exclude=weights --exclude=wandb . 2>/dev/null
  echo "done after ${SECONDS}s"
}
