"""Pruning, decided by the driver at each of a trial's validation milestones (:func:`judge`).

A single-objective study asks its Optuna pruner (median, Hyperband). In a multi-objective study,
where Optuna's pruners do not work (``should_prune`` is single-objective only; optuna#3450), two
rules of the harness's own, checked at every evaluation milestone:

1. **Loss at equal data** (as the median pruner does in a single-objective study): past
   ``n_warmup_steps`` and once ``n_startup_trials`` trials are complete, a trial whose validation
   loss at this milestone is worse than the median of the complete trials' losses at the same
   milestone is pruned.
2. **Dominance**: speed and memory are known after the warm-up steps, loss is not, so a trial
   is stopped when a finished trial already beats it whatever loss it could still reach. Its
   *optimistic final loss* is its loss now minus the largest improvement that any complete trial
   made from this same milestone to its end. Trial F dominates trial T when F is at least as good
   as T on every objective (F's tokens/s, peak memory and final loss against T's measured
   tokens/s, peak memory so far, and optimistic final loss), and strictly better on one. Peak
   memory only grows and tokens/s is measured after the warm-up, so an objective T could still
   improve is only the loss, and that one is taken at its best case.

Only objectives the study has count: a study of loss and memory ignores speed.

``pruner: dominance`` asks for rule 2 alone, in a single-objective study too, where it is the loss
alone: a trial is stopped at a milestone (past ``n_warmup_steps``, once ``n_startup_trials`` are
complete) when even its optimistic final loss is worse than a complete trial's final loss. It
stops only trials that, on every curve seen so far, cannot catch up: fewer stops than the median
rule, and no stop on a trial that could still become the best by the study's own record.
Torch-free.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import optuna

from harness.sweep.best import feasible
from harness.sweep.config import SweepConfig
from harness.sweep.storage import curve, report_intermediate

SPEED, MEMORY, LOSS = "tokens_per_s", "peak_mem_mib", "val_loss"


@dataclass(frozen=True)
class Finished:
    """What the rules need of a complete, feasible trial."""

    number: int
    losses: dict[int, float]  # validation loss by milestone
    final_loss: float
    tokens_per_s: float | None
    peak_mem_mib: float | None


@dataclass(frozen=True)
class Decision:
    prune: bool
    rule: str | None = None  # "loss" | "dominance"
    reason: str | None = None


def finished_trials(study: optuna.Study) -> list[Finished]:
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        loss = t.user_attrs.get(LOSS)
        if loss is None or not feasible(t):
            continue
        out.append(Finished(t.number, curve(t), float(loss), t.user_attrs.get(SPEED),
                            t.user_attrs.get(MEMORY)))
    return out


def loss_rule(finished: list[Finished], milestone: int, loss: float, n_startup: int, n_warmup: int) -> Decision:
    at = [f.losses[milestone] for f in finished if milestone in f.losses]
    if milestone < n_warmup or len(finished) < max(1, n_startup) or not at:
        return Decision(False)
    median = statistics.median(at)
    if loss > median:
        return Decision(True, "loss", f"validation loss {loss:.4f} at {milestone:,} is behind the median "
                                      f"{median:.4f} of {len(at)} complete trials at the same point")
    return Decision(False)


def optimistic_final_loss(finished: list[Finished], milestone: int, loss: float) -> float:
    """The loss now, less the largest improvement a complete trial made from this milestone on."""
    gains = [f.losses[milestone] - f.final_loss for f in finished if milestone in f.losses]
    return loss - max([0.0, *gains])


def dominance_rule(finished: list[Finished], objectives: dict[str, str], milestone: int, loss: float,
                   tokens_per_s: float | None, peak_mem_mib: float | None) -> Decision:
    """``objectives``: metric -> direction for the study's speed/memory objectives (val_loss
    is always minimized). Needs a measured speed (after the warm-up steps) when speed counts."""
    if SPEED in objectives and tokens_per_s is None or MEMORY in objectives and peak_mem_mib is None:
        return Decision(False)
    best_case = optimistic_final_loss(finished, milestone, loss)
    for f in finished:
        pairs = [(f.final_loss, best_case, "minimize")]  # (finished trial's, this trial's best case, direction)
        if SPEED in objectives:
            pairs.append((f.tokens_per_s, tokens_per_s, objectives[SPEED]))
        if MEMORY in objectives:
            pairs.append((f.peak_mem_mib, peak_mem_mib, objectives[MEMORY]))
        if any(a is None for a, _, _ in pairs):
            continue
        no_worse = all(a <= b if d == "minimize" else a >= b for a, b, d in pairs)
        better = any(a < b if d == "minimize" else a > b for a, b, d in pairs)
        if no_worse and better:
            shown = ", ".join(f"{m} {getattr(f, m):,.4g}" for m in (SPEED, MEMORY) if m in objectives)
            return Decision(True, "dominance",
                            f"dominated by trial {f.number} ({shown}, final loss {f.final_loss:.4f}) even if its "
                            f"loss fell to {best_case:.4f} (now {loss:.4f} at {milestone:,})")
    return Decision(False)


def decide(study: optuna.Study, objectives: dict[str, str], milestone: int, loss: float,
           tokens_per_s: float | None, peak_mem_mib: float | None, n_startup: int, n_warmup: int,
           use_loss_rule: bool = True) -> Decision:
    """Both rules, the loss rule first (it needs nothing measured)."""
    finished = finished_trials(study)
    if use_loss_rule:
        decision = loss_rule(finished, milestone, loss, n_startup, n_warmup)
        if decision.prune:
            return decision
    return dominance_rule(finished, objectives, milestone, loss, tokens_per_s, peak_mem_mib)


def judge(trial: optuna.Trial, cfg: SweepConfig, milestone: int, loss: float, tokens_per_s: float | None,
          peak_mem_mib: float | None) -> Decision:
    """Record ``trial``'s validation loss at ``milestone`` and decide whether it stops here: by the
    study's Optuna pruner (one objective), else by the rules above (several objectives; dominance
    is judged on the final validation loss, so not in a time-to-target study)."""
    report_intermediate(trial, milestone, loss)
    if cfg.pruner.name == "dominance":
        return dominance_only(trial.study, cfg, milestone, loss, tokens_per_s, peak_mem_mib)
    if not cfg.multi_objective:
        return Decision(True, cfg.pruner.name) if trial.should_prune() else Decision(False)
    if cfg.pruner.name == "none":
        return Decision(False)
    objectives = {o.metric: o.direction for o in cfg.all_objectives() if o.metric in (SPEED, MEMORY)}
    return decide(trial.study, objectives if cfg.objective.metric == "val_loss" else {}, milestone, loss,
                  tokens_per_s, peak_mem_mib, cfg.pruner.n_startup_trials, cfg.pruner.n_warmup_steps)


def dominance_only(study: optuna.Study, cfg: SweepConfig, milestone: int, loss: float, tokens_per_s: float | None,
                   peak_mem_mib: float | None) -> Decision:
    """``pruner: dominance``: rule 2 alone, after the pruner's warm-up and start-up trials; in a
    single-objective study it compares losses only. Not with ``time_to_target`` (its objective is
    not the final loss the rule bounds): nothing is pruned there."""
    finished = finished_trials(study)
    if (cfg.objective.metric != "val_loss" or milestone < cfg.pruner.n_warmup_steps
            or len(finished) < max(1, cfg.pruner.n_startup_trials)):
        return Decision(False)
    objectives = {o.metric: o.direction for o in cfg.all_objectives() if o.metric in (SPEED, MEMORY)}
    return dominance_rule(finished, objectives, milestone, loss, tokens_per_s, peak_mem_mib)
