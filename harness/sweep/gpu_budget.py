"""``budget_gpu_hours: H``: a study stops starting trials before its GPU-time would pass H.

A trial's GPU-seconds are its wall time in the study (Optuna's start to its end: the fixed cost,
training, validation and saving, all of which hold its GPUs) times ``gpus_per_trial``; on a CPU
host the CPU counts as the one device. The spend is the sum over the study's finished trials
(every state: a pruned or failed trial held its GPUs too). Before a trial starts, the driver adds
to the spend each running trial's predicted rest (the predicted cost less what it has run so far,
at least nothing) and the new trial's predicted cost; if the total would pass H, no trial starts.
The predicted cost is the dearest finished trial's: cautious, so the study passes H only when a
trial runs longer than every one before it (the mean would pass H whenever the next trial is
dearer than average), at the price of stopping up to one such trial short of H. Before any trial
has finished there is no prediction, and a trial starts. ``summary.md`` states the spend (the
study's ``gpu_budget`` attribute records H). Torch-free.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import optuna

ENDED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def trial_gpu_s(trial: optuna.trial.FrozenTrial, devices: int, now: dt.datetime | None = None) -> float:
    """Its wall time in the study (so far, for a running one) x its devices."""
    start = trial.datetime_start
    if start is None:
        return 0.0
    end = trial.datetime_complete or now or dt.datetime.now()
    return max(0.0, (end - start).total_seconds()) * devices


def spent_gpu_s(study: optuna.Study, devices: int) -> float:
    return sum(trial_gpu_s(t, devices) for t in study.get_trials(deepcopy=False, states=ENDED))


@dataclass(frozen=True)
class Check:
    start: bool
    spent_s: float
    committed_s: float  # spent + running trials' predicted rest + the next trial's predicted cost
    line: str | None = None


def check(study: optuna.Study, hours: float, devices: int) -> Check:
    """Whether another trial may start under a budget of ``hours`` GPU-hours."""
    ended = [t for t in study.get_trials(deepcopy=False, states=ENDED) if t.datetime_start is not None]
    spent = sum(trial_gpu_s(t, devices) for t in ended)
    # Trials that never ran (predicted out of memory, or instantly failed) cost ~nothing; leave
    # them out of the prediction so they do not make a trial look cheap.
    costs = [c for c in (trial_gpu_s(t, devices) for t in ended) if c > 1.0] or [trial_gpu_s(t, devices) for t in ended]
    if not costs:
        return Check(True, spent, spent)
    predicted = max(costs)
    now = dt.datetime.now()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    rest = sum(max(0.0, predicted - trial_gpu_s(t, devices, now)) for t in running)
    committed = spent + rest + predicted
    limit = hours * 3600
    if committed <= limit:
        return Check(True, spent, committed)
    return Check(False, spent, committed,
                 f"GPU budget: {spent / 3600:.3g} of {hours:g} GPU-h spent; the next trial (~{predicted:,.0f} GPU-s) "
                 f"would pass it, so no new trial starts")


def describe(study: optuna.Study) -> str | None:
    """The summary's line: the budget and what the study spent."""
    budget = study.user_attrs.get("gpu_budget")
    if not budget:
        return None
    spent = spent_gpu_s(study, int(budget.get("devices", 1)))
    hours = float(budget["hours"])
    unit = "CPU" if budget.get("device") == "cpu" else "GPU"
    return (f"{unit} budget: {hours:g} {unit}-h ({hours * 3600:,.0f} {unit}-s); spent {spent:,.0f} {unit}-s "
            f"({spent / (hours * 3600):.1%}) over {len(study.get_trials(deepcopy=False, states=ENDED))} trials "
            f"(a trial's wall time x gpus_per_trial)")
