"""Starting a study's processes: the once-per-study preparation, and the workers that train its
trials (:mod:`harness.launch.launcher`).

Two start methods, each kept by a measurement (README, "Fixed cost per trial"):

- **warm** (the default on GPU hosts): each slot's worker runs trial after trial in one process,
  the base model loaded and compiled kernels kept; a fresh adapter, optimizer and data order per
  trial; the worker is replaced after any failure. A slot borrows the resident worker ``harness
  warm up`` keeps on its GPU when there is an idle one (:mod:`harness.launch.resident`). With
  ``gpus_per_trial`` > 1 a slot's worker is a warm group: one torchrun of a process per GPU.
- **fork** (the default where no NVIDIA GPU is visible): each slot's worker only imports; each
  trial is a fresh fork of it, so every trial starts from clean memory and its peak RSS is its own.

Torch-free: the driver imports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from harness import env as harness_env
from harness.errors import HarnessError
from harness.launch.launcher import Launcher, TrialRun
from harness.launch.workers import child_env, log_tail, nvidia_visible

__all__ = ["Launcher", "TrialRun", "make_launcher", "default_start_method", "nvidia_visible", "run_prepare"]


def default_start_method(device: str) -> str:
    return "fork" if device == "cpu" or not nvidia_visible() else "warm"


def make_launcher(start_method: str, study_dir: Path, slot_env: dict[str, dict[str, str]],
                  hang_timeout_s: float | None, gpus_per_trial: int = 1, worker_max_trials: int = 50,
                  device: str = "auto") -> Launcher:
    """The launcher for ``start_method`` (``auto`` resolved by the caller). Trials spanning several
    GPUs run in warm groups (torchrun, kept up between trials) whatever the method."""
    return Launcher(study_dir, slot_env, fork=start_method == "fork" and gpus_per_trial == 1, nproc=gpus_per_trial,
                    max_trials=worker_max_trials, hang_timeout_s=hang_timeout_s, device=device)


def run_prepare(config_json: Path, sweep_dir: Path, out: Path, log: Path,
                on_progress: Callable[[dict], None] | None = None) -> None:
    """Resolve the model and tokenize the data once, in a child process (the driver never imports torch).

    A long step inside it (pretraining a base) keeps a small JSON file up to date; ``on_progress``
    gets its contents as they change.
    """
    progress_file = out.with_name("prepare-progress.json")
    progress_file.unlink(missing_ok=True)
    env = child_env()
    env[harness_env.PREPARE_PROGRESS] = str(progress_file)
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
