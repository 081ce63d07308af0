#!/usr/bin/env bash
# Issue 15, "Measure it": how much of the GPU's time a sweep spends training, by start method, on
# one GPU in one call:
#
#   bash bench/gpu_efficiency.sh standby spawn        # any start methods, passed through as given
#   STEPS="20 5" bash bench/gpu_efficiency.sh warm standby spawn
#
# Per start method (and per STEPS value): sweeps/mistral7b-packed.yaml (7B preset, batch 4 x 2048,
# packed) as a study of its own, eff-<method>-<steps>s, of TRIALS trials (default 8) of STEPS
# optimizer steps (default 20), every trial the same config. Then one table, a row per study, from
# the Optuna storages alone (bench/efficiency_table.py: no polars here): sweep efficiency, training
# and wall GPU-seconds, fixed_s and warmup_s (mean, and the first trial's), trials per hour; and a
# table per study of its trials.
#
# The model is built and the data tokenized once before the studies (the cache), and unsloth is
# imported once (the page cache), so the first method measured does not pay for them alone.
# The call stays within BUDGET_S (default 540 s): each study gets an equal share of the time left.
# It starts no trial after its share less one trial's estimated length (the sweep's timeout), and
# gets Ctrl-C at its share (its trials and its run are still recorded); a study cut short still
# gives its efficiency, over the trials it ran (the table says how many).
#
# Outputs in $OUT: gpu.txt, runs.txt (each study's exit code and wall time, and its last lines),
# table.md, table.json (every figure, and each trial's), studies.tar.gz (each study's folder:
# study.db, study.json, sweep.json, trial logs; `harness report DIR` makes its tables where polars is).
# On CPU, for a dry run: SWEEP=<a CPU sweep file> PYTHON=.venv/bin/python OUT=/tmp/eff bash bench/gpu_efficiency.sh fork spawn
set -u
BUDGET_S=${BUDGET_S:-540}
TRIALS=${TRIALS:-8}
STEPS=${STEPS:-20}
SWEEP=${SWEEP:-sweeps/mistral7b-packed.yaml}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/eff-out}
RES=${RES:-/tmp/eff-results}
[ $# -gt 0 ] || set -- standby spawn
mkdir -p "$OUT"
rm -rf "$RES"
unset PYTHONDONTWRITEBYTECODE   # the first import writes .pyc files: later ones skip compiling
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # this checkout's harness, whatever else is installed
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists"
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
  HARNESS_CACHE=${HARNESS_CACHE:-/tmp/hcache} PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU") \
  | tee "$OUT/gpu.txt"

timeout 120 "$PY" -c "import unsloth" >/dev/null 2>&1 &
warm=$!
timeout 200 "$PY" bench/efficiency_table.py prepare "$SWEEP" || echo "prepare failed: each study prepares for itself"
wait $warm
echo "ready after ${SECONDS}s" | tee "$OUT/runs.txt"

n_steps=$(echo $STEPS | wc -w)
left_studies=$(( $# * n_steps ))
for steps in $STEPS; do
  for method in "$@"; do
    share=$(( (BUDGET_S - SECONDS - 20) / left_studies ))   # 20 s kept for the tables
    left_studies=$(( left_studies - 1 ))
    name="eff-$method-${steps}s"
    if [ "$share" -lt 60 ]; then
      echo "$name: skipped, ${share}s left for it" | tee -a "$OUT/runs.txt"
      continue
    fi
    # A trial started just before the sweep's timeout must end before the share does: ~0.75 s a
    # step on an H100, validation and teardown, after its fixed cost (spawned: ~25 s to the first
    # step; a standby: ~6 s, bench/RESULTS.md).
    case "$method" in spawn) last=$(( 40 + steps ));; *) last=$(( 20 + steps ));; esac
    no_new=$(( share - last > 30 ? share - last : 30 ))
    sweep="$(dirname "$SWEEP")/$name-tmp.yaml"
    "$PY" bench/efficiency_table.py sweep "$SWEEP" "$sweep" --study "$name" --trials "$TRIALS" --steps "$steps" \
      --start-method "$method" --timeout "$no_new"
    start=$SECONDS
    timeout -s INT -k 30 "$share" "$PY" bench/efficiency_table.py run run "$sweep" --results-dir "$RES" \
      > "/tmp/$name.log" 2>&1
    rc=$?
    { echo "$name: rc=$rc wall=$((SECONDS - start))s (share ${share}s, no new trial after ${no_new}s)"
      tail -4 "/tmp/$name.log"; } | tee -a "$OUT/runs.txt"
    rm -f "$sweep"
  done
done

"$PY" bench/efficiency_table.py table "$RES" --json "$OUT/table.json" | tee "$OUT/table.md"
tar czf "$OUT/studies.tar.gz" -C "$RES" --exclude=best --exclude=weights --exclude=wandb . 2>/dev/null
echo "done after ${SECONDS}s"
