"""The one channel between a driver and its workers: JSON objects, one per line, over a Unix
stream socket. Every worker speaks it, whoever started it: a study's own worker connects to the
socket its launcher listens on; a resident worker (``harness warm up``) listens and a study
connects to it. Torch-free: both sides import it.

Each message is ``{"kind": KIND, ...fields}``. In a study's order:

driver → worker
  ``study``    ``study_dir``, ``env``: the study this worker now serves, and the environment its
               trials run in (no storage URL: a worker never talks to Optuna); ``fork``: how it
               wants trials run (a resident worker of the other mode answers ``refused``). Always first.
  ``preload``  load the study's base now, before the first trial (warm workers).
  ``trial``    ``number``, ``params``, ``started_at`` (the driver's time.time() at hand-over), ``log``.
  ``answer``   the reply to an ``eval`` (``stop``: null, ``"pruned"`` or ``"converged"``) or to a
               ``finished`` (``save``: whether to keep the weights: they may be the study's best).
  (closing the connection: the study needs no more trials.)

worker → driver
  ``ready``    ``pid``, ``resident``: imported and serving the study.
  ``started``  ``number``, ``pid``: the process running the trial (a fork worker's child).
  ``phase``    ``phase``: ``loading`` | ``training``.
  ``step``     ``step``, ``done`` (share of the trial), ``loss``.
  ``eval``     ``milestone``, ``val_loss``, ``tokens_per_s``, ``peak_mem_mib``, ``seed_index``,
               ``seed``, ``train_loss``; waits for an ``answer``.
  ``finished`` ``values``: its objective(s), to ask whether to save its weights; waits for an ``answer``.
  ``report``   ``report``: the trial's :class:`~harness.records.TrialReport` (facts, no verdict).
  ``done``     ``number``, ``code`` (exit code of the trial: 0, 1 after a failure it caught, or
               the signal that ended a fork worker's child, negative), ``retire`` (why this
               worker takes no more trials, or null). The last message of every trial.
"""

from __future__ import annotations

import json
import os
import select
import socket
import tempfile
from pathlib import Path
from typing import Any


class Closed(ConnectionError):
    """The other end closed the channel (or it broke)."""


class Channel:
    """JSON lines over a connected stream socket. ``recv`` waits at most ``timeout`` seconds;
    ``send`` and ``recv`` raise :class:`Closed` once the other end is gone."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: str, **fields: Any) -> None:
        try:
            self.sock.sendall((json.dumps({"kind": kind, **fields}) + "\n").encode())
        except OSError as err:
            self.closed = True
            raise Closed(str(err)) from None

    def _line(self) -> dict | None:
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a writer that was killed mid-write
            if isinstance(message, dict) and isinstance(message.get("kind"), str):
                return message
        return None

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next message; None when none came within ``timeout`` seconds (None: wait for one)."""
        if (message := self._line()) is not None:
            return message
        while True:
            if self.closed:
                raise Closed("the channel is closed")
            try:
                ready, _, _ = select.select([self.sock], [], [], timeout)
            except (OSError, ValueError) as err:  # closed meanwhile, by another thread (Ctrl-C's clean-up)
                self.closed = True
                raise Closed(str(err)) from None
            if not ready:
                return None
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError as err:
                chunk, why = b"", str(err)
            else:
                why = "closed by the other end"
            if not chunk:
                self.closed = True
                raise Closed(why)
            self._buffer += chunk
            if (message := self._line()) is not None:
                return message

    def peer_gone(self) -> bool:
        """Whether the other end has closed, without taking anything from the channel."""
        if self.closed:
            return True
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not ready:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.closed = True
        try:
            # Shut down first: a close() alone leaves the connection open while another thread of
            # this process still blocks in recv() on it, and the peer never sees its end.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def connect(path: str | os.PathLike, timeout: float | None = None) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return Channel(sock)


def private_dir(prefix: str = "harness-") -> Path:
    """A fresh folder only this user may enter, short enough for socket paths (~100 bytes at most):
    a study's trial parameters and environment go through the sockets in it."""
    return Path(tempfile.mkdtemp(prefix=prefix))  # mkdtemp makes it 0700


def listen(path: str | os.PathLike, backlog: int = 8) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(path).unlink(missing_ok=True)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(backlog)
    return server
