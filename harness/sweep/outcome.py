"""How each trial ended: decided here and nowhere else.

A trial's outcome comes from two witnesses: the worker's :class:`~harness.records.TrialReport`
(what it trained, measured and hit) and the launcher's :class:`ProcessEnd` (how the process that
ran it ended: exit code or signal, killed for a hang, whether it got to train). Outcomes that no
process witnesses have their own constructor here: a config predicted not to fit
(:func:`predicted_oom`), a trial the user interrupted (:func:`interrupted`), one whose driver died
(:func:`stale`). Every outcome is a value of :data:`harness.records.Outcome`, and
:data:`harness.records.OUTCOME_STATE` maps it to an Optuna state.

Torch-free.
"""

from __future__ import annotations

import signal
import socket
import statistics
from dataclasses import dataclass

from harness.records import TrialReport, TrialResult
from harness.sweep.config import SweepConfig

TAKEN_BACK = "stopped by SIGTERM (a scheduler's preemption, time limit or scancel): it runs again, first"


CURVE_KEYS = ("milestone", "tokens", "seconds", "val_loss", "tokens_per_s")  # each seed's curve, as recorded


@dataclass(frozen=True)
class ProcessEnd:
    """What the launcher saw of the process that ran a trial."""

    code: int | None              # exit code; negative: the signal that ended it; None: unknown
    hung: bool = False            # killed after budget.hang_timeout_s without a message
    hang_timeout_s: float | None = None
    reached_training: bool = False  # it said it had started training
    start_method: str | None = None
    log_tail: str = ""
    taken_back: bool = False      # its driver got SIGTERM (a scheduler took the task back)


@dataclass(frozen=True)
class Pruning:
    """The driver's decision to stop a trial at a validation (sweep/pruning.py)."""

    rule: str                     # median | hyperband (Optuna's) | loss | dominance (the harness's)
    reason: str | None = None


def decide(number: int, report: TrialReport | None, end: ProcessEnd, cfg: SweepConfig,
           pruned: Pruning | None = None) -> TrialResult:
    """Trial ``number``'s record, its outcome decided. ``pruned``: the driver told it to stop."""
    record = _decide(number, report, end, cfg, pruned)
    if record.state != "fail":
        return record
    if end.code == -signal.SIGINT:
        return interrupted(number)  # Ctrl-C reached the trial's process first
    if end.taken_back or end.code == -signal.SIGTERM:
        # Its process got the scheduler's SIGTERM too (Slurm signals the whole task), maybe before
        # its driver did: no crash, an interruption.
        return interrupted(number, TAKEN_BACK)
    return record


def _decide(number: int, report: TrialReport | None, end: ProcessEnd, cfg: SweepConfig,
            pruned: Pruning | None) -> TrialResult:
    common = dict(number=number, log_tail=end.log_tail, start_method=end.start_method, host=socket.gethostname())
    if report is None:
        return _no_report(end, common)
    record = TrialResult( outcome="error", seed=report.seed, seeds=report.seeds,
                         pid=report.pid, reached_training=report.reached_training, metrics=report.metrics,
                         **{**common, "host": report.host or common["host"]})
    m = record.metrics
    if report.failure is not None:
        if report.failure == "oom":
            # A property of the config, not a failure: infeasible (an Optuna constraint), so the
            # sampler learns to avoid it.
            record.outcome, record.reason = "oom", f"out of memory: {m.oom_error or report.reason}"
        elif not report.reached_training:
            # Nothing about the config was tried: run again with the same parameters.
            record.outcome, record.reason = "infrastructure", _with_tail(report.reason, end)
        else:
            record.outcome, record.reason = report.failure, _with_tail(report.reason, end)
        return record
    if not report.runs:
        record.reason = _with_tail("the worker reported no training", end)
        return record
    _objective(record, report, cfg, pruned)
    if cfg.memory_budget_mib and record.outcome == "complete" and (m.peak_mem_mib or 0) > cfg.memory_budget_mib:
        # On CPU the budget is checked against peak RSS once the trial is done (CUDA enforces it).
        record.outcome = "over_budget"
        record.reason = f"peak memory {m.peak_mem_mib:,.0f} MiB is over memory_budget_mib {cfg.memory_budget_mib:,.0f}"
    return record


