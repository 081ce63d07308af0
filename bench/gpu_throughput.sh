#!/usr/bin/env bash
# Issue 16 on one H100 (the device tool), one call, under 560 s: a throughput-aware sweep against
# Unsloth's own default. sweeps/throughput7b.yaml searches batch size, accumulation, learning rate,
# packing and length grouping on the variable-length speeches (random-init Mistral-7B-v0.3, bf16
# LoRA r16, Unsloth's gradient checkpointing, 16,000 training tokens per trial) with two
# objectives, validation loss and non-padding tokens/s; its first trial is the config Unsloth's
# SFT trainer runs by default (enqueued). Then that trainer itself, on the same rows, the same
# config (trial 0's) and the same token budget (bench/gpu_packing.py sft --trial 0).
# Outputs in $OUT: gpu.txt, run.log, sft.json, throughput.md, throughput7b.db.
set -u
START=$SECONDS
left() { echo $(( 560 - (SECONDS - START) )); }
source bench/gpu_env.sh
LOG="$OUT/run.log"
SWEEP_S=${SWEEP_S:-320}  # the sweep's share: no trial starts after it (the running one finishes)
python3 - "$SWEEP_S" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("sweeps/throughput7b.yaml"))
cfg["timeout"] = float(sys.argv[1])
open("/tmp/throughput7b.yaml", "w").write(yaml.safe_dump(cfg))
PY
echo "== the throughput-aware sweep ($(left) s left)" | tee -a "$LOG"
timeout $(( SWEEP_S + 90 )) python3 -m harness.cli run /tmp/throughput7b.yaml --results-dir /tmp/res 2>&1 \
  | grep -v '^\[' | tail -80 | tee -a "$LOG"
cp /tmp/res/throughput7b/study.db "$OUT/throughput7b.db" 2>/dev/null
t=$(left); [ "$t" -gt 150 ] && t=150
echo "== Unsloth's SFT trainer on trial 0's config ($(left) s left)" | tee -a "$LOG"
[ "$t" -gt 60 ] && timeout "$t" python3 bench/gpu_packing.py sft /tmp/res/throughput7b --trial 0 --out "$OUT/sft.json" 2>&1 \
  | grep -v -E '^\s*$|Warning|warn\(|it/s\]|s/it\]' | tail -5 | tee -a "$LOG"
python3 bench/gpu_packing.py table /tmp/res/throughput7b --sft "$OUT/sft.json" --out "$OUT/throughput.md" 2>&1 | tee -a "$LOG"
echo "done in $(( SECONDS - START )) s" | tee -a "$LOG"
