#!/usr/bin/env bash
# Issue 23: the house as it is now (the driver the only Optuna client, workers on one channel)
# against the code before it (e19d3d3), one GPU, one call, the same studies of bench/gpu_resident.sh
# on resident workers:
#
#   git archive e19d3d3 harness bench sweeps | (mkdir -p .old && tar -x -C .old)   # here, once
#   bash bench/gpu_house.sh                                                        # there, .old and .whl carried
#
# sweeps/mistral7b-packed.yaml (7B preset, batch 4 x 2048 packed, every trial the same config).
# For each version in turn (VERSIONS, default "before now"): `harness warm up --gpus 0`, then
# resident-first (2 trials of 5 steps: the worker loads the base and compiles), resident-20s and
# resident-5s (TRIALS trials of 20 and of 5 steps), `harness warm down`. The model is built and the
# data tokenized once, before both. Tables per version from its own Optuna storages
# (bench/efficiency_table.py of that version).
# Dry run on CPU: DRY=1 SWEEP=<a CPU sweep> PYTHON=.venv/bin/python OUT=/tmp/house-out bash bench/gpu_house.sh
set -u
TRIALS=${TRIALS:-6}
LIMIT_S=${LIMIT_S:-560}
SWEEP=${SWEEP:-sweeps/mistral7b-packed.yaml}
VERSIONS=${VERSIONS:-before now}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/house-out}
ROOT=$PWD
mkdir -p "$OUT"
if [ -z "${DRY:-}" ]; then
  source bench/gpu_env.sh
  SITE=/tmp/site:
else
  export HARNESS_CACHE=${HARNESS_CACHE:-/tmp/house-cache} WANDB_MODE=disabled PYTHONUNBUFFERED=1
  SITE=
fi

tree() { [ "$1" = before ] && echo "$ROOT/.old" || echo "$ROOT"; }

# The model built and the data tokenized once (by today's code), into the shared cache.
(cd "$ROOT" && PYTHONPATH=$SITE$ROOT timeout 300 "$PY" bench/efficiency_table.py prepare "$SWEEP") \
  > "$OUT/prepare.txt" 2>&1
echo "prepared after ${SECONDS}s (rc=$?)" | tee -a "$OUT/runs.txt"

study() {  # study VERSION NAME TRIALS STEPS EXPECTED_S
  local ver=$1 name=$2 trials=$3 steps=$4 expected=$5 left=$(( LIMIT_S - SECONDS )) dir
  dir=$(tree "$ver")
  if [ "$expected" -gt "$left" ]; then
    echo "$ver $name: skipped (${SECONDS}s gone, ~${expected}s needed)" | tee -a "$OUT/runs.txt"
    return
  fi
  (cd "$dir" && PYTHONPATH=$SITE$dir "$PY" bench/efficiency_table.py sweep "$ROOT/$SWEEP" "/tmp/$ver-$name.yaml" \
     --study "$name" --trials "$trials" --steps "$steps" --start-method warm)
  local start=$SECONDS
  (cd "$dir" && PYTHONPATH=$SITE$dir timeout -s INT -k 20 "$left" "$PY" bench/efficiency_table.py run run \
     "/tmp/$ver-$name.yaml" --results-dir "/tmp/house-$ver") > "$OUT/$ver-$name.log" 2>&1
  echo "$ver $name: rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/runs.txt"
  grep "sweep efficiency" "$OUT/$ver-$name.log" | tail -1 >> "$OUT/runs.txt"
}

for ver in $VERSIONS; do
  dir=$(tree "$ver")
  rm -rf "/tmp/house-$ver"
  gpus="--gpus 0"; [ -n "${DRY:-}" ] && gpus=""
  mode=""; [ -n "${DRY:-}" ] && [ "$ver" = now ] && mode="--mode warm"  # a CPU host's default is fork now
  (cd "$dir" && PYTHONPATH=$SITE$dir "$PY" -m harness.cli warm up $gpus $mode --timeout 200) 2>&1 | tee -a "$OUT/runs.txt"
  study "$ver" resident-first 2 5 90
  study "$ver" resident-20s "$TRIALS" 20 130
  study "$ver" resident-5s "$TRIALS" 5 50
  (cd "$dir" && PYTHONPATH=$SITE$dir "$PY" -m harness.cli warm down) 2>&1 | tee -a "$OUT/runs.txt"
  cp "$HARNESS_CACHE"/workers/*.log "$OUT/$ver-worker.log" 2>/dev/null
  (cd "$dir" && PYTHONPATH=$SITE$dir "$PY" bench/efficiency_table.py table "/tmp/house-$ver" \
     --json "$OUT/$ver-table.json") > "$OUT/$ver-table.md" 2>&1
  rm -f "$HARNESS_CACHE"/workers/*.log
done
tar czf "$OUT/logs.tar.gz" -C "$OUT" --exclude=logs.tar.gz $(cd "$OUT" && ls *.log prepare.txt 2>/dev/null)
rm -f "$OUT"/*.log
echo "done after ${SECONDS}s" | tee -a "$OUT/runs.txt"