def _with_tail(reason: str | None, end: ProcessEnd) -> str:
    return f"{reason or 'failed'}\n{end.log_tail}" if end.log_tail else (reason or "failed")


def _no_report(end: ProcessEnd, common: dict) -> TrialResult:
    """The process ended (or was killed) without reporting: a crash, a hang, or a death before
    training, which says nothing about the config (retried)."""
    if end.hung:
        why = f"hang: no progress for {end.hang_timeout_s:g} s, killed"
    elif end.code is None:
        why = "crash: the worker ended without a result"
    else:
        how = f"killed by signal {-end.code}" if end.code < 0 else f"exit code {end.code}"
        why = f"crash: trial process ended without a result ({how})"
    if end.reached_training:
        outcome = "hang" if end.hung else "crash"
    else:
        outcome, why = "infrastructure", f"the trial process ended before training ({why})"
    return TrialResult(**common, outcome=outcome, reason=f"{why}\n{end.log_tail}",
                       reached_training=end.reached_training)


def _objective(record: TrialResult, report: TrialReport, cfg: SweepConfig, pruned: Pruning | None) -> None:
    """Outcome and objective from the seeds' runs: the mean over seeds of the last validation
    loss, or of the time to target (tokens or seconds, evaluation included)."""
    m, runs = record.metrics, report.runs
    record.seed_curves = [[{k: h.get(k) for k in CURVE_KEYS} for h in r.history] for r in runs]
    losses = [r.val_loss for r in runs if r.val_loss is not None]
    m.val_loss = statistics.fmean(losses) if losses else None
    m.best_val_loss = min((h["val_loss"] for r in runs for h in r.history), default=None)
    first = runs[0]
    if first.stopped_by == "pruned":
        record.outcome, record.value = "pruned", first.val_loss
        record.pruned_by = pruned.rule if pruned else cfg.pruner.name
        record.reason = pruned.reason if pruned else None
        # The training time its remaining budget would have taken, at the pace it had.
        done = first.history[-1]["milestone"] if first.history else 0
        if done and m.budget:
            m.pruning_saved_s = round(first.train_s * max(0.0, m.budget / done - 1), 3)
        return
    if cfg.objective.metric == "time_to_target":
        key = "tokens" if cfg.objective.measure == "tokens" else "seconds"
        times = [r.history[-1][key] if r.stopped_by == "converged" and r.history else None for r in runs]
        if None in times or len(runs) < cfg.seeds:
            record.outcome = "not_converged"
            best = f"{m.best_val_loss:.4f}" if m.best_val_loss is not None else "none"
            record.reason = (f"not converged: validation loss {cfg.objective.target:g} not reached within the budget "
                             f"(best {best})")
            return
        values = [float(t) for t in times]
        m.time_to_target = statistics.fmean(values)
    else:
        values = losses
    record.outcome, record.value = "complete", statistics.fmean(values)
    if len(values) > 1:
        m.seed_values, m.value_std = values, statistics.stdev(values)
    if cfg.multi_objective:
        # Every objective, in the study's order: the loss one as above, speed and memory as measured.
        measured = {"val_loss": m.val_loss, "time_to_target": m.time_to_target, "tokens_per_s": m.tokens_per_s,
                    "peak_mem_mib": m.peak_mem_mib}
        record.values = [float(measured[o.metric]) for o in cfg.all_objectives()]


def predicted_oom(number: int, reason: str) -> TrialResult:
    """Predicted over the memory budget or the card (sweep/predict.py): infeasible without running."""
    return TrialResult(number=number, outcome="predicted_oom", reason=reason, host=socket.gethostname())


def interrupted(number: int, why: str = "interrupted by the user (Ctrl-C)") -> TrialResult:
    """Stopped by the user (Ctrl-C) or the scheduler: its parameters run again, not counted."""
    return TrialResult(number=number, outcome="interrupted", reason=why, host=socket.gethostname())


def stale(number: int, grace_s: float) -> TrialResult:
    """Its driver stopped beating its heartbeat for ``grace_s``: failed and run again elsewhere."""
    return TrialResult(number=number, outcome="stale", host=socket.gethostname(),
                       reason=f"stale: its driver's heartbeat stopped for over {grace_s:g} s (driver gone)")
