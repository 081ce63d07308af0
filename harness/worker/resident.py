"""A resident worker: ``python -m harness.worker.serve --listen SOCKET``, started (and restarted)
by ``harness warm up`` (:mod:`harness.launch.resident`), serving study after study.

A study's own worker pays the import of unsloth (17-36 s on a GPU host, ~15 s on two CPU cores),
and on a GPU the base's load and the first compile, before its first trial; that alone is more
than an 8-trial study of short trials can afford (bench/RESULTS.md). A resident worker pays them
once, before any study, and keeps the base and what was compiled for the next study on the same
model. (In fork mode, on CPU hosts, it keeps only the import: every trial is a fresh fork.)

It listens on a Unix socket (mode 0600, in a folder only its user may enter). A client has
:data:`HELLO_TIMEOUT_S` from its connection to send its first line (connections wait side by side:
a silent one holds up no other): ``{"kind": "study", ...}`` (a study borrowing it,
served as a study's own worker is, :func:`harness.worker.serve.serve_study`, until the client
closes the connection; refused when it asks for the other mode, fork or warm) or ``{"kind":
"status"}`` (one line about the worker). A client that says
nothing in time, or something else, is dropped with a log line: a stray connection never blocks
the worker.

Nothing of one study reaches the next: the study's environment replaces the worker's own while
it serves it, and the base's measured starting loss is forgotten (another study may validate on
other rows). A warm trial whose driver goes away ends the worker, as a study's own worker would
die with its driver; so does any reason a worker retires. ``harness warm up``'s supervisor then
starts a new one.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from harness.protocol import Channel, Closed, listen
from harness.worker.serve import serve_study
from harness.worker.trial import DriverGone, WorkerState

HELLO_TIMEOUT_S = 5.0  # a study's launcher sends its first line as soon as it connects


def serve_resident(socket_path: Path, worker: WorkerState, fork: bool) -> int:
    started = time.time()
    server = listen(socket_path)
    pending: dict[Channel, float] = {}  # connections yet to say what they want, and by when
    studies = 0
    print(f"[harness] resident worker {os.getpid()} ({'fork' if fork else 'warm'}): imported in "
          f"{worker.preimport_s:.1f}s, listening", flush=True)
    try:
        while worker.retire is None:
            channel, first = _next_client(server, pending)
            try:
                if first["kind"] == "status":
                    base = worker.base.key.model_dir if worker.base is not None else None
                    channel.send("status", pid=os.getpid(), trials=worker.trials, studies=studies, base=base,
                                 mode="fork" if fork else "warm", preimport_s=round(worker.preimport_s or 0, 3),
                                 up_s=round(time.time() - started, 1))
                    continue
                if bool(first.get("fork", fork)) != fork:  # the study runs its trials the other way
                    channel.send("refused", why=f"this resident worker runs {'fork' if fork else 'warm'} trials")
                    continue
                studies += 1
                print(f"[harness] serving {first.get('study_dir')}", flush=True)
                serve_study(channel, worker, fork, first=first)
                print(f"[harness] done with {first.get('study_dir')}", flush=True)
            except (Closed, DriverGone) as err:
                if not fork and worker.base is not None and worker.base.lent is not None:
                    # A warm trial was cut off with its adapter on the base: start afresh.
                    worker.retire = f"its study's driver went away mid-trial ({err})"
                print(f"[harness] the client went away: {err}", flush=True)
            except (KeyError, TypeError, ValueError) as err:
                print(f"[harness] dropped a client with a malformed message: {type(err).__name__}: {err}", flush=True)
            finally:
                channel.close()
        print(f"[harness] this worker takes no more trials: {worker.retire}", flush=True)
    finally:
        for channel in pending:
            channel.close()
        server.close()
        socket_path.unlink(missing_ok=True)
    return 0


def _next_client(server, pending: dict[Channel, float]) -> tuple[Channel, dict]:
    """The next client to say, in time, what it wants (a ``study`` or a ``status``). Each connection
    has :data:`HELLO_TIMEOUT_S` from its arrival to send its first line; one that stays silent is
    dropped with a log line, and holds up no other meanwhile."""
    while True:
        now = time.monotonic()
        for channel, deadline in list(pending.items()):
            if deadline <= now:
                print(f"[harness] dropped a client that sent nothing within {HELLO_TIMEOUT_S:g} s", flush=True)
                del pending[channel]
                channel.close()
        timeout = max(0.0, min(pending.values()) - now) if pending else None
        ready, _, _ = select.select([server, *pending], [], [], timeout)
        for ready_one in ready:
            if ready_one is server:
                conn, _ = server.accept()
                pending[Channel(conn)] = time.monotonic() + HELLO_TIMEOUT_S
                continue
            try:
                first = ready_one.recv(0)
            except Closed:
                del pending[ready_one]
                ready_one.close()
                continue
            if first is None:
                continue  # part of a line so far
            del pending[ready_one]
            if first["kind"] in ("study", "status"):
                return ready_one, first
            print(f"[harness] dropped a client that sent {first['kind']!r}", flush=True)
            ready_one.close()
