"""``spawn``: a new Python process per trial, importing the training stack itself; and
``torchrun``: one trial over several GPUs, one process per GPU (rank 0 talks to the driver)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.launch.base import Launcher


class Popened:
    """A :class:`~harness.launch.base.Process` over ``subprocess.Popen``."""

    start_method: str | None = None  # set when it is not its launcher's own (a standby's fallback)

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def wait(self) -> int:
        return self.proc.wait()


def trial_command(study_dir: Path, number: int) -> list[str]:
    return ["-m", "harness.worker.trial", str(study_dir), str(number)]


def torchrun_command(nproc: int, command: list[str]) -> list[str]:
    """``command`` (Python's arguments) in ``nproc`` processes under torchrun, whose agent dies
    with the driver (``harness.worker.group``), taking its ranks with it."""
    return ["-m", "harness.worker.group", "--standalone", f"--nproc_per_node={nproc}", *command]


class SpawnLauncher(Launcher):
    name = "spawn"

    def _start(self, number: int, slot: str, env: dict[str, str], log: Path) -> Popened:
        with log.open("w") as out:
            return Popened(subprocess.Popen([sys.executable, *trial_command(self.study_dir, number)],
                                            stdout=out, stderr=subprocess.STDOUT, env=env))


class TorchrunLauncher(Launcher):
    """``gpus_per_trial`` > 1: torchrun starts one process per GPU of the slot (Gloo on CPU)."""

    name = "torchrun"

    def __init__(self, *args, nproc: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nproc = nproc

    def _start(self, number: int, slot: str, env: dict[str, str], log: Path) -> Popened:
        cmd = [sys.executable, *torchrun_command(self.nproc, trial_command(self.study_dir, number))]
        with log.open("w") as out:
            return Popened(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
