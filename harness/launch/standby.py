"""``standby`` (the default on GPU hosts): each slot keeps one trial process spawned ahead of time,
its imports done, waiting for the driver to name its trial.

Importing unsloth initialises CUDA (a 0.7 GiB context), and a process that has done so cannot be
forked, so a fork server cannot serve GPU hosts. When a standby takes its trial, the slot's next
standby starts at once and imports while this trial trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from harness.launch.base import child_env
from harness.launch.progress import PATH_ENV
from harness.launch.spawn import Popened, SpawnLauncher, trial_command


class Standby(Popened):
    """``python -m harness.worker.trial --standby STUDY_DIR``, waiting for one line on stdin.

    Until it gets a trial its output goes to a file of its own under ``trials/``; handing it a
    trial renames that file to the trial's ``log.txt`` (the process keeps writing to the same file).
    """

    def __init__(self, study_dir: Path, env: dict[str, str]):
        trials = study_dir / "trials"
        trials.mkdir(parents=True, exist_ok=True)
        self.log = trials / f"standby-{os.getpid()}-{time.monotonic_ns()}.log"
        with self.log.open("w") as out:
            super().__init__(subprocess.Popen(
                [sys.executable, "-m", "harness.worker.trial", "--standby", str(study_dir)], stdin=subprocess.PIPE,
                stdout=out, stderr=subprocess.STDOUT, env=env,
            ))

    def claim(self, number: int, log: Path, env: dict[str, str]) -> bool:
        """Hand this process trial ``number``; False if it died waiting (its log then becomes the
        trial's, so what it printed is not lost)."""
        os.replace(self.log, log)
        if self.proc.poll() is not None:
            return False
        try:
            self.proc.stdin.write(f"{number} {env['HARNESS_STARTED_AT']} {env[PATH_ENV]}\n".encode())
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            return False
        return True

    def close(self) -> None:
        """End a standby that got no trial, and remove its log."""
        self.kill()
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        self.log.unlink(missing_ok=True)


class StandbyLauncher(SpawnLauncher):
    name = "standby"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting: dict[str, Standby] = {}  # each slot's thread touches only its own key

    def __enter__(self) -> "StandbyLauncher":
        # Each slot's first standby imports while the study's model and data are prepared.
        for slot in self.slot_env or {"0": {}}:
            self.prefetch(slot)
        return self

    def prefetch(self, slot: str) -> None:
        if slot not in self._waiting:
            self._waiting[slot] = Standby(self.study_dir, child_env(self.storage_url, self.slot_env.get(slot, {})))

    def close(self) -> None:
        for standby in self._waiting.values():
            standby.close()
        self._waiting.clear()

    def _start(self, number: int, slot: str, env: dict[str, str], log: Path) -> Popened:
        standby = self._waiting.pop(slot, None)
        if standby is not None:
            if standby.claim(number, log, env):
                return standby
            standby.close()
            # It died before its trial came: the trial runs in a spawned process instead, its log
            # starting with what the standby printed.
            with log.open("a") as out:
                out.write(f"[harness] the standby process for this trial had ended (exit {standby.proc.returncode});"
                          " spawning one\n")
            with log.open("a") as out:
                spawned = Popened(subprocess.Popen([sys.executable, *trial_command(self.study_dir, number)],
                                                   stdout=out, stderr=subprocess.STDOUT, env=env))
            spawned.start_method = "spawn"
            return spawned
        spawned = super()._start(number, slot, env, log)
        spawned.start_method = "spawn"
        return spawned
