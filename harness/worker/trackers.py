"""Trackers are context managers around a trial's work. W&B is optional and never fails a trial."""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

from harness.sweep.config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    """``auto``: online only when the user has W&B credentials (``WANDB_API_KEY`` or a netrc entry)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


class WandbTracker:
    """One W&B run per trial: group = study, config = params, metrics at each eval, summary at the end.

    Every call is guarded: if W&B is missing, misconfigured or fails mid-run, the tracker says so
    once on stderr and turns itself off; the trial goes on.
    """

    def __init__(self, cfg: WandbConfig, study: str, trial_number: int, config: dict[str, Any], run_dir: Path):
        self.cfg, self.study, self.number, self.config, self.run_dir = cfg, study, trial_number, config, run_dir
        self.run = None
        self._injected: BaseException | None = None

    def fail_next(self, err: BaseException) -> None:
        """Test hook (harness.worker.faults): the next W&B call raises ``err``, as a full disk would."""
        self._injected = err

    def _raise_injected(self) -> None:
        if self._injected is not None:
            err, self._injected = self._injected, None
            raise err

    def _off(self, what: str, err: BaseException) -> None:
        print(f"warning: W&B {what} failed, continuing without it: {type(err).__name__}: {err}", file=sys.stderr)
        self.run = None

    def __enter__(self) -> "WandbTracker":
        mode = wandb_mode(self.cfg)
        if mode == "disabled":
            return self
        try:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=self.cfg.project, group=self.study, name=f"{self.study}-trial-{self.number}",
                job_type="trial", config=self.config, dir=str(self.run_dir), mode=mode, reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, init_timeout=60, x_disable_stats=True),
            )
        except Exception as err:  # noqa: BLE001 - W&B must never fail a trial
            self._off("init", err)
        return self

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            try:
                self._raise_injected()
                self.run.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001
                self._off("log", err)

    def summarize(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            try:
                self._raise_injected()
                self.run.summary.update({k: v for k, v in metrics.items() if v is not None})
            except Exception as err:  # noqa: BLE001
                self._off("summary", err)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=0 if exc_type is None else 1)
            except Exception as err:  # noqa: BLE001
                self._off("finish", err)
