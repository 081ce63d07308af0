"""Trackers are context managers around a trial, kept by the driver: the worker streams its
milestones and the driver logs them. W&B is optional and never fails a trial."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Callable

from harness.sweep.config import WandbConfig
from harness.sweep.wandb_check import trial_mode


class WandbTracker:
    """One W&B run per trial: group = study, config = params, metrics at each eval, summary at the end.

    ``__enter__`` starts the run on a background thread: ``wandb.init`` takes seconds even offline
    (it starts W&B's service process), and the trial loads its model meanwhile. The first call that
    needs the run (``log``, ``summarize``, ``__exit__``) waits for it, at most ``wait_s``.

    Every call is guarded: if W&B is missing, misconfigured, too slow to start or fails mid-run, the
    tracker says so once on stderr and turns itself off; the trial goes on.
    """

    init_timeout_s = 60.0  # W&B's own limit on reaching its service (and, online, the server)
    wait_s = init_timeout_s + 30.0  # ours, on top: a W&B that hangs past its own limit is dropped

    def __init__(self, cfg: WandbConfig, study: str, trial_number: int, config: dict[str, Any], run_dir: Path,
                 warn: Callable[[str], None] | None = None):
        self.cfg, self.study, self.number, self.config, self.run_dir = cfg, study, trial_number, config, run_dir
        self.warn = warn or (lambda line: print(line, file=sys.stderr))
        self.run = None
        self.failed = False  # the trial failed: its run ends with exit code 1
        self._injected: BaseException | None = None
        # What the init thread hands over, under the lock: the run or the error, once it is done.
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = False
        self._abandoned = False
        self._started = None
        self._init_error: BaseException | None = None

    def fail_next(self, err: BaseException) -> None:
        """Test hook (harness.faults): the next W&B call raises ``err``, as a full disk would."""
        self._injected = err

    def _raise_injected(self) -> None:
        if self._injected is not None:
            err, self._injected = self._injected, None
            raise err

    def _off(self, what: str, err: BaseException) -> None:
        self.warn(f"warning: W&B {what} for trial {self.number} failed, continuing without it: "
                  f"{type(err).__name__}: {err}")
        self.run = None

    def __enter__(self) -> "WandbTracker":
        mode = trial_mode(self.cfg)
        if mode == "disabled":
            return self
        self._thread = threading.Thread(target=self._init, args=(mode,), name="wandb-init", daemon=True)
        self._thread.start()
        return self

    def _init(self, mode: str) -> None:
        """The init thread: start the run, then hand it (or the error) to the trial's thread."""
        run, error = None, None
        try:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.cfg.project, group=self.study, name=f"{self.study}-trial-{self.number}",
                job_type="trial", config=self.config, dir=str(self.run_dir), mode=mode, reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, init_timeout=self.init_timeout_s,
                                        x_disable_stats=True),
            )
        except Exception as err:  # noqa: BLE001 - W&B must never fail a trial
            error = err
        with self._lock:
            self._done = True
            late = self._abandoned
            if not late:
                self._started, self._init_error = run, error
        if late and run is not None:
            # The trial stopped waiting and went on without W&B: close the run so its file is whole.
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def _ready(self) -> bool:
        """Whether there is a run to talk to; the first call waits for the init thread (bounded)."""
        thread = self._thread
        if thread is not None:
            thread.join(self.wait_s)
            self._thread = None  # only now: a wait cut short (Ctrl-C) is taken up again by __exit__
            with self._lock:
                if self._done:
                    self.run, error = self._started, self._init_error
                else:
                    self._abandoned = True
                    error = TimeoutError(f"wandb.init did not return within {self.wait_s:g} s")
            if error is not None:
                self._off("init", error)
        return self.run is not None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._ready():
            try:
                self._raise_injected()
                self.run.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001
                self._off("log", err)

    def summarize(self, metrics: dict[str, Any]) -> None:
        if self._ready():
            try:
                self._raise_injected()
                self.run.summary.update({k: v for k, v in metrics.items() if v is not None})
            except Exception as err:  # noqa: BLE001
                self._off("summary", err)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._ready():
            try:
                self.run.finish(exit_code=1 if exc_type is not None or self.failed else 0)
            except Exception as err:  # noqa: BLE001
                self._off("finish", err)
