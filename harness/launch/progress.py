"""The one progress channel from a trial process to its driver: JSON lines through a named pipe.

A FIFO in the trial's folder works for every start method alike: a forked or spawned child, a
standby process that learns its trial later, and torchrun's rank 0 (torchrun passes no inherited
file descriptors on, so a pipe handed down by descriptor would not reach it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
from pathlib import Path
from typing import Any

PATH_ENV = "HARNESS_PROGRESS"


class ProgressReader:
    """The driver's end. It also holds a write end open, so the pipe never reads as closed while
    the trial process has not opened it yet (or between two writers)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        os.mkfifo(self.path, 0o600)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._buffer = b""

    def read(self, timeout: float) -> list[dict[str, Any]]:
        """The events that arrived within ``timeout`` seconds (none on a timeout)."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if ready:
            try:
                self._buffer += os.read(self._fd, 1 << 16)
            except BlockingIOError:
                pass
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line from a killed writer
        return events

    def close(self) -> None:
        for fd in (self._fd, self._keepalive):
            try:
                os.close(fd)
            except OSError:
                pass
        self.path.unlink(missing_ok=True)


class ProgressWriter:
    """The trial's end: ``progress(event, **fields)``. Silent when there is no channel, and quiet
    once the driver has gone (training goes on; the result file remains)."""

    def __init__(self, path: str | os.PathLike | None):
        self.out = None
        if path:
            try:
                # Non-blocking open: with no reader (the driver died) it fails at once instead of
                # waiting forever; writes are made blocking again so no event is dropped.
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                self.out = os.fdopen(fd, "w", buffering=1)
            except OSError as err:
                if err.errno not in (errno.ENXIO, errno.ENOENT):
                    raise

    def __call__(self, event: str, **fields: Any) -> None:
        if self.out is not None:
            try:
                self.out.write(json.dumps({"event": event, **fields}) + "\n")
            except OSError:
                self.out = None

    def close(self) -> None:
        """Close the channel (a warm worker's trial is over; the process goes on)."""
        if self.out is not None:
            try:
                self.out.close()
            except OSError:
                pass
            self.out = None
