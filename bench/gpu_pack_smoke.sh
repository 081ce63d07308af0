#!/usr/bin/env bash
# Issue 24, before the 7B studies: the pack path on a GPU, small. On the device, one call:
#
#   bash bench/gpu_pack_smoke.sh        (.whl carried; ../shared/gpu-wheelhouse.sh built it)
#
# 1. bench/pack_bank_probe.py (plain torch + PEFT, random-init Mistral-7B shape): one step of K
#    trials on the harness's AdapterBank, K = 1..32 at 2 x 48 tokens (host-bound) and K = 1, 2 at
#    4 x 2,048 tokens (compute-bound), against one trial on PEFT's LoRA path.
# 2. tests/test_pack.py's five trials (tiny Mistral, CUDA, Unsloth's GPU path) on one resident
#    worker: alone, then three at a time with trial 1 turned NaN; each trial's validation curve
#    compared (relative difference), written to $OUT/smoke.json.
set -u
OUT=${OUT:-/tmp/smoke-out}
mkdir -p "$OUT"
PYTHONPATH=$PWD timeout 300 python3 bench/pack_bank_probe.py "$OUT/probe.json" --shape 7b > "$OUT/probe.txt" 2>&1
echo "probe rc=$? after ${SECONDS}s"
source bench/gpu_env.sh
trap 'python3 -m harness.cli warm down >/dev/null 2>&1' EXIT
python3 -m harness.cli warm up --gpus 0 --timeout 240 > "$OUT/warm.txt" 2>&1
echo "warm up rc=$? after ${SECONDS}s"
python3 - "$OUT" <<'PY'
import json, os, subprocess, sys, time
import yaml
sys.path.insert(0, "tests")
from test_pack import SWEEP
out = sys.argv[1]
studies = {}
for name, faults, keys in (("alone", "", {}), ("together", "1:nan@2", {"concurrent_trials": 3})):
    path = f"/tmp/{name}.yaml"
    with open(path, "w") as f:
        yaml.safe_dump({**SWEEP, "study": name, "device": "cuda", "wandb": {"mode": "disabled"}, **keys}, f)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", path, "--results-dir", "/tmp/smoke",
                           "--no-figures"], env=dict(os.environ, HARNESS_FAULTS=faults), capture_output=True,
                          text=True, timeout=200)
    open(f"{out}/{name}.log", "w").write(proc.stdout + proc.stderr)
    print(name, "rc", proc.returncode, "wall", round(time.time() - t0, 1), flush=True)
    import optuna
    study = optuna.load_study(study_name=name, storage=f"sqlite:////tmp/smoke/{name}/study.db")
    studies[name] = {t.number: {"state": t.state.name, "value": t.value, "curve": t.intermediate_values,
                                "attrs": t.user_attrs} for t in study.trials}
diffs = {}
for n, a in studies["alone"].items():
    b = studies["together"].get(n)
    if b and a["value"] is not None and b["value"] is not None:
        diffs[n] = abs(b["value"] - a["value"]) / abs(a["value"])
print("relative differences of final validation loss:", json.dumps(diffs))
json.dump({"studies": studies, "rel_diff": diffs}, open(f"{out}/smoke.json", "w"), indent=1, default=str)
PY
echo "done after ${SECONDS}s"
