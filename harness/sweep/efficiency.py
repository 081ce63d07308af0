"""Sweep efficiency: how much of the GPUs' time a study's runs spent training.

A sweep is many short trials, and each pays a fixed cost (process start, import, model load) and
a warm-up (its first steps run slower than the rest) before it trains at its steady pace. So::

    sweep efficiency = Σ over trials (train_steady_s × world_size) / Σ over runs (wall_s × gpus)

- ``train_steady_s`` (recorded by each trial): its optimizer steps × its steady step time
  (``steady_step_s``, the median step after ``timing_warmup_steps``), summed over its seeds: the
  training it did, at the pace training runs once started. Trials of every state count if they
  trained (a pruned trial trained its steps); a trial with no step after the warm-up has no
  steady pace and counts nothing.
- A **run** is one call of the driver (``harness run`` or ``harness worker``) on the study: its
  ``wall_s`` runs from entering the launcher (so the first standby's import and the study's
  preparation are in it) to the end of its last trial, and ``gpus`` is what it held (slots ×
  ``gpus_per_trial``; a CPU run counts 1). Each run appends itself to the study's user attribute
  ``sweep_runs``, so a resumed study or one shared by several workers adds up all of them.
- Only trials that started during a recorded run count, so a run that left no record (a driver
  killed by SIGKILL, or one of a version before this) adds neither its trials nor its time.

Torch-free and Polars-free: the driver records runs; the report, ``harness run`` and
``bench/efficiency_table.py`` (on a GPU host without Polars) compute the same figures here.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import optuna

from harness.sweep.storage import study_lock

log = logging.getLogger(__name__)

# Study user attribute: one entry per run, {wall_s, excluded_s (left out of wall_s: a model built on
# its first use on this machine), gpus, host, pid, started (Unix time),
# start_method, trials (how many trials this run had recorded when it ended; after Ctrl-C, a trial
# still being recorded may be missing from it), resident_slots (how many of its slots borrowed a
# resident worker, `harness warm up`: their import, and maybe load and compile, were paid before
# the run, so its wall time does not hold them)}.
RUNS = "sweep_runs"


def record_run(study: optuna.Study, storage_url: str, run: dict) -> None:
    """Append ``run`` to the study's ``sweep_runs`` (under the study lock: workers sharing the
    study append theirs at the same time). A storage that refuses costs a warning, never the run."""
    try:
        with study_lock(storage_url):
            runs = list(study.user_attrs.get(RUNS, []))
            study.set_user_attr(RUNS, [*runs, run])
    except Exception as err:  # noqa: BLE001 - the trials are recorded already; this is bookkeeping
        log.warning("this run's wall time was not recorded on the study (%s: %s)", type(err).__name__, err)


class RunClock:
    """One run of the driver, timed: entered with the launcher, ``stop()`` once the last trial
    ended; on leaving (normally, on Ctrl-C or an error) it appends the run to ``sweep_runs``, with
    the time up to ``stop()``, or up to leaving when it was never called."""

    def __init__(self, study: optuna.Study, storage_url: str, gpus: int, start_method: str,
                 trials: Callable[[], int] | None = None, resident: Callable[[], int] | None = None):
        self.study, self.storage_url, self.gpus, self.start_method = study, storage_url, gpus, start_method
        self.trials, self.resident = trials, resident
        self.started = self.t0 = self.ended = None
        self.excluded = 0.0

    def __enter__(self) -> "RunClock":
        self.started, self.t0 = time.time(), time.perf_counter()
        return self

    def stop(self) -> None:
        self.ended = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` out of this run's wall time: building a model on its first use on this
        machine (pretraining a base) is paid once per machine, not by the study."""
        self.excluded += seconds

    def __exit__(self, *exc) -> None:
        wall = (self.ended or time.perf_counter()) - self.t0 - self.excluded
        record_run(self.study, self.storage_url, {
            "wall_s": round(wall, 3), "excluded_s": round(self.excluded, 3), "gpus": self.gpus, "host": socket.gethostname(), "pid": os.getpid(),
            "started": round(self.started, 3), "start_method": self.start_method,
            "trials": self.trials() if self.trials else None,
            "resident_slots": self.resident() if self.resident else 0})


