"""``fork`` (the default where no NVIDIA GPU is visible): a fork server imports the training
stack once per study; each trial is a fresh fork of it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.launch.base import Launcher

_FORK_CONTEXT: Any = None


def _fork_context() -> Any:
    """The fork server, preloading the training stack; started on first use, kept for the driver's life."""
    global _FORK_CONTEXT
    if _FORK_CONTEXT is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["unsloth", "harness.worker.loop", "harness.worker.trial", "harness.worker.trackers",
                                    "harness.sweep.study", "optuna", "wandb"])
        _FORK_CONTEXT = ctx
    return _FORK_CONTEXT


def _noop() -> None:
    pass


def _watch_driver(driver_pid: int) -> None:
    """End this trial if its driver dies (the fork server, our parent, may outlive it briefly)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="driver-watch").start()


def _forked_trial(study_dir: str, number: int, env: dict[str, str], log: str, driver_pid: int) -> None:
    """Body of a forked trial process: take the trial's environment and log, then run it."""
    from multiprocessing import forkserver

    # multiprocessing hands each child the fork server's "alive" pipe; holding it would keep the
    # server running after the driver dies. This trial starts no processes of its own: let it go.
    alive_fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
    _watch_driver(driver_pid)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    from harness.worker.trial import main

    sys.exit(main([study_dir, str(number)]))


class Forked:
    def __init__(self, proc: Any):
        self.proc = proc

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()

    def wait(self) -> int:
        self.proc.join()
        return self.proc.exitcode if self.proc.exitcode is not None else -9


class ForkLauncher(Launcher):
    name = "fork"

    def start_server(self, log: Path) -> float:
        """Start the fork server now (its imports take seconds), its output going to ``log``.

        Returns the seconds it took: the once-per-study import that each trial no longer pays.
        """
        ctx = _fork_context()
        t0 = time.perf_counter()
        saved = os.dup(1), os.dup(2)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:  # the server inherits fds 1 and 2 when it starts: point them at the log for that moment
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            proc = ctx.Process(target=_noop)
            proc.start()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in (*saved, fd):
                os.close(f)
        proc.join()
        return time.perf_counter() - t0

    def _start(self, number: int, slot: str, env: dict[str, str], log: Path) -> Forked:
        proc = _fork_context().Process(target=_forked_trial, daemon=False,
                                       args=(str(self.study_dir), number, env, str(log), os.getpid()))
        proc.start()
        return Forked(proc)
