"""Starting a study's processes: the once-per-study preparation, and one OS process per trial.

A process per trial means a crash, a leak or an out-of-memory error ends that trial alone, and
every trial starts from clean memory, so its peak-memory figure is its own. Each start method is
one :class:`Launcher`; all of them relay progress through one channel (``progress``), share one
hang watchdog and return a :class:`~harness.records.TrialResult` (``base``):

- **fork** (default where no NVIDIA device is visible): a fork server imports the stack once;
  each trial is a fresh fork of it.
- **warm** (default on GPU hosts): each slot keeps one worker process that runs trial after
  trial with the base model loaded and compiled kernels kept; a fresh adapter, optimizer and data
  order per trial; the worker is replaced after any failure (``warm``). A trial over several
  GPUs gets a warm group: one torchrun of a process per GPU, kept up between trials. A slot
  borrows the resident worker ``harness warm up`` keeps on its GPU, when there is an idle one
  (``resident``), so the study pays no import, and on the same model no load or compile.
- **standby**: each slot keeps a spawned trial process, imports done, waiting for its trial
  (CUDA, once initialised, cannot be forked).
- **spawn**: ``python -m harness.worker.trial``, which imports for itself.
- **torchrun**: one trial over ``gpus_per_trial`` GPUs, a process per GPU, started for that trial
  (every start method but warm).

Torch-free: the driver imports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.launch.base import Launcher, child_env, log_tail, nvidia_visible
from harness.launch.fork import ForkLauncher
from harness.launch.spawn import SpawnLauncher, TorchrunLauncher
from harness.launch.standby import StandbyLauncher
from harness.launch.warm import WarmLauncher

__all__ = ["Launcher", "ForkLauncher", "SpawnLauncher", "StandbyLauncher", "TorchrunLauncher", "WarmLauncher",
           "make_launcher",
           "default_start_method", "nvidia_visible", "run_prepare"]


def default_start_method(device: str) -> str:
    return "fork" if device == "cpu" or not nvidia_visible() else "warm"


def make_launcher(start_method: str, study_dir: Path, storage_url: str, slot_env: dict[str, dict[str, str]],
                  hang_timeout_s: float | None, gpus_per_trial: int = 1, worker_max_trials: int = 50) -> Launcher:
    """The launcher for ``start_method`` (``auto`` resolved by the caller). Trials spanning several
    GPUs run under torchrun: kept up between trials (a warm group) with ``warm``, else one per trial."""
    args = (study_dir, storage_url, slot_env, hang_timeout_s)
    if start_method == "warm":
        return WarmLauncher(*args, max_trials=worker_max_trials, nproc=gpus_per_trial)
    if gpus_per_trial > 1:
        return TorchrunLauncher(*args, nproc=gpus_per_trial)
    kinds = {"fork": ForkLauncher, "standby": StandbyLauncher, "spawn": SpawnLauncher}
    return kinds[start_method](*args)


def run_prepare(config_json: Path, sweep_dir: Path, out: Path, log: Path,
                on_progress: Callable[[dict], None] | None = None) -> None:
    """Resolve the model and tokenize the data once, in a child process (the driver never imports torch).

    A long step inside it (pretraining a base) keeps a small JSON file up to date; ``on_progress``
    gets its contents as they change.
    """
    progress_file = out.with_name("prepare-progress.json")
    progress_file.unlink(missing_ok=True)
    env = child_env("")
    env["HARNESS_PREPARE_PROGRESS"] = str(progress_file)
    seen = None
    with log.open("w") as log_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.worker.prepare", str(config_json), str(sweep_dir), str(out)],
            stdout=log_f, stderr=subprocess.STDOUT, env=env,
        )
        while True:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                code = None
            if on_progress and progress_file.exists():
                try:
                    now = json.loads(progress_file.read_text())
                except (OSError, ValueError):
                    now = seen
                if now and now != seen:
                    seen = now
                    on_progress(now)
            if code is not None:
                break
    progress_file.unlink(missing_ok=True)
    if code != 0:
        lines = [line for line in log_tail(log, 40).splitlines() if line.startswith("error: ")]
        raise HarnessError(lines[-1].removeprefix("error: ") if lines else
                           f"preparing the model and data failed (exit {code}); see {log}:\n{log_tail(log)}")
