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
NAME=resident
source bench/study_calls.sh
prepare_beside_warm_up 0

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
for method in $THEN; do study "$method-20s" "$TRIALS" 20 "$method" until; done

finish
