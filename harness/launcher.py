"""Start study processes: the once-per-study preparation, and one OS process per trial.

A process per trial means a crash, a leak or an out-of-memory error ends that trial alone, and
every trial starts from clean memory, so its peak-memory figure is its own.
"""

from __future__ import annotations

import json
import os
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
            [sys.executable, "-m", "harness.prepare", str(config_json), str(sweep_dir), str(out)],
            stdout=log_f, stderr=subprocess.STDOUT, env=child_env(""),
        )
    if code != 0:
        lines = [l for l in _tail(log, 40).splitlines() if l.startswith("error: ")]
        raise HarnessError(lines[-1].removeprefix("error: ") if lines else
                           f"preparing the model and data failed (exit {code}); see {log}:\n{_tail(log)}")


class TrialProcess:
    """Runs ``python -m harness.trial`` for one trial, relaying its progress events."""

    def __init__(self, study_dir: Path, number: int, storage_url: str):
        self.study_dir, self.number, self.storage_url = study_dir, number, storage_url
        self.dir = study_dir / "trials" / str(number)
        self.log = self.dir / "log.txt"
        self.proc: subprocess.Popen | None = None

    def run(self, on_event: Callable[[dict], None]) -> TrialOutcome:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "result.json").unlink(missing_ok=True)
        read_fd, write_fd = os.pipe()
        env = child_env(self.storage_url)
        env["HARNESS_PROGRESS_FD"] = str(write_fd)
        env["HARNESS_SPAWNED_AT"] = repr(time.time())
        with self.log.open("w") as log_f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.trial", str(self.study_dir), str(self.number)],
                stdout=log_f, stderr=subprocess.STDOUT, env=env, pass_fds=(write_fd,),
            )
        os.close(write_fd)
        with os.fdopen(read_fd) as events:
            for line in events:  # ends when the child exits and its end of the pipe closes
                try:
                    on_event(json.loads(line))
                except json.JSONDecodeError:
                    pass
        code = self.proc.wait()
        return self._outcome(code)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _outcome(self, code: int) -> TrialOutcome:
        try:
            result = json.loads((self.dir / "result.json").read_text())
        except (OSError, json.JSONDecodeError):
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return TrialOutcome("fail", reason=f"trial process ended without a result ({how})\n{_tail(self.log)}",
                                exit_code=code)
        reason = result.get("reason")
        if reason:
            reason += "\n" + _tail(self.log)
        return TrialOutcome(result["state"], result.get("value"), result.get("metrics", {}), reason, code)
