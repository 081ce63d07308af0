"""A resident warm worker: ``python -m harness.worker.resident SOCKET MAX_TRIALS``, started (and
restarted) by ``harness warm up`` (:mod:`harness.launch.resident`), serving study after study.

A study's own warm worker pays the import of unsloth (17-26 s on an H100 host), the base's load
and the first compile before its first trial; that alone is more than an 8-trial study of short
trials can afford (bench/RESULTS.md). A resident worker pays them once, before any study, and
keeps the base and what was compiled for the next study on the same model.

It imports the training stack, then listens on a Unix socket (mode 0600, in a folder only its user
may enter). A study's launcher connects and sends one JSON line, ``{"study_dir": ..., "env":
{...}}``: the environment the study gives its trial processes (its storage URL among it, so the
URL never shows in a process list or a file). The worker answers ``ready PID`` and then serves
the study exactly as a study's own warm worker does (:func:`harness.worker.trial.serve_trials`)
over the connection, until the launcher closes it. ``{"status": true}`` gets one JSON line about
the worker instead.

Nothing of one study reaches the next: the study's environment replaces the last one's, and the
base's measured starting loss is forgotten (another study may validate on other rows). A trial
whose driver goes away (the connection closes mid-trial) ends the worker at once, as a study's
own worker would die with its driver; so does any reason a worker retires (a failure, a changed
base, memory not given back, ``MAX_TRIALS``). ``harness warm up``'s supervisor then starts a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path

from harness.worker.trial import Worker, die_with_parent, import_training_stack, serve_trials

# Kept from the worker's own environment whatever a study sends: the GPU it was started on (CUDA
# is initialised already) and the folder it listens in.
OWN_ENV = ("CUDA_VISIBLE_DEVICES", "HARNESS_CACHE")


@contextlib.contextmanager
def ends_with_driver(conn: socket.socket):
    """While a trial runs the driver sends nothing; the connection closing means the driver is
    gone (killed, or Ctrl-C): end this process now, so the trial does not outlive it."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            ready, _, _ = select.select([conn], [], [], 0)
            if ready:
                try:
                    gone = conn.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone and not done.is_set():
                    os._exit(3)

    thread = threading.Thread(target=watch, name="driver-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def serve(socket_path: Path, max_trials: int) -> int:
    die_with_parent()  # its supervisor (`harness warm up`) ends, and it with it
    started = time.time()
    t0 = time.perf_counter()
    import_training_stack()
    preimport_s = time.perf_counter() - t0
    import torch

    worker = Worker(max_trials)
    worker.resident = True
    own_env, own_threads = dict(os.environ), torch.get_num_threads()
    studies = 0
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path.unlink(missing_ok=True)
    server.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    server.listen(8)
    print(f"[harness] resident worker {os.getpid()}: imported in {preimport_s:.1f}s, listening", flush=True)
    try:
        while worker.retire is None:
            conn, _ = server.accept()
            with conn:
                reader = conn.makefile("r", encoding="utf-8")
                try:
                    hello = json.loads(reader.readline() or "{}")
                except json.JSONDecodeError:
                    continue
                try:
                    if hello.get("status"):
                        base = worker.base.key.model_dir if worker.base is not None else None
                        conn.sendall((json.dumps({
                            "pid": os.getpid(), "trials": worker.trials, "studies": studies, "base": base,
                            "preimport_s": round(preimport_s, 3), "up_s": round(time.time() - started, 1),
                        }) + "\n").encode())
                        continue
                    study_dir = Path(hello["study_dir"])
                    os.environ.clear()
                    os.environ.update({**hello.get("env", {}), **{k: v for k, v in own_env.items() if k in OWN_ENV}})
                    if worker.base is not None:
                        worker.base.val_loss_start = None
                    conn.sendall(f"ready {os.getpid()}\n".encode())
                except (OSError, KeyError, TypeError, AttributeError):
                    continue  # a client that went away before being served, or a malformed hello
                studies += 1
                print(f"[harness] serving {study_dir}", flush=True)
                try:
                    serve_trials(study_dir, worker, lambda: reader.readline().split(),
                                 lambda line: conn.sendall(line.encode()), preimport_s,
                                 during_trial=lambda: ends_with_driver(conn))
                except OSError as err:  # the driver went away between trials
                    print(f"[harness] study ended: {err}", flush=True)
                finally:
                    os.environ.clear()
                    os.environ.update(own_env)
                    torch.set_num_threads(own_threads)  # a study may have set its share (OMP_NUM_THREADS)
                print(f"[harness] done with {study_dir}", flush=True)
        print(f"[harness] this worker takes no more trials: {worker.retire}", flush=True)
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), int(sys.argv[2])))
