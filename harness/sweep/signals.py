"""SIGTERM to a driver: a scheduler taking its task back (a preemption, a time limit, ``scancel``,
a pod deleted). Slurm and Kubernetes send SIGTERM, then SIGKILL after a grace period (Slurm's
``KillWait``, 30 s by default; a pod's ``terminationGracePeriodSeconds``).

While :func:`sigterm_raises` is in force, SIGTERM raises :class:`Terminated` in the main thread
(the driver stops starting trials, records its running ones as interrupted, and the CLI exits
143, the shell's code for it), and a timer makes sure the process is gone within
:data:`EXIT_WITHIN_S` whatever a lingering thread does, well inside any such grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

EXIT_CODE = 128 + signal.SIGTERM  # 143
EXIT_WITHIN_S = 20.0


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: no ``except Exception`` on the
    way up swallows it."""


def hard_exit() -> None:
    """Exit 143 now: output flushed, no exit hooks, no waiting for other threads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[threading.Event]:
    """Within the block, SIGTERM raises :class:`Terminated` (once; a second one is ignored while
    the first is handled). Yields an event set as the signal arrives, which the driver's other
    threads read. Outside the main thread (a test calling the driver), nothing changes."""
    terminating = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield terminating
        return

    def on_sigterm(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        terminating.set()
        timer = threading.Timer(EXIT_WITHIN_S, hard_exit)
        timer.daemon = True
        timer.start()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield terminating
    finally:
        if not terminating.is_set():
            signal.signal(signal.SIGTERM, previous)
