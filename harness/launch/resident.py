"""Resident workers: ``harness warm up | status | down``.

``harness warm up --gpus 0,1`` starts, per GPU, a supervisor (this module, ``supervise``) that
keeps one resident worker (``python -m harness.worker.serve --listen``, :mod:`harness.worker.resident`)
running on that GPU, restarting it whenever it retires. A study then borrows the resident worker
of each of its slots instead of starting its own (:class:`harness.launch.workers.ResidentWorker`),
so its first trial does not wait for an import, and, on the model the last study used (warm
mode), neither for a load nor for a compile. A slot whose resident worker is busy with another
study, still importing, of the other mode, or gone, gets a worker of the study's own, as without
``warm up``; trials spanning several GPUs (``gpus_per_trial`` > 1) always get their own warm group.

On a host without NVIDIA GPUs, ``warm up`` starts one CPU worker in fork mode (the CPU default:
every trial a fresh fork of the imported worker); ``--mode`` chooses otherwise.

Where they live: per user and per harness cache (``HARNESS_CACHE``, whose models and compiled
kernels they share), sockets and supervisor process ids in a folder only the user may enter,
``/tmp/harness-<uid>/<hash of the cache's path>/``; each worker's output in
``<cache>/workers/<gpu>.log``.

Torch-free: the driver imports it.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.launch.workers import pid_alive


def _key(gpu: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", gpu)


def _home() -> Path:
    from harness.data.sources import cache_root

    root = str(cache_root().expanduser().resolve())
    # A socket's path must stay under ~100 bytes, so not in the cache itself.
    user = Path(tempfile.gettempdir()) / f"harness-{os.getuid()}"
    home = user / hashlib.sha1(root.encode()).hexdigest()[:12]
    for folder in (user, home):
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.stat().st_uid != os.getuid():
            raise HarnessError(f"{folder} belongs to another user: resident workers need a folder of their own there")
        os.chmod(folder, 0o700)  # only this user may reach the sockets (a study's env goes through them)
    return home


def socket_path(gpu: str) -> Path:
    return _home() / f"{_key(gpu)}.sock"


def _pid_path(gpu: str) -> Path:
    return _home() / f"{_key(gpu)}.pid"


def log_path(gpu: str) -> Path:
    from harness.data.sources import cache_root

    folder = cache_root() / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{_key(gpu)}.log"


def slot_gpu(env: dict[str, str], nvidia: bool) -> str:
    """The resident worker a slot would borrow: its GPU (the first of ``CUDA_VISIBLE_DEVICES``, or
    0 when unset), or ``cpu`` on a host without NVIDIA devices."""
    if not nvidia:
        return "cpu"
    return (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"


def _supervisor_pid(gpu: str) -> int | None:
    try:
        pid = int(_pid_path(gpu).read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


# -- `harness warm up | status | down` --------------------------------------------------------------

@dataclass
class Status:
    gpu: str
    state: str                  # idle | busy | starting | down
    supervisor: int | None = None
    worker: dict | None = None  # what an idle worker says of itself
    log: Path | None = None


def status(gpu: str) -> Status:
    from harness.protocol import Closed, connect

    sup = _supervisor_pid(gpu)
    if sup is None:
        return Status(gpu, "down")
    path = socket_path(gpu)
    if not path.exists():
        return Status(gpu, "starting", sup, log=log_path(gpu))
    try:
        channel = connect(path, timeout=1.0)
    except OSError:
        return Status(gpu, "starting", sup, log=log_path(gpu))
    try:
        channel.send("status")
        answer = channel.recv(1.0)
    except Closed:
        return Status(gpu, "starting", sup, log=log_path(gpu))
    finally:
        channel.close()
    if answer is None:  # it serves a study, and reads no other client meanwhile
        return Status(gpu, "busy", sup, log=log_path(gpu))
    return Status(gpu, "idle", sup, {k: v for k, v in answer.items() if k != "kind"}, log_path(gpu))


def known_gpus() -> list[str]:
    return sorted(p.stem for p in _home().glob("*.pid"))


def up(gpus: list[str], max_trials: int, fork: bool) -> list[str]:
    """Start a supervisor per GPU that has none; the GPUs whose supervisor was started now."""
    from harness.launch.workers import child_env

    started = []
    for gpu in gpus:
        if _supervisor_pid(gpu) is not None:
            continue
        env = child_env()
        if gpu != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(os.devnull) as devnull, log_path(gpu).open("a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "harness.launch.resident", "supervise", gpu, str(max_trials),
                                     "fork" if fork else "warm"],
                                    stdin=devnull, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # not ended with this shell's Ctrl-C
        _pid_path(gpu).write_text(str(proc.pid))
        started.append(gpu)
    return started


def down(gpus: list[str], timeout: float = 30.0) -> list[str]:
    """Stop the supervisors (and their workers) on ``gpus``; the GPUs stopped."""
    stopped = []
    for gpu in gpus:
        pid = _supervisor_pid(gpu)
        if pid is None:
            _pid_path(gpu).unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        _pid_path(gpu).unlink(missing_ok=True)
        socket_path(gpu).unlink(missing_ok=True)
        stopped.append(gpu)
    return stopped


def wait_ready(gpus: list[str], timeout: float, on_wait=None) -> list[Status]:
    """Wait until each GPU's worker answers (idle), or is down (it failed to start), or ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        states = [status(gpu) for gpu in gpus]
        if all(s.state in ("idle", "busy", "down") for s in states) or time.monotonic() > end:
            return states
        if on_wait:
            on_wait(states)
        time.sleep(0.5)


def supervise(gpu: str, max_trials: int, fork: bool) -> int:
    """Keep one resident worker running on ``gpu`` until SIGTERM. A worker that fails three times
    in a row within a minute of starting is not started again (see its log)."""
    stopping = False
    child: subprocess.Popen | None = None

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    quick_failures = 0
    path = socket_path(gpu)
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "harness.worker.serve", "--listen", str(path),
                                  "--max-trials", str(max_trials), *(["--fork"] if fork else [])])
        try:
            code = child.wait()
        except KeyboardInterrupt:
            code = child.wait()
        if stopping:
            break
        quick_failures = quick_failures + 1 if code != 0 and time.monotonic() - started < 60 else 0
        print(f"[harness] resident worker {child.pid} ended (exit {code})"
              + ("" if quick_failures < 3 else ": failed 3 times in a row, not restarted"), flush=True)
        if quick_failures >= 3:
            break
        time.sleep(0.5)
    if child is not None and child.poll() is None:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    path.unlink(missing_ok=True)
    pid_file = _pid_path(gpu)
    try:
        if int(pid_file.read_text()) == os.getpid():
            pid_file.unlink()
    except (OSError, ValueError):
        pass
    return 0


def parse_gpus(text: str | None, nvidia: bool) -> list[str]:
    if not nvidia:
        if text:
            raise HarnessError(f"--gpus {text}: no NVIDIA device is visible on this host (a CPU worker is started without --gpus)")
        return ["cpu"]
    if not text:
        return ["0"]
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or any(not re.fullmatch(r"\d+", g) for g in gpus):
        raise HarnessError(f"--gpus: expected GPU indices such as 0,1 (got {text})")
    return gpus


if __name__ == "__main__":
    if sys.argv[1] == "supervise":
        sys.exit(supervise(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "fork"))