@dataclass
class Efficiency:
    """A study's efficiency over its recorded runs (see the module's docstring)."""

    runs: int
    wall_s: float         # the runs' wall time, overlapping runs (workers) counted once
    wall_gpu_s: float     # Σ wall_s × gpus over the runs
    train_gpu_s: float    # Σ train_steady_s × world_size over the trials that ran in them
    trials: int           # trials that trained during the runs (any state)
    fixed_s: float | None = None        # their mean fixed_s: driver's start of the trial to its first step
    warmup_s: float | None = None       # their mean warmup_s
    first_fixed_s: float | None = None  # the same for the first of them (lowest number)
    first_warmup_s: float | None = None
    resident_runs: int = 0  # runs in which a slot borrowed a resident worker (`harness warm up`)
    unit: str = "GPU"       # what the runs held: GPUs, or (no trial on a GPU) a CPU

    @property
    def efficiency(self) -> float | None:
        return self.train_gpu_s / self.wall_gpu_s if self.wall_gpu_s > 0 else None

    @property
    def trials_per_hour(self) -> float | None:
        return self.trials / self.wall_s * 3600 if self.wall_s > 0 else None

    def line(self) -> str:
        """One line for the end of ``harness run``."""
        eff = self.efficiency
        parts = [f"sweep efficiency {eff:.1%}" if eff is not None else "sweep efficiency n/a",
                 f"{self.train_gpu_s:,.1f} {self.unit}-s training at steady pace of {self.wall_gpu_s:,.1f} {self.unit}-s wall "
                 f"({self.runs} run{'s' if self.runs != 1 else ''})"]
        tail = [f"{self.trials} trial{'s' if self.trials != 1 else ''} trained"]
        if self.trials_per_hour is not None:
            tail.append(f"{self.trials_per_hour:.1f} trials/hour")
        if self.fixed_s is not None:
            tail.append(f"mean fixed {self.fixed_s:.1f} s")
        if self.warmup_s is not None:
            tail.append(f"mean warm-up {self.warmup_s:.1f} s")
        if self.resident_runs:
            tail.append(f"resident workers in {self.resident_runs} of {self.runs} runs (imported before)")
        return ": ".join(parts) + "; " + ", ".join(tail)


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def measure(study: optuna.Study) -> Efficiency | None:
    """The study's efficiency over its recorded runs; None when no run is recorded."""
    runs = [r for r in study.user_attrs.get(RUNS, []) if r.get("wall_s") is not None]
    if not runs:
        return None
    intervals = [(float(r["started"]), float(r["started"]) + float(r["wall_s"])) for r in runs]
    # A run's trials start within its whole span: its wall_s leaves out the time excluded (a base
    # pretrained at its start), which its clock still ran through.
    spans = [(a, b + float(r.get("excluded_s") or 0)) for (a, b), r in zip(intervals, runs)]

    def during_a_run(t: optuna.trial.FrozenTrial) -> bool:
        # datetime_start is the driver's clock when it asked for the trial (naive local time, as
        # time.time() is read back by timestamp()).
        start = t.datetime_start.timestamp() if t.datetime_start else None
        return start is not None and any(a <= start <= b for a, b in spans)

    trained = sorted((t for t in study.get_trials(deepcopy=False)
                      if t.user_attrs.get("reached_training") and during_a_run(t)), key=lambda t: t.number)
    train_gpu_s = sum(float(t.user_attrs["train_steady_s"]) * int(t.user_attrs.get("world_size") or 1)
                      for t in trained if t.user_attrs.get("train_steady_s") is not None)

    def mean(key: str) -> float | None:
        values = [float(t.user_attrs[key]) for t in trained if t.user_attrs.get(key) is not None]
        return statistics.fmean(values) if values else None

    first = trained[0].user_attrs if trained else {}
    return Efficiency(
        runs=len(runs), wall_s=_union_s(intervals),
        wall_gpu_s=sum(float(r["wall_s"]) * int(r.get("gpus") or 1) for r in runs),
        train_gpu_s=train_gpu_s, trials=len(trained), fixed_s=mean("fixed_s"), warmup_s=mean("warmup_s"),
        first_fixed_s=first.get("fixed_s"), first_warmup_s=first.get("warmup_s"),
        resident_runs=sum(1 for r in runs if r.get("resident_slots")),
        unit="GPU" if any(t.user_attrs.get("device") == "cuda" for t in trained) or not trained else "CPU",
    )
