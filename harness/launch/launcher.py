"""Start study processes: the once-per-study preparation, and one OS process per trial.

A process per trial means a crash, a leak or an out-of-memory error ends that trial alone, and
every trial starts from clean memory, so its peak-memory figure is its own.

Three ways to start a trial process; each takes the import of the training stack (unsloth, torch,
transformers: 6 s on a CPU host, 18-30 s on a GPU host) off the trial's path but the last:

- **fork** (default where no NVIDIA device is visible): a fork server imports the stack once;
  each trial is a fresh fork of it.
- **standby** (default on GPU hosts): importing unsloth initialises CUDA (it holds a context,
  about 0.7 GiB), and a process that has done so cannot be forked. So each slot keeps one trial
  process started ahead of time: spawned, imports done, waiting for the driver to name its trial.
  When it gets one, the next standby starts and imports while this trial trains. It costs the
  GPU that idle process's CUDA context while the previous trial runs.
- **spawn**: ``python -m harness.worker.trial``, which imports for itself. Also what a trial spanning
  several GPUs uses (torchrun starts its processes).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import select
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError


@dataclass
class TrialOutcome:
    state: str  # complete | pruned | fail
    value: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    exit_code: int | None = None


def _tail(path: Path, n: int = 15) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError:
        return ""


def child_env(storage_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HARNESS_STORAGE_URL"] = storage_url
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_prepare(config_json: Path, sweep_dir: Path, out: Path, log: Path) -> None:
    """Resolve the model and tokenize the data once, in a child process (the driver never imports torch)."""
    with log.open("w") as log_f:
        code = subprocess.call(
            [sys.executable, "-m", "harness.data.prepare", str(config_json), str(sweep_dir), str(out)],
            stdout=log_f, stderr=subprocess.STDOUT, env=child_env(""),
        )
    if code != 0:
        lines = [l for l in _tail(log, 40).splitlines() if l.startswith("error: ")]
        raise HarnessError(lines[-1].removeprefix("error: ") if lines else
                           f"preparing the model and data failed (exit {code}); see {log}:\n{_tail(log)}")


def nvidia_visible() -> bool:
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")


def default_start_method(device: str) -> str:
    return "fork" if device == "cpu" or not nvidia_visible() else "standby"


_FORK_CONTEXT: Any = None


def _fork_context() -> Any:
    """The fork server, preloading the training stack; started on first use, kept for the driver's life."""
    global _FORK_CONTEXT
    if _FORK_CONTEXT is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["harness.worker.loop", "harness.worker.trial", "harness.worker.trackers", "harness.sweep.study", "optuna",
                                    "wandb"])
        _FORK_CONTEXT = ctx
    return _FORK_CONTEXT


def _noop() -> None:
    pass


def start_fork_server(log: Path) -> float:
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


def _watch_driver(driver_pid: int) -> None:
    """End this trial if its driver dies (the fork server, our parent, may outlive it briefly)."""
    import signal
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="driver-watch").start()


def _forked_trial(study_dir: str, number: int, env: dict[str, str], log: str, conn: Any, started_at: float,
                  driver_pid: int) -> None:
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
    from harness.worker.trial import execute

    def send(event: str, **fields: Any) -> None:
        try:
            conn.send({"event": event, **fields})
        except (OSError, ValueError):
            pass  # the driver went away; training goes on and the result file remains

    sys.exit(execute(Path(study_dir), number, send, started_at))


