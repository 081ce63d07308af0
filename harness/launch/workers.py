"""The workers a launcher holds, one per slot: a process it started itself (:class:`OwnWorker`), or
a resident worker it borrowed from ``harness warm up`` (:class:`ResidentWorker`). Either way the
launcher talks to it over one :class:`~harness.protocol.Channel`; a handle adds only what differs:
how the process is reached, watched, killed and let go.

Torch-free: the driver imports it.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from harness.errors import HarnessError
from harness.protocol import Channel, Closed, connect, listen

ACCEPT_TIMEOUT_S = 120.0  # a started worker connects before it imports: seconds, even under torchrun
BORROW_TIMEOUT_S = 3.0    # an idle resident worker answers in milliseconds; a busy one not at all


def log_tail(path: Path, n: int = 15) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError:
        return ""


def nvidia_visible() -> bool:
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a study's workers (and what a borrowed resident worker takes on). No
    storage URL: a worker never talks to Optuna."""
    from harness.data.sources import cache_root

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Compiled kernels outlive the process (torch's and Triton's on-disk caches, in the harness's
    # cache rather than /tmp, which a reboot empties): a later worker or study finds what an
    # earlier one compiled. Unset by default only; a user's own setting wins.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "compile" / "inductor"))
    env.setdefault("TRITON_CACHE_DIR", str(cache_root() / "compile" / "triton"))
    env.update(extra or {})
    return env


def torchrun_command(nproc: int, command: list[str]) -> list[str]:
    """``command`` (Python's arguments) in ``nproc`` processes under torchrun, whose agent dies
    with the driver (``harness.worker.group``), taking its ranks with it."""
    return ["-m", "harness.worker.group", "--standalone", f"--nproc_per_node={nproc}", *command]


CLOSED = {"kind": "closed"}  # what a trial's queue gets once its worker's channel has closed


class WorkerHandle:
    """A worker as its launcher holds it: its channel (opened on first use), its process id, and
    a reader thread that hands each message to the queue of the trial it names (a worker may train
    several of the slot's trials at once: ``concurrent_trials``)."""

    resident = False
    log: Path | None = None  # its own output, between trials
    pid: int | None = None

    def __init__(self, study_dir: Path, env: dict[str, str]):
        self.study_dir, self.env = study_dir, env
        self._channel: Channel | None = None
        self.killed = False
        self.why: str | None = None  # why its channel could not be opened
        self._queues: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()  # sends, and the queues
        self._reader: threading.Thread | None = None
        self.closed = False  # its channel closed: no more messages will come

    def subscribe(self, number: int) -> queue.Queue:
        """Trial ``number``'s messages, from now on (:data:`CLOSED` once the worker is gone)."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._queues[number] = q
            if self.closed:
                q.put(CLOSED)
        return q

    def unsubscribe(self, number: int) -> None:
        with self._lock:
            self._queues.pop(number, None)

    def _start_reader(self) -> None:
        def read() -> None:
            try:
                while True:
                    message = self._channel.recv()
                    with self._lock:
                        q = self._queues.get(message.get("number"))
                    if q is not None:
                        q.put(message)
            except Closed:
                pass
            with self._lock:
                self.closed = True
                for q in self._queues.values():
                    q.put(CLOSED)

        self._reader = threading.Thread(target=read, name=f"worker-{self.pid}-reader", daemon=True)
        self._reader.start()

    @property
    def channel(self) -> Channel:
        """Opened on first use, and the study announced on it; :class:`Closed` when the worker
        could not be reached (it died first, or never connected: ``why``)."""
        if self._channel is None:
            if self.why is not None:
                raise Closed(self.why)
            try:
                self._channel = self._open()
            except HarnessError as err:
                self.why = str(err)
                with self._lock:
                    self.closed = True
                    for q in self._queues.values():
                        q.put(CLOSED)
                raise Closed(self.why) from None
            self._channel.send("study", study_dir=str(self.study_dir), env=self.env)
            self._start_reader()
        return self._channel

    def _open(self) -> Channel:
        raise NotImplementedError

    def send(self, kind: str, **fields) -> None:
        """A message to the worker; a dead one is found by the trial's watch, not here."""
        try:
            channel = self.channel
            with self._lock:
                channel.send(kind, **fields)
        except Closed:
            pass

    def alive(self) -> bool:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def exit_code(self) -> int | None:
        """How it ended, once it has (negative: a signal); None when unknown."""
        return None

    def close(self) -> None:
        """Let it go: a study's own worker exits, a resident one waits for the next study."""
        if self._channel is not None:
            self._channel.close()


class OwnWorker(WorkerHandle):
    """A worker process (with ``nproc`` > 1, a torchrun group of them) started for this study.
    Until its first trial, and between trials, its output goes to a log of its own under
    ``trials/`` (removed when it ends cleanly)."""

    def __init__(self, study_dir: Path, env: dict[str, str], socket_dir: Path, *, fork: bool, max_trials: int,
                 nproc: int = 1, device: str = "auto"):
        super().__init__(study_dir, env)
        trials = study_dir / "trials"
        trials.mkdir(parents=True, exist_ok=True)
        self.log = trials / f"worker-{os.getpid()}-{time.monotonic_ns()}.log"
        self._socket = socket_dir / f"{time.monotonic_ns()}.sock"
        self._server = listen(self._socket, backlog=1)
        command = ["-m", "harness.worker.serve", "--connect", str(self._socket), "--max-trials", str(max_trials),
                   "--device", device, *(["--fork"] if fork else [])]
        if nproc > 1:
            command = torchrun_command(nproc, command)
        with self.log.open("w") as out, open(os.devnull) as devnull:
            self.proc = subprocess.Popen([sys.executable, *command], stdin=devnull, stdout=out,
                                         stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def _open(self) -> Channel:
        """Accept the worker's connection (rank 0's, in a group); a worker that dies first, or
        never connects, is an error its trial reports."""
        import select

        try:
            end = time.monotonic() + ACCEPT_TIMEOUT_S
            while time.monotonic() < end:
                ready, _, _ = select.select([self._server], [], [], 0.5)
                if ready:
                    conn, _ = self._server.accept()
                    return Channel(conn)
                if self.proc.poll() is not None:
                    raise HarnessError(f"the worker ended before it connected (exit {self.proc.returncode})")
            raise HarnessError(f"the worker did not connect within {ACCEPT_TIMEOUT_S:g} s")
        finally:
            self._server.close()
            self._socket.unlink(missing_ok=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def close(self) -> None:
        """End the worker: its channel closed, it exits after its current trial; killed if it does
        not. Its own log goes when it ended cleanly (each trial's output is in the trial's log)."""
        super().close()
        self._server.close()
        self._socket.unlink(missing_ok=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.returncode == 0:
            self.log.unlink(missing_ok=True)


class ResidentWorker(WorkerHandle):
    """A resident worker (``harness warm up``, :mod:`harness.launch.resident`) lent to this study.
    Closing gives it back (it waits for the next study); killing it (a hang, Ctrl-C) ends it, and
    its supervisor starts another."""

    resident = True

    def __init__(self, study_dir: Path, env: dict[str, str], channel: Channel, pid: int):
        super().__init__(study_dir, env)
        self._channel, self.pid = channel, pid
        self._start_reader()

    @classmethod
    def borrow(cls, gpu: str, study_dir: Path, env: dict[str, str], fork: bool) -> "ResidentWorker | None":
        """The resident worker on ``gpu``, now serving this study (whose environment it takes);
        None when there is none, or it is busy, still importing, or of the other mode (fork or warm)."""
        from harness.launch.resident import socket_path

        try:
            path = socket_path(gpu)
        except (OSError, HarnessError):
            return None  # no folder of resident workers here: the study starts its own
        if not path.exists():
            return None
        try:
            channel = connect(path, timeout=BORROW_TIMEOUT_S)
        except OSError:
            return None
        try:
            channel.send("study", study_dir=str(study_dir), env=env, fork=fork)
            ready = channel.recv(BORROW_TIMEOUT_S)
        except Closed:
            ready = None
        if ready is None or ready["kind"] != "ready" or bool(ready.get("fork")) != fork:
            channel.close()
            return None
        return cls(study_dir, env, channel, int(ready["pid"]))

    def alive(self) -> bool:
        return not self.closed and pid_alive(self.pid)

    def kill(self) -> None:
        self.killed = True
        if pid_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()

    def exit_code(self) -> int | None:
        end = time.monotonic() + 30
        while pid_alive(self.pid) and time.monotonic() < end:
            time.sleep(0.1)
        return -signal.SIGKILL if self.killed else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
