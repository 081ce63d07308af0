#!/usr/bin/env bash
# Where a trial's fixed cost goes on a GPU host: `python -X importtime -c "import unsloth"` (twice:
# cold, then with caches warm), a cProfile of the import, then the standalone loop against a
# harness trial on the same card (bench/standalone_unsloth.py vs sweeps/mistral7b-packed.yaml).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=offline \
  HARNESS_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for i in 1 2; do
  /usr/bin/time -f "import unsloth run $i: %e s" python3 -X importtime -c "import unsloth" 2> "$OUT/importtime$i.txt"
  tail -1 "$OUT/importtime$i.txt"
done
python3 -c "
import cProfile, pstats, io
pr = cProfile.Profile(); pr.enable()
import unsloth
pr.disable(); s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats('cumulative').print_stats(60); print(s.getvalue())
" > "$OUT/import_profile.txt" 2>&1
python3 -c "from harness.worker.prepare import build_preset; build_preset('mistral-7b-v0.3', 0)" >/dev/null 2>&1
timeout 150 python3 bench/standalone_unsloth.py /tmp/hcache/models/mistral-7b-v0.3-seed0 2>&1 | tail -1 | tee "$OUT/standalone.json"
timeout 200 python3 -m harness.cli run sweeps/mistral7b-packed.yaml --results-dir /tmp/res 2>&1 | tail -3
cp /tmp/res/mistral7b-packed/trials/0/result.json "$OUT/trial.json" 2>/dev/null
