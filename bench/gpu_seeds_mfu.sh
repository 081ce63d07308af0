#!/usr/bin/env bash
# One GPU call: (1) sweeps/repro7b.yaml with seeds: 3 (each seed's memory freed before the next
# loads), (2) one `harness bench` point of the 7B preset (Unsloth, B4 x L2048, r16, Unsloth's
# checkpointing) for the honest LoRA MFU against the data-sheet and the measured peak.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY'
import yaml
cfg = yaml.safe_load(open("sweeps/repro7b.yaml")); cfg.update(study="noise", n_trials=1, seeds=3)
open("/tmp/noise.yaml", "w").write(yaml.safe_dump(cfg))
bench = yaml.safe_load(open("bench/mistral7b.yaml"))
bench.update(name="mfu7b", repeats=1, steps=6, warmup_steps=3, backends=["unsloth"])
bench["grid"] = {"batch_size": [4], "seq_len": [2048], "lora_r": [16], "gradient_checkpointing": ["unsloth"]}
open("/tmp/mfu7b.yaml", "w").write(yaml.safe_dump(bench))
PY
timeout 300 python3 -m harness.cli run /tmp/noise.yaml --results-dir /tmp/res 2>&1 | tee "$OUT/noise.log"
cp /tmp/res/noise/study.db "$OUT/noise.db"
timeout 240 python3 -m harness.cli bench /tmp/mfu7b.yaml --out /tmp/bench 2>&1 | tee "$OUT/bench.log"
cp /tmp/bench/results.json "$OUT/bench.json"
