"""``warm`` (the default on GPU hosts): one long-lived worker process per slot runs trial after
trial, keeping the loaded base model and what Unsloth compiled (``python -m harness.worker.trial
--warm``; :mod:`harness.worker.warm`).

A sweep of short trials otherwise spends most of the GPU's time importing, loading and compiling
(bench/RESULTS.md). Each trial still gets a fresh adapter, optimizer, data order and peak-memory
counters, and writes its own log and record. A worker is replaced, not reused, after any failure
(out of memory, crash, hang, non-finite loss, an error), after a full fine-tune, when its base's
weights changed or memory was not given back, and after ``worker_max_trials`` trials; a killed
trial (a hang, Ctrl-C) takes its worker with it. The slot's next worker starts at once, so it
imports while the driver records the trial that ended.

With ``gpus_per_trial`` > 1 a slot's worker is a **warm group**: one torchrun of ``gpus_per_trial``
processes kept up between trials. Rank 0 reads the trial numbers and answers; it shares each with
the other ranks (:class:`harness.worker.distributed.Group`), and the group retires as one.

A one-GPU slot first tries to borrow the resident worker ``harness warm up`` keeps on its GPU
(:mod:`harness.launch.resident`): the same protocol over a socket, and given back, not ended, when
the study is done. A slot whose resident worker is busy, importing, retired or down starts its own.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from harness.errors import HarnessError
from harness.launch.base import Launcher, child_env, nvidia_visible
from harness.launch.progress import PATH_ENV
from harness.launch.resident import pid_alive, read_line, slot_gpu, socket_path
from harness.launch.spawn import torchrun_command

REPLY_ENV = "HARNESS_WARM_REPLY"
# Outcomes after which a worker takes the slot's next trial (as harness.worker.trial decides too).
KEEP_WORKER_AFTER = frozenset({"complete", "pruned", "not_converged", "over_budget"})
MAX_TRIALS_ENV = "HARNESS_WORKER_MAX_TRIALS"
HELLO_TIMEOUT_S = 3.0  # an idle resident worker answers in milliseconds; a busy one not at all


class _WorkerLines:
    """A warm worker's line protocol, whatever carries it: trial numbers (or ``preload``) to it,
    one answer per trial back, ``NUMBER EXIT_CODE keep|retire`` (harness.worker.trial.serve_trials)."""

    log: Path | None = None  # its own output, between trials
    _buffer = b""
    retiring = False  # it said it takes no more trials

    def _send(self, line: str) -> None:
        raise NotImplementedError

    def _read(self, timeout: float) -> bytes | None:
        """What arrived within ``timeout`` seconds; None when nothing did, or the line is closed."""
        raise NotImplementedError

    def assign(self, number: int, started_at: str, channel: str, log: Path) -> None:
        """Hand the worker trial ``number``."""
        self._send(f"{number} {started_at} {channel} {log}")

    def preload(self) -> None:
        """Ask the worker to load the study's base now, before its first trial."""
        self._send("preload")

    def reply(self, timeout: float = 0.0) -> tuple[int, int, bool] | None:
        """(number, exit code, retiring) once the worker has answered its trial; else None."""
        while b"\n" not in self._buffer:
            chunk = self._read(timeout)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        number, code, keep = line.decode().split()
        return int(number), int(code), keep == "retire"


