"""The launcher: one worker per slot (a GPU, a group of GPUs, or the CPU), kept up between trials,
and a trial run on it to its end.

Per slot it borrows the idle resident worker ``harness warm up`` keeps there (same mode, one GPU),
or starts a worker of the study's own. It hands the worker each trial, relays the trial's events,
asks the driver to answer its questions (prune? keep the weights?), watches for a hang, and
returns what it saw: the worker's :class:`~harness.records.TrialReport` (None when none came) and
the process's end (:class:`~harness.sweep.outcome.ProcessEnd`). It decides nothing about the
trial: the driver does (:func:`harness.sweep.outcome.decide`). A worker that retires, dies or is
killed is let go, and the slot's next worker starts at once (it imports while the driver records
the trial that ended).

Torch-free: the driver imports it.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.launch.workers import CLOSED, OwnWorker, ResidentWorker, WorkerHandle, child_env, log_tail, nvidia_visible
from harness.protocol import private_dir
from harness.records import TrialReport

OnEvent = Callable[[int, dict], None]      # (trial number, message): progress, for the display and W&B
OnAsk = Callable[[int, dict], dict]       # (trial number, question) -> the answer's fields
KILLED_CHILD_WAIT_S = 30.0  # a fork worker reports its killed child's end at once


@dataclass
class TrialRun:
    """What a launcher saw of one trial."""

    report: TrialReport | None
    code: int | None            # exit code (negative: the signal); None when unknown
    hung: bool
    reached_training: bool
    log_tail: str
    pid: int | None             # the process that ran it


class Launcher:
    """Runs a study's trials on one worker per slot. A context manager: entering starts each
    slot's worker (its import overlaps the study's preparation); leaving lets them go."""

    def __init__(self, study_dir: Path, slot_env: dict[str, dict[str, str]], *, fork: bool, nproc: int = 1,
                 max_trials: int = 50, hang_timeout_s: float | None = None, device: str = "auto"):
        self.study_dir, self.slot_env = study_dir, slot_env or {"0": {}}
        self.fork, self.nproc, self.max_trials, self.device = fork, nproc, max_trials, device
        self.hang_timeout_s = hang_timeout_s
        self.name = "fork" if fork else "warm"  # the start method each trial records
        self._workers: dict[str, WorkerHandle] = {}  # each slot's thread touches only its own key
        self._running: dict[int, tuple[WorkerHandle, int | None]] = {}
        self._killed: set[int] = set()  # killed before they started: they never start
        self._lock = threading.Lock()
        self._slot_locks: dict[str, threading.Lock] = {}
        self._prepared = False
        self._socket_dir: Path | None = None
        self.resident_slots: set[str] = set()
        self._closing = False  # leaving: a slot whose worker died starts no other

    def __enter__(self) -> "Launcher":
        self._socket_dir = private_dir("harness-w-")
        for slot in self.slot_env:
            self._ensure(slot)
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        for number in list(self._running):
            self.kill(number)
        # A copy: a slot's thread may still be letting its killed worker go (Ctrl-C, SIGTERM).
        for worker in list(self._workers.values()):
            worker.close()
        self._workers.clear()
        if self._socket_dir is not None:
            for leftover in self._socket_dir.glob("*"):
                leftover.unlink(missing_ok=True)
            self._socket_dir.rmdir()

    def abandon(self) -> None:
        """Taken back by the scheduler (SIGTERM): the study's own workers are killed at once (a
        polite close waits for each to exit, seconds the grace period may not have); resident
        ones are given back. No slot starts another."""
        self._closing = True
        for worker in list(self._workers.values()):
            if worker.resident:
                worker.close()
            else:
                worker.kill()

    def notes(self) -> list[str]:
        """What a user should know of how this run's slots got their workers."""
        if self.nproc > 1 or not (nvidia_visible() or self.resident_slots):
            return []
        borrowed, total = len(self.resident_slots), len(self.slot_env)
        if borrowed == total:
            return ["workers: resident (harness warm up), imports done"]
        return [f"workers: {total - borrowed} of {total} slots start their own, which import (and load) for this "
                "study (`harness warm up` keeps workers between studies)"]

    def _ensure(self, slot: str) -> WorkerHandle:
        """The slot's worker: its current one if alive, else a borrowed resident one, else a new one
        (one at a time per slot: a slot's concurrent trials share its worker)."""
        with self._slot_locks.setdefault(slot, threading.Lock()):
            return self._ensure_locked(slot)

    def _ensure_locked(self, slot: str) -> WorkerHandle:
        worker = self._workers.get(slot)
        if worker is not None and worker.alive():
            return worker
        if worker is not None:
            worker.close()
        env = child_env(self.slot_env.get(slot, {}))
        worker = None
        if self.nproc == 1:
            from harness.launch.resident import slot_gpu

            worker = ResidentWorker.borrow(slot_gpu(env, nvidia_visible()), self.study_dir, env, self.fork)
            if worker is not None:
                self.resident_slots.add(slot)
        if worker is None:
            worker = OwnWorker(self.study_dir, env, self._socket_dir, fork=self.fork, max_trials=self.max_trials,
                               nproc=self.nproc, device=self.device)
        self._workers[slot] = worker
        if self._prepared and not self.fork:  # a replacement, mid-study: it loads the base once it has imported
            worker.send("preload")
        return worker

    def prepared(self) -> None:
        """The study's model and data are ready: warm workers load the base now."""
        self._prepared = True
        if not self.fork:
            for worker in self._workers.values():
                worker.send("preload")

    def run(self, number: int, params: dict, slot: str, on_event: OnEvent, on_ask: OnAsk,
            more: bool = True) -> TrialRun:
        """Run trial ``number`` on the slot's worker to its end. ``more``: the slot has trials to
        come, so a worker let go is replaced at once."""
        trial_dir = self.study_dir / "trials" / str(number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        log = trial_dir / "log.txt"
        log.write_text("")  # the worker appends to it while the trial runs
        worker = self._ensure(slot)
        with self._lock:
            if number in self._killed:  # the driver was interrupted while this trial was being set up
                return TrialRun(None, -signal.SIGKILL, False, False, "", None)
            self._running[number] = (worker, None)
        messages = worker.subscribe(number)
        worker.send("trial", number=number, params=params, started_at=time.time(), log=str(log))
        report, code, done, hung, reached, retire, pid = None, None, False, False, False, None, worker.pid
        last = hung_at = time.monotonic()
        try:
            while True:
                try:
                    message = messages.get(timeout=1.0)
                except queue.Empty:
                    message = None
                if message is CLOSED:
                    break  # the worker is gone
                now = time.monotonic()
                if message is None:
                    if not worker.alive():
                        break
                    if hung:
                        if now - hung_at > KILLED_CHILD_WAIT_S:
                            break
                    elif self.hang_timeout_s and now - last > self.hang_timeout_s:
                        hung, hung_at = True, now
                        if not self._kill(worker, pid):
                            break  # the worker went with it
                    continue  # a fork worker reports its killed child's end: wait for that
                last = now
                kind = message["kind"]
                if kind == "started":
                    pid = int(message["pid"])
                    with self._lock:
                        self._running[number] = (worker, pid)
                elif kind in ("eval", "finished"):  # questions: the driver answers (and shows) them
                    reached = True
                    worker.send("answer", number=number, **on_ask(number, message))
                    continue
                elif kind == "report":
                    report = TrialReport.from_dict(message["report"])
                elif kind == "done":
                    code, retire, done = int(message["code"]), message.get("retire"), True
                    break
                reached |= kind == "step" or (kind == "phase" and message.get("phase") == "training")
                on_event(number, message)
        finally:
            worker.unsubscribe(number)
            with self._lock:
                self._running.pop(number, None)
        if not done:  # the worker died, or was killed: let it go
            code = worker.exit_code()
            if log.stat().st_size == 0 and worker.log is not None and worker.log.exists():
                # It died before its trial began (in its imports, say): what it printed is the
                # trial's log, so the failure's reason is not lost.
                log.write_bytes(worker.log.read_bytes())
        if not done or retire:
            with self._slot_locks.setdefault(slot, threading.Lock()):
                if self._workers.get(slot) is worker:  # not already replaced by another of the slot's trials
                    worker.close()
                    self._workers.pop(slot, None)
                    if more and not self._closing:
                        self._ensure_locked(slot)
        if hung and report is not None and report.failure is None:
            report = None  # a killed trial's report, if any, is not the whole story
        return TrialRun(report, code, hung, reached or bool(report and report.reached_training), log_tail(log), pid)

    def kill(self, number: int) -> None:
        """End trial ``number`` now (Ctrl-C, a preemption); one not started yet never starts."""
        with self._lock:
            running = self._running.get(number)
            if running is None:
                self._killed.add(number)
        if running is not None:
            self._kill(*running)

    def _kill(self, worker: WorkerHandle, pid: int | None) -> bool:
        """A fork worker's trial is its child: kill that alone (True). A warm trial takes its
        worker with it (False)."""
        if self.fork and pid is not None and pid != worker.pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return True
        worker.kill()
        return False
