"""The launch interface: one class per start method, each starting a trial's process its own way;
relaying progress, the hang watchdog and the trial's record are written once, here.

Every launcher returns a :class:`~harness.records.TrialResult`: the one the trial process wrote,
or, when the process ended without writing one (a signal, a segfault, a hang, a failure before
training), one built here from the exit code and the log's tail.
"""

from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import Callable, Protocol

from harness.launch.progress import PATH_ENV, ProgressReader
from harness.records import TrialResult

OnEvent = Callable[[int, dict], None]  # (trial number, event)


class Process(Protocol):
    """A started trial process, as the watchdog sees it."""

    def alive(self) -> bool: ...

    def kill(self) -> None: ...

    def wait(self) -> int:
        """Its exit code (negative: the signal that ended it)."""


def log_tail(path: Path, n: int = 15) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError:
        return ""


def nvidia_visible() -> bool:
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")


def child_env(storage_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a study's child processes; the storage URL (which may hold a password)
    reaches them here and nowhere else."""
    from harness.data.sources import cache_root

    env = dict(os.environ)
    env["HARNESS_STORAGE_URL"] = storage_url
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Compiled kernels outlive the process (torch's and Triton's on-disk caches, in the harness's
    # cache rather than /tmp, which a reboot empties): a later worker or study finds what an
    # earlier one compiled. Unset by default only; a user's own setting wins.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "compile" / "inductor"))
    env.setdefault("TRITON_CACHE_DIR", str(cache_root() / "compile" / "triton"))
    env.update(extra or {})
    return env


class Launcher(ABC):
    """Starts trial processes for one study, one slot (a GPU, or a group of GPUs) at a time.

    Used as a context manager: entering starts what the method keeps (a fork server, waiting
    standby processes); leaving stops it.
    """

    name: str  # recorded on each trial as its start method
    resident_slots: set[str] | frozenset[str] = frozenset()  # slots that borrowed a resident warm worker (warm)

    def __init__(self, study_dir: Path, storage_url: str, slot_env: dict[str, dict[str, str]],
                 hang_timeout_s: float | None):
        self.study_dir, self.storage_url, self.slot_env = study_dir, storage_url, slot_env
        self.hang_timeout_s = hang_timeout_s
        self._running: dict[int, Process] = {}

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc) -> None:
        for process in list(self._running.values()):
            process.kill()
        self.close()

    def close(self) -> None:
        """Stop whatever the method keeps between trials."""

    def prefetch(self, slot: str) -> None:
        """Get the slot's next trial process ready while this one trains (standby only)."""

    def prepared(self) -> None:
        """The study's model and data are prepared: a method that keeps a model may load it now (warm)."""

    @abstractmethod
    def _start(self, number: int, slot: str, env: dict[str, str], log: Path) -> Process:
        """Start trial ``number``'s process with ``env``, its output going to ``log``."""

    def run(self, number: int, slot: str, on_event: OnEvent, prefetch: bool = False) -> TrialResult:
        """Run trial ``number`` to its end; its record. With ``prefetch``, the slot's next trial
        process is started as soon as this one is (see :meth:`prefetch`)."""
        trial_dir = self.study_dir / "trials" / str(number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        result_file, log = trial_dir / "result.json", trial_dir / "log.txt"
        result_file.unlink(missing_ok=True)
        channel = ProgressReader(trial_dir / "progress.fifo")
        env = child_env(self.storage_url, {**self.slot_env.get(slot, {}), PATH_ENV: str(channel.path),
                                           "HARNESS_STARTED_AT": repr(time.time())})
        try:
            process = self._start(number, slot, env, log)
            self._running[number] = process
            if prefetch:
                self.prefetch(slot)
            hung, reached_training = self._watch(number, process, channel, on_event)
            code = process.wait()
        finally:
            self._running.pop(number, None)
            channel.close()
        return self._result(number, result_file, log, code, hung, reached_training,
                            getattr(process, "start_method", None) or self.name)

    def kill(self, number: int) -> None:
        if (process := self._running.get(number)) is not None:
            process.kill()

    def _watch(self, number: int, process: Process, channel: ProgressReader,
               on_event: OnEvent) -> tuple[bool, bool]:
        """Relay events until the process ends; kill it when none came for ``hang_timeout_s``.
        Returns (hung, reached_training)."""
        last, reached_training = time.monotonic(), False
        while True:
            events = channel.read(1.0)
            for ev in events:
                reached_training |= ev.get("event") == "step" or ev.get("phase") == "training"
                on_event(number, ev)
            if events:
                last = time.monotonic()
            if not process.alive():  # checked after events too: a warm worker's trial ends with one
                for ev in channel.read(0):  # what it wrote just before ending
                    on_event(number, ev)
                return False, reached_training
            elif self.hang_timeout_s and time.monotonic() - last > self.hang_timeout_s:
                process.kill()
                return True, reached_training

    def _result(self, number: int, result_file: Path, log: Path, code: int, hung: bool,
                reached_training: bool, start_method: str) -> TrialResult:
        tail = log_tail(log)
        common = dict(number=number, log_tail=tail, start_method=start_method, host=socket.gethostname())
        if not hung:
            try:
                result = TrialResult.from_json(result_file.read_text())
            except (OSError, ValueError):
                result = None
            if result is not None:
                result.log_tail, result.start_method, result.host = tail, start_method, common["host"]
                if result.reason and result.state == "fail":
                    result.reason += "\n" + tail
                return result
        # No record from the process: it was killed, crashed, or hung.
        if hung:
            why = f"hang: no progress for {self.hang_timeout_s:g} s, killed"
        else:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            why = f"crash: trial process ended without a result ({how})"
        outcome = ("hang" if hung else "crash") if reached_training else "infrastructure"
        if not reached_training:
            why = f"the trial process ended before training ({why})"
        return TrialResult(**common, outcome=outcome, reason=f"{why}\n{tail}", reached_training=reached_training)