class WarmWorker(_WorkerLines):
    """One worker process (or, with ``nproc`` > 1, a torchrun group of them) and its reply pipe.
    Until it takes a trial, and between trials, its output goes to a log of its own under
    ``trials/`` (removed when it ends cleanly)."""

    def __init__(self, study_dir: Path, env: dict[str, str], max_trials: int, nproc: int = 1):
        trials = study_dir / "trials"
        trials.mkdir(parents=True, exist_ok=True)
        self.log = trials / f"worker-{os.getpid()}-{time.monotonic_ns()}.log"
        # A named pipe, not an inherited descriptor: torchrun closes a rank's inherited descriptors
        # (all but stdin, stdout and stderr). Rank 0 opens it by name. Holding a write end here too
        # means the read end never sees end-of-file; a dead worker is found by its exit instead.
        self._reply_path = self.log.with_suffix(".reply")
        os.mkfifo(self._reply_path, stat.S_IRUSR | stat.S_IWUSR)
        self._replies: int | None = os.open(self._reply_path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep_open: int | None = os.open(self._reply_path, os.O_WRONLY)
        env = {**env, REPLY_ENV: str(self._reply_path), MAX_TRIALS_ENV: str(max_trials)}
        command = ["-m", "harness.worker.trial", "--warm", str(study_dir)]
        if nproc > 1:
            command = torchrun_command(nproc, command)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, *command], stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, line: str) -> None:
        """One line to the worker's stdin; a dead worker is found by its trial's watchdog, not here."""
        try:
            self.proc.stdin.write(f"{line}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def _read(self, timeout: float) -> bytes | None:
        if self._replies is None:
            return None  # closed (Ctrl-C ends the study while a slot's thread still watches)
        ready, _, _ = select.select([self._replies], [], [], timeout)
        return os.read(self._replies, 4096) if ready else None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def wait(self) -> int:
        """Its exit code, once it has exited."""
        return self.proc.wait()

    def close(self) -> None:
        """End the worker: stdin closed, it exits after its current trial; killed if it does not.
        Its own log goes when it ended cleanly (each trial's output is in the trial's log)."""
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reply_path.unlink(missing_ok=True)
        for fd in (self._replies, self._keep_open):
            if fd is not None:
                os.close(fd)
        self._replies = self._keep_open = None
        if self.proc.returncode == 0:
            self.log.unlink(missing_ok=True)


class ResidentWorker(_WorkerLines):
    """A resident worker (``harness warm up``, :mod:`harness.launch.resident`) lent to this study,
    over its socket. Closing gives it back (it waits for the next study); killing it (a hang,
    Ctrl-C) ends it, and its supervisor starts another."""

    def __init__(self, conn: socket.socket, pid: int):
        self.conn, self.pid = conn, pid
        self._gone = False  # the connection closed: the worker exited
        self._killed = False

    @classmethod
    def borrow(cls, gpu: str, study_dir: Path, env: dict[str, str]) -> "ResidentWorker | None":
        """The resident worker on ``gpu``, now serving this study (whose environment it takes);
        None when there is none, or it is busy, or still importing."""
        try:
            path = socket_path(gpu)
        except (OSError, HarnessError):
            return None  # no folder of resident workers here: the study starts its own
        if not path.exists():
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            conn.connect(str(path))
            conn.sendall((json.dumps({"study_dir": str(study_dir), "env": env}) + "\n").encode())
            answer = read_line(conn)
            word, pid = answer.decode().split()
            if word != "ready":
                raise ConnectionError(answer)
        except (OSError, ValueError):
            conn.close()
            return None
        conn.settimeout(None)
        return cls(conn, int(pid))

    def alive(self) -> bool:
        if not self._gone:
            ready, _, _ = select.select([self.conn], [], [], 0)
            if ready:
                try:
                    self._gone = self.conn.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    self._gone = True
        return not self._gone and pid_alive(self.pid)

    def _send(self, line: str) -> None:
        try:
            self.conn.sendall(f"{line}\n".encode())
        except OSError:
            pass  # gone: its trial's watchdog finds out

    def _read(self, timeout: float) -> bytes | None:
        if self._gone:
            return None
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if not ready:
            return None
        try:
            chunk = self.conn.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            self._gone = True
        return chunk or None

    def wait(self) -> int:
        """For a worker that will not answer: wait until it has exited; -9 when it was killed here."""
        end = time.monotonic() + 30
        while self.alive() and time.monotonic() < end:
            time.sleep(0.1)
        return -signal.SIGKILL if self._killed else 1

    def kill(self) -> None:
        if pid_alive(self.pid):
            self._killed = True
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()
        self._gone = True

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


class WarmTrial:
    """One trial in a worker, as the launcher's watchdog sees a process."""

    start_method = "warm"

    def __init__(self, worker: WarmWorker, number: int, log: Path):
        self.worker, self.number, self.log = worker, number, log
        self.answer: tuple[int, int, bool] | None = None

    def _poll(self, timeout: float) -> None:
        if self.answer is None:
            self.answer = self.worker.reply(timeout)
            if self.answer is not None and self.answer[2]:
                self.worker.retiring = True

    def alive(self) -> bool:
        self._poll(0.0)
        return self.answer is None and self.worker.alive()

    def kill(self) -> None:
        self.worker.kill()

    def wait(self) -> int:
        while self.answer is None and self.worker.alive():
            self._poll(1.0)
        self._poll(0.0)  # an answer written just before the worker exited
        if self.answer is None:
            code = self.worker.wait()
            if self.log.stat().st_size == 0 and self.worker.log is not None and self.worker.log.exists():
                # It died before its trial began (in its imports, say): what it printed is the
                # trial's log, so the failure's reason is not lost.
                self.log.write_bytes(self.worker.log.read_bytes())
            return code
        return self.answer[1]


class WarmLauncher(Launcher):
    name = "warm"

    def __init__(self, *args, max_trials: int = 50, nproc: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_trials, self.nproc = max_trials, nproc
        self._workers: dict[str, WarmWorker | ResidentWorker] = {}  # each slot's thread touches only its own key
        self._prepared = False
        self.resident_slots: set[str] = set()

    def __enter__(self) -> "WarmLauncher":
        # Each slot's worker imports while the study's model and data are prepared.
        for slot in self.slot_env or {"0": {}}:
            self.prefetch(slot)
        return self

    def prefetch(self, slot: str) -> None:
        worker = self._workers.get(slot)
        if worker is None or not worker.alive():
            if worker is not None:
                worker.close()
            env = child_env(self.storage_url, self.slot_env.get(slot, {}))
            worker = None
            if self.nproc == 1:
                worker = ResidentWorker.borrow(slot_gpu(env, nvidia_visible()), self.study_dir, env)
                if worker is not None:
                    self.resident_slots.add(slot)
            if worker is None:
                worker = WarmWorker(self.study_dir, env, self.max_trials, self.nproc)
            self._workers[slot] = worker
            if self._prepared:  # a replacement, mid-study: it loads the base as soon as it has imported
                worker.preload()

    def prepared(self) -> None:
        self._prepared = True
        for worker in self._workers.values():
            worker.preload()

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()

    def _start(self, number: int, slot: str, env: dict[str, str], log: Path) -> WarmTrial:
        log.write_text("")  # this trial's log: the worker appends to it while the trial runs
        self.prefetch(slot)  # a new worker if the slot has none alive
        worker = self._workers[slot]
        # A worker that dies before answering (even before reading this line) ends the trial as
        # any dead process does: an infrastructure failure before training, retried.
        worker.assign(number, env["HARNESS_STARTED_AT"], env[PATH_ENV], log)
        return WarmTrial(worker, number, log)

    def run(self, number: int, slot: str, on_event, prefetch: bool = False):
        result = super().run(number, slot, on_event, prefetch=False)
        worker = self._workers.get(slot)
        if worker is not None:
            if result.outcome not in KEEP_WORKER_AFTER or worker.retiring or not worker.alive():
                # Replaced, not reused (the worker retires itself after a failure; this covers a
                # crash or a kill too). Its successor starts importing now, if more trials are to come.
                worker.close()
                self._workers.pop(slot, None)
                if prefetch:
                    self.prefetch(slot)
        return result
