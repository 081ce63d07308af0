#!/usr/bin/env bash
# Issue 16 on one H100 (the device tool), one call, under 550 s: packing on variable-length data
# (the embedded Shakespeare speeches, median 25 tokens), random-init Mistral-7B-v0.3, bf16 LoRA
# r16 alpha 16, Unsloth's gradient checkpointing, batch 2 x accumulation 4, 16,000 tokens.
#  (b) sweeps/packing7b.yaml: one harness trial per packing mode (none, padding_free, naive):
#      non-padding tokens/s, peak memory, validation loss, padding fraction;
#  (a) bench/gpu_packing.py sft: Unsloth's own SFT trainer on the same rows and config, its
#      defaults otherwise (padding_free unset), to the same token budget, validated like a trial;
#  then, if time is left, the token-capped variant (<= 512 tokens per micro-batch, the size of
#      a naive-packed micro-batch here): padding_free, and none with length-grouped batching.
# Wheels come from .whl (../shared/gpu-wheelhouse.sh: it has datasets, which trl's SFTTrainer
# imports; the host's image has the pandas, xxhash and fsspec that datasets needs). Outputs in $OUT:
# gpu.txt, run.log, sft.json, packing.md, and the studies' storages.
set -u
START=$SECONDS
left() { echo $(( 530 - (SECONDS - START) )); }  # seconds left of the call's budget, with a margin
source bench/gpu_env.sh
LOG="$OUT/run.log"
python3 -c "import torch, transformers, trl, peft, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)" 2>&1 \
  | tail -1 | tee -a "$OUT/gpu.txt"

echo "== (b) harness trials, one per packing mode ($(left) s left)" | tee -a "$LOG"
timeout 290 python3 -m harness.cli run sweeps/packing7b.yaml --results-dir /tmp/res 2>&1 | grep -v '^\[' | tail -30 | tee -a "$LOG"
cp /tmp/res/packing7b/study.db "$OUT/packing7b.db" 2>/dev/null

echo "== (a) Unsloth's SFT trainer, same rows and config ($(left) s left)" | tee -a "$LOG"
t=$(left); [ "$t" -gt 180 ] && t=180
[ "$t" -gt 60 ] && timeout "$t" python3 bench/gpu_packing.py sft /tmp/res/packing7b --out "$OUT/sft.json" 2>&1 \
  | grep -v -E '^\s*$|Warning|warn\(' | tail -40 | tee -a "$LOG"

t=$(left)
echo "== token-capped micro-batches ($t s left)" | tee -a "$LOG"
STUDIES=(/tmp/res/packing7b)
if [ "$t" -gt 70 ]; then
  python3 - <<'PY'
import yaml
cfg = yaml.safe_load(open("sweeps/packing7b.yaml"))
cfg["study"] = "packing7b-capped"
cfg["search_space"].update(packing={"choices": ["padding_free", "none"]}, batching="length_grouped",
                           max_tokens_per_batch=512)
cfg["n_trials"] = 2
open("/tmp/packing7b-capped.yaml", "w").write(yaml.safe_dump(cfg))
PY
  timeout $(( t - 10 )) python3 -m harness.cli run /tmp/packing7b-capped.yaml --results-dir /tmp/res 2>&1 \
    | grep -v '^\[' | tail -15 | tee -a "$LOG"
  cp /tmp/res/packing7b-capped/study.db "$OUT/packing7b-capped.db" 2>/dev/null
  STUDIES+=(/tmp/res/packing7b-capped)
fi
python3 bench/gpu_packing.py table "${STUDIES[@]}" --sft "$OUT/sft.json" --out "$OUT/packing.md" 2>&1 | tee -a "$LOG"
echo "done in $(( SECONDS - START )) s" | tee -a "$LOG"