class Standby:
    """A trial process started before its trial exists: ``python -m harness.worker.trial --standby``.

    It spawns and imports the training stack at once, then waits for one line on its stdin (the
    trial's number). Until then its output goes to a file of its own under ``trials/``; the trial
    copies it to the head of its log. Closing it (no trial came) ends the process.
    """

    def __init__(self, study_dir: Path, storage_url: str, extra_env: dict[str, str] | None = None):
        trials = study_dir / "trials"
        trials.mkdir(parents=True, exist_ok=True)
        self.log = trials / f"standby-{os.getpid()}-{time.monotonic_ns()}.log"
        env = {**child_env(storage_url), **(extra_env or {}), "HARNESS_STANDBY_LOG": str(self.log)}
        read_fd, write_fd = os.pipe()
        env["HARNESS_PROGRESS_FD"] = str(write_fd)
        with self.log.open("w") as log_f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.worker.trial", "--standby", str(study_dir)], stdin=subprocess.PIPE,
                stdout=log_f, stderr=subprocess.STDOUT, env=env, pass_fds=(write_fd,),
            )
        os.close(write_fd)
        self.events_fd = read_fd

    def claim(self, number: int) -> bool:
        """Hand this process trial ``number``; False (and the process is gone) if it died waiting."""
        try:
            self.proc.stdin.write(f"{number} {time.time()!r}\n".encode())
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            self.close()
            return False
        return True

    def close(self) -> None:
        """End a standby that got no trial (or died), and remove its log."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            os.close(self.events_fd)
        except OSError:
            pass
        self.log.unlink(missing_ok=True)


class StandbyPool:
    """One waiting standby process per slot (none unless ``enabled``), each with its slot's
    environment (``CUDA_VISIBLE_DEVICES``). Entering starts them; leaving closes those no trial took."""

    def __init__(self, study_dir: Path, storage_url: str, slot_env: dict[str, dict[str, str]], enabled: bool):
        self.study_dir, self.storage_url, self.slot_env, self.enabled = study_dir, storage_url, slot_env, enabled
        self._waiting: dict[str, Standby] = {}  # each slot's thread touches only its own key

    def __enter__(self) -> "StandbyPool":
        for slot in self.slot_env:
            self.refill(slot)
        return self

    def __exit__(self, *exc) -> None:
        for standby in self._waiting.values():
            standby.close()
        self._waiting.clear()

    def take(self, slot: str) -> Standby | None:
        return self._waiting.pop(slot, None)

    def refill(self, slot: str) -> None:
        if self.enabled:
            self._waiting[slot] = Standby(self.study_dir, self.storage_url, self.slot_env[slot])


class TrialProcess:
    """One trial in its own process, its progress relayed to ``on_event``."""

    def __init__(self, study_dir: Path, number: int, storage_url: str, start_method: str = "spawn",
                 hang_timeout_s: float | None = None, extra_env: dict[str, str] | None = None, nproc: int = 1,
                 standby: Standby | None = None):
        self.study_dir, self.number, self.storage_url, self.nproc = study_dir, number, storage_url, nproc
        self.standby = standby
        self.start_method, self.hang_timeout_s = start_method, hang_timeout_s
        self.extra_env = extra_env or {}
        self.dir = study_dir / "trials" / str(number)
        self.log = self.dir / "log.txt"
        self._kill: Callable[[], None] = lambda: None
        self.hung = False

    def run(self, on_event: Callable[[dict], None]) -> TrialOutcome:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "result.json").unlink(missing_ok=True)
        env = {**child_env(self.storage_url), **self.extra_env}
        if self.start_method == "fork" and self.nproc == 1:
            code = self._run_forked(env, on_event)
        elif self.standby is not None and self.standby.claim(self.number):
            proc = self.standby.proc
            self._kill = lambda: (proc.kill(), proc.wait())
            code = self._relay(proc, os.fdopen(self.standby.events_fd), on_event)
        else:  # spawn, or a standby that died before its trial came: start one now
            code = self._run_spawned(env, on_event)
        return self._outcome(code)

    def _watch(self, wait_event: Callable[[float], dict | None | bool], alive: Callable[[], bool],
               on_event: Callable[[dict], None]) -> None:
        """Relay events until the process ends; kill it when no event came for ``hang_timeout_s``."""
        last = time.monotonic()
        while True:
            ev = wait_event(1.0)
            if ev is False:  # the channel closed: the process is ending
                return
            if ev:
                last = time.monotonic()
                on_event(ev)
            elif not alive():
                return
            elif self.hang_timeout_s and time.monotonic() - last > self.hang_timeout_s:
                self.hung = True
                self._kill()
                return

    def _run_forked(self, env: dict[str, str], on_event: Callable[[dict], None]) -> int:
        ctx = _fork_context()
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_forked_trial, daemon=False,
                           args=(str(self.study_dir), self.number, env, str(self.log), send, time.time(),
                                 os.getpid()))
        proc.start()
        send.close()
        self._kill = lambda: (proc.kill(), proc.join())

        def wait_event(timeout: float):
            if not receive.poll(timeout):
                return None
            try:
                return receive.recv()
            except (EOFError, OSError):
                return False

        self._watch(wait_event, proc.is_alive, on_event)
        proc.join()
        return proc.exitcode

    def _run_spawned(self, env: dict[str, str], on_event: Callable[[dict], None]) -> int:
        env["HARNESS_SPAWNED_AT"] = repr(time.time())
        trial_cmd = ["-m", "harness.worker.trial", str(self.study_dir), str(self.number)]
        if self.nproc > 1:
            # One trial on several GPUs: torchrun starts one process per GPU. It does not pass on
            # inherited descriptors, so rank 0 writes its progress to a file the driver follows.
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                   *trial_cmd]
            progress_file = self.dir / "progress.jsonl"
            progress_file.write_text("")
            env["HARNESS_PROGRESS_FILE"] = str(progress_file)
            read_fd, pass_fds = os.open(progress_file, os.O_RDONLY), ()
        else:
            cmd = [sys.executable, *trial_cmd]
            read_fd, write_fd = os.pipe()
            env["HARNESS_PROGRESS_FD"] = str(write_fd)
            pass_fds = (write_fd,)
        with self.log.open("w") as log_f:
            proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)
        for fd in pass_fds:
            os.close(fd)
        self._kill = lambda: (proc.kill(), proc.wait())
        return self._relay(proc, os.fdopen(read_fd), on_event, following_file=self.nproc > 1)

    def _relay(self, proc: subprocess.Popen, events, on_event: Callable[[dict], None],
               following_file: bool = False) -> int:
        """Pass the process's JSON-line events on until it ends; its exit code."""

        def wait_event(timeout: float):
            if following_file:  # a regular file: poll for appended lines
                line = events.readline()
                if not line:
                    time.sleep(min(timeout, 0.5))
                    return None
            else:
                ready, _, _ = select.select([events], [], [], timeout)
                if not ready:
                    return None
                line = events.readline()
                if not line:
                    return False
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None

        try:
            self._watch(wait_event, lambda: proc.poll() is None, on_event)
        finally:
            events.close()
        return proc.wait()

    def kill(self) -> None:
        self._kill()

    def _outcome(self, code: int | None) -> TrialOutcome:
        code = -9 if code is None else code
        if self.hung:
            return TrialOutcome("fail", reason=f"hang: no progress for {self.hang_timeout_s:g} s, killed\n"
                                               f"{_tail(self.log)}", exit_code=code)
        try:
            result = json.loads((self.dir / "result.json").read_text())
        except (OSError, json.JSONDecodeError):
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return TrialOutcome("fail", reason=f"crash: trial process ended without a result ({how})\n"
                                               f"{_tail(self.log)}", exit_code=code)
        reason = result.get("reason")
        if reason:
            reason += "\n" + _tail(self.log)
        return TrialOutcome(result["state"], result.get("value"), result.get("metrics", {}), reason, code)
