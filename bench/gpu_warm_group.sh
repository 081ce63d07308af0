#!/usr/bin/env bash
# Issue 15, warm groups on two GPUs (nvidia-h100-x2), one short call: the same config and seed,
# gpus_per_trial 2 (torchrun, NCCL), random-init mistral-1b (bf16 LoRA r16, packed scenes, 12
# steps), three trials in one warm group against one trial as a fresh torchrun (start_method
# spawn). Outputs in $OUT: gpu.txt, warm.log, spawn.log, table.md.
set -u
START=$SECONDS
source bench/gpu_env.sh
table() {
python3 - <<'PY' 2>&1 | tee "$OUT/table.md"
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
keys = ("outcome", "start_method", "world_size", "worker_trial", "base_reused", "val_loss", "tokens_per_s",
        "peak_mem_mib", "fixed_s", "warmup_s", "steady_step_s", "train_s", "reason")
print("| study | trial | state | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 3) + "|")
for name in ("group-warm", "group-spawn"):
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:////tmp/rg/{name}/study.db")
    except Exception as err:
        print(f"| {name} | {err} |"); continue
    for t in study.trials:
        print(f"| {name} | {t.number} | {t.state.name} | " + " | ".join(str(t.user_attrs.get(k)) for k in keys) + " |")
PY
}
for method in warm spawn; do
  python3 - "$method" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("sweeps/scale7b.yaml"))
method = sys.argv[1]
cfg.update(study=f"group-{method}", start_method=method, gpus_per_trial=2, n_trials=3 if method == "warm" else 1)
cfg["model"]["name"] = "mistral-1b"
cfg["budget"].update(max_steps=12, eval_every=6, timing_warmup_steps=3, hang_timeout_s=150)
cfg["search_space"]["learning_rate"] = 3.0e-4  # every trial the same config and seed
cfg["wandb"] = {"mode": "disabled"}
open(f"/tmp/group-{method}.yaml", "w").write(yaml.safe_dump(cfg))
PY
done
s=$SECONDS; timeout 150 python3 -m harness.cli run /tmp/group-warm.yaml --results-dir /tmp/rg > "$OUT/warm.log" 2>&1
echo "warm: rc=$? wall=$((SECONDS - s))s" | tee "$OUT/runs.txt"
table
s=$SECONDS; timeout 90 python3 -m harness.cli run /tmp/group-spawn.yaml --results-dir /tmp/rg > "$OUT/spawn.log" 2>&1
echo "spawn: rc=$? wall=$((SECONDS - s))s" | tee -a "$OUT/runs.txt"
table
tail -30 /tmp/rg/group-warm/trials/0/log.txt > "$OUT/warm-trial0-log.txt" 2>/dev/null
echo "done in $(( SECONDS - START )) s" | tee -a "$OUT/runs.txt"
