# Sourced by the bench/gpu_*.sh scripts that run on the device: the wheelhouse installed
# (../shared/gpu-wheelhouse.sh built .whl; carried with the tree), an offline environment, and
# the card written to $OUT/gpu.txt.
unset PYTHONDONTWRITEBYTECODE  # the device host sets it: every import would compile unsloth again
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \
  || exit 1
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=disabled HARNESS_CACHE=/tmp/hcache \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
